"""Regenerate the golden snapshot from the served models: `make golden`.

    python -m tests.golden.regenerate            # write tests/golden/analyze.json, print the diff
    python -m tests.golden.regenerate --check    # compare only; exit 1 if outside the tolerance

Starts its own Triton and gateway on free ports, over the model repository of the settings
(`VQS_TRITON__MODEL_REPOSITORY` applies, as for `vqs serve`), renders the fixed videos of
`tests.golden.CASES`, analyses each through gRPC over loopback, writes the snapshot and stops
everything (also on errors or Ctrl-C). Run it from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from tests import golden

logger = logging.getLogger("golden")


async def _serve_and_analyze(settings, videos: dict[str, Path], triton_log: Path) -> dict[str, dict]:
    import grpc

    from server.main import Gateway
    from server.proto import video_analytics_pb2 as pb
    from server.proto import video_analytics_pb2_grpc as pb_grpc

    gateway = Gateway(settings, triton_log=triton_log)
    try:
        await gateway.start()
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.VideoAnalyticsStub(channel)
            outputs = {}
            for name, path in videos.items():
                response = await stub.Analyze(pb.AnalyzeRequest(video=path.read_bytes()), timeout=300)
                outputs[name] = golden.served(response)
                logger.info("analysed %s: %d clips", name, response.video.clips)
            return outputs
    finally:
        await gateway.stop()


def _settings():
    from server.settings import Settings

    base = Settings()
    return base.model_copy(update={
        "host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,  # no metrics endpoint
        "triton": base.triton.model_copy(
            update={"url": None, "grpc_port": 0, "http_port": 0, "metrics_port": 0}
        ),
    })


def _report(old: dict | None, new: dict) -> int:
    """Print what changed against the old snapshot; returns how many cases moved beyond it."""
    if old is None:
        print("no previous snapshot", file=sys.stderr)
        return len(new["cases"])
    if old.get("models") != new["models"]:
        changed = [k for k in new["models"] if old.get("models", {}).get(k) != new["models"][k]]
        print(f"model files changed since the last snapshot: {', '.join(changed)}", file=sys.stderr)
    moved = 0
    for name, case in new["cases"].items():
        if name not in old.get("cases", {}):
            print(f"{name}: new case", file=sys.stderr)
            moved += 1
            continue
        problems = golden.compare(old["cases"][name], case, old.get("tolerance", golden.TOLERANCE))
        moved += bool(problems)
        print(f"{name}: {'; '.join(problems) if problems else 'within tolerance'}", file=sys.stderr)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.regenerate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=golden.SNAPSHOT, help="snapshot file to write")
    parser.add_argument("--check", action="store_true",
                        help="compare the served outputs with the snapshot; write nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("server", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import av  # noqa: F401  (PyAV's FFmpeg before decord's, as in tests/conftest.py)

    settings = _settings()
    repository = Path(settings.triton.model_repository)
    models = golden.fingerprint(repository)
    missing = [name for name, digest in models.items() if digest == "missing"]
    if missing:
        print(f"error: {repository} lacks {', '.join(missing)}; run `make models` or set "
              "VQS_TRITON__MODEL_REPOSITORY", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="vqs-golden-") as tmp:
        folder = Path(tmp)
        videos = {case.name: golden.render(case, folder) for case in golden.CASES}
        triton_log = folder / "tritonserver.log"
        try:
            outputs = asyncio.run(_serve_and_analyze(settings, videos, triton_log))
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            if triton_log.exists():
                tail = triton_log.read_text(errors="replace").splitlines()[-40:]
                print("\n".join(tail), file=sys.stderr)
            print(f"error: could not analyse the golden videos: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 1

    snapshot = {
        "about": "Served outputs for tests/golden CASES; regenerate with `make golden` "
                 "(python -m tests.golden.regenerate) after retraining. See tests/golden/__init__.py.",
        "tolerance": golden.TOLERANCE,
        "models": models,
        "cases": {c.name: {"render": c.arguments(), **outputs[c.name]} for c in golden.CASES},
    }
    old = golden.load(args.out) if args.out.exists() else None
    moved = _report(old, snapshot)
    if args.check:
        return 1 if moved else 0
    golden.dump(snapshot, args.out)
    print(f"wrote {args.out} ({len(snapshot['cases'])} cases, {moved} changed beyond the tolerance)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
