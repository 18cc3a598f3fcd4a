"""Issue 11's served artifacts: the action parser and the frame embedder as ONNX graphs in
`model_repository/action_parser` and `model_repository/frame_embedder`, and `build_segments`,
the whole pipeline (data, training, evaluation, export) in one call.

    python -m export.segments_export --parser runs/segments/parser_served --embedder runs/segments/embedder \\
        --evaluation runs/segments/evaluation.json --data runs/segments

(what `build_segments` does last; `make models-segments` runs all of it).

The Triton contract (agreed with the gateway, see the README "Segments and frame embeddings"):
both models take `frames` UINT8 [1, T, 28, 28, 3] (the served 112 px frames at `fps` as 4x4
means, RGB, not normalised) and are unbatched (max_batch_size 0, one video or window per
request). The parser returns `responses` FP32 [1, T, m] and `boundary_scores` FP32 [1, T] (the
non-max-suppressed pattern-change score, decoded by `export.models.parser.decode_segments` with
the `boundary_threshold` and `max_boundaries` parameters); the embedder `embeddings` FP32
[1, T, 128], L2-normalised, and `frame_features` FP32 [1, T, 128], the CNN's per-frame features
before the Transformer, L2-normalised (a still picture's query). `context_frames` says how many
frames either side an output depends on, so a window with that much context computes what the
whole video computes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from export import MODEL_REPOSITORY, REPO, onnx_export
from export import frames as framedata
from export.models.embedder import FrameEmbedder, ServedEmbedder
from export.models.parser import ActionParser, ServedParser

FRAMES_INPUT = "frames"
PARSER_OUTPUTS = ("responses", "boundary_scores")
EMBEDDER_OUTPUTS = ("embeddings", "frame_features")
RUNNER = "../../onnx_runner.py"
MIN_FRAMES = 8  # per request; the gateway repeats a shorter video's last frame (and drops those outputs)


def export_onnx(model: torch.nn.Module, path: Path, output_names: tuple[str, ...], frames: int = 20) -> Path:
    """torch -> ONNX with a dynamic time axis; the input is (1, T, 28, 28, 3) uint8 frames."""
    model.eval()
    size = framedata.MODEL_SIZE
    example = torch.randint(0, 256, (1, frames, size, size, 3), dtype=torch.uint8)
    dims = {1: torch.export.Dim("time", min=2, max=100_000)}  # B = 1: one video or window per request
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18,
                                input_names=[FRAMES_INPUT], output_names=list(output_names),
                                dynamic_shapes={"frames": dims}, optimize=True, verbose=False)
    onnx_export.save(program, path)
    return path


def onnx_max_difference(model: torch.nn.Module, path: Path, frames: np.ndarray) -> float:
    """Largest |torch - ONNX Runtime| over all outputs for one input (B, T, 28, 28, 3) uint8."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(frames))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(None, {FRAMES_INPUT: frames})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


def _config(name: str, comment: str, outputs: dict[str, list[int]], parameters: dict[str, str]) -> str:
    size = framedata.MODEL_SIZE
    lines = [*(f"# {line}" for line in comment.splitlines()), f'name: "{name}"', 'backend: "python"',
             "max_batch_size: 0", "", "input [", "  {", f'    name: "{FRAMES_INPUT}"', "    data_type: TYPE_UINT8",
             f"    dims: [ 1, -1, {size}, {size}, 3 ]", "  }", "]", "output ["]
    lines.append(",\n".join(f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, d))} ]\n  }}'
                            for n, d in outputs.items()))
    lines += ["]", "", "instance_group [", "  {", "    count: 1", "    kind: KIND_CPU", "  }", "]", ""]
    lines += [f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()]
    lines += ["", "# Pay ONNX Runtime's first-run cost at load time, not on the first request.", "model_warmup [",
              "  {", '    name: "one_window_64_frames"', "    batch_size: 0", "    inputs {",
              f'      key: "{FRAMES_INPUT}"',
              f"      value {{ data_type: TYPE_UINT8 dims: [ 1, 64, {size}, {size}, 3 ] zero_data: true }}",
              "    }", "  }", "]", ""]
    return "\n".join(lines)


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def tensor_tables(onnx_path: Path) -> dict[str, dict]:
    """model.json's `inputs` / `outputs`, {name: {dtype, shape}} as every served model's, read from
    the exported graph (named dims stay names)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def table(values) -> dict:
        return {v.name: {"dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                         "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                for v in values}

    return {"inputs": table(graph.input), "outputs": table(graph.output)}


def _write_model(folder: Path, model: torch.nn.Module, outputs: tuple[str, ...], config: str, meta: dict,
                 check_frames: np.ndarray) -> dict:
    """Write the model directory next to the repository and move it into place with renames, so
    a Triton started meanwhile on the repository never sees a half-written model."""
    staging = folder.parent.parent / f".{folder.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    version = staging / "1"
    version.mkdir(parents=True)
    onnx_path = export_onnx(model, version / "model.onnx", outputs)
    meta = dict(meta, onnx_sha256=_fingerprint(onnx_path),
                parity_max_abs_difference=onnx_max_difference(model, onnx_path, check_frames),
                **tensor_tables(onnx_path))
    (staging / "config.pbtxt").write_text(config)
    (version / "model.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    os.symlink(RUNNER, version / "model.py")
    old = folder.parent.parent / f".{folder.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    return meta


def write_action_parser(parser: ActionParser, meta: dict, *, threshold: float, max_boundaries: int,
                        repository: Path = MODEL_REPOSITORY, check_frames: np.ndarray) -> dict:
    """model_repository/action_parser from a trained parser whose change window and minimum
    segment length are set; threshold and max_boundaries go into config.pbtxt."""
    patterns = parser.units[-1].miner.shape[0]
    config = _config("action_parser", (
        "Action parser (issue 11): 28 px frames of one video or window -> per-frame pattern responses and\n"
        "the non-max-suppressed pattern-change score. The gateway decodes boundaries and segments from them\n"
        "with boundary_threshold and max_boundaries (export.models.parser.decode_segments).\n"
        "Written by export/segments_export.py; re-export to change."),
        {"responses": [1, -1, patterns], "boundary_scores": [1, -1]},
        {"intra_op_threads": "1", "fps": f"{framedata.FPS:g}", "context_frames": str(parser.context_frames),
         "min_frames": str(MIN_FRAMES),
         "boundary_threshold": f"{threshold:g}", "max_boundaries": str(max_boundaries),
         "min_segment_frames": str(parser.min_segment_frames), "change_window": str(parser.change_window),
         "patterns": str(patterns)})
    meta = dict(meta, name="action_parser", boundary_threshold=threshold, max_boundaries=max_boundaries,
                change_window=parser.change_window, min_segment_frames=parser.min_segment_frames)
    return _write_model(repository / "action_parser", ServedParser(parser).eval(), PARSER_OUTPUTS, config, meta,
                        check_frames)


def write_frame_embedder(embedder: FrameEmbedder, meta: dict, *, repository: Path = MODEL_REPOSITORY,
                         check_frames: np.ndarray) -> dict:
    config = _config("frame_embedder", (
        "Frame embedder (issue 11): 28 px frames of one video or window -> one L2-normalised 128-d\n"
        "embedding per frame (CARL-style, rotary positions: a window with context_frames either side\n"
        "equals the whole video), and frame_features: each frame's CNN features on their own, L2-normalised\n"
        "(what a still picture is compared by). Written by export/segments_export.py; re-export to change."),
        {"embeddings": [1, -1, embedder.head.out_features], "frame_features": [1, -1, embedder.dim]},
        {"intra_op_threads": "1", "fps": f"{framedata.FPS:g}", "context_frames": str(embedder.context_frames),
         "min_frames": str(MIN_FRAMES)})
    return _write_model(repository / "frame_embedder", ServedEmbedder(embedder).eval(), EMBEDDER_OUTPUTS, config,
                        dict(meta, name="frame_embedder"), check_frames)


def _drop_logs(meta: dict) -> None:
    """Training records nest (stage 2 in stage 1, a run in the one it started from); their loss
    logs stay in the run folders."""
    meta.pop("log", None)
    for value in meta.values():
        if isinstance(value, dict):
            _drop_logs(value)


EMBEDDER_ROW = "embedder (CNN + Transformer, SCL)"


def export_runs(parser_dir: Path, embedder_dir: Path, evaluation: Path | None, data: Path,
                repository: Path = MODEL_REPOSITORY, embedder_evaluation: Path | None = None) -> dict:
    """Both trained runs -> model_repository, with the decoding knobs the evaluation chose on
    validation (without an evaluation: the parser's defaults, threshold 0.5, no limit). The
    embedder's scores come from `embedder_evaluation` (default: the same evaluation)."""
    from export.train_embedder import load_embedder
    from export.train_parser import load_parser

    knobs = dict(change_window=2, min_segment_frames=3, threshold=0.5, max_boundaries=0)
    scores, embedder_scores = {}, {}
    if evaluation is not None:
        result = json.loads(Path(evaluation).read_text())
        knobs = result["served_knobs"]
        scores = dict(result.get("served_scores", {}), splits=result.get("splits"))
    if embedder_evaluation or evaluation:
        result = json.loads(Path(embedder_evaluation or evaluation).read_text())
        row = result.get("embedder", {}).get(EMBEDDER_ROW)
        embedder_scores = dict(row, splits=result.get("splits")) if row else {}
    parser = load_parser(parser_dir)
    parser.change_window, parser.min_segment_frames = knobs["change_window"], knobs["min_segment_frames"]
    video = framedata.load_split("val", framedata.VAL_VIDEOS, cache=data)[0]
    frames = video.frames[None, :120]
    parser_meta = json.loads((parser_dir / "parser.json").read_text())
    embedder_meta = json.loads((embedder_dir / "embedder.json").read_text())
    for meta in (parser_meta, embedder_meta):
        _drop_logs(meta)
    provenance = dict(exported_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return dict(
        action_parser=write_action_parser(parser, dict(provenance, evaluation=scores, training=parser_meta,
                                                       run=parser_dir.name),
                                          threshold=knobs["threshold"], max_boundaries=knobs["max_boundaries"],
                                          repository=repository, check_frames=frames),
        frame_embedder=write_frame_embedder(load_embedder(embedder_dir),
                                            dict(provenance, evaluation=embedder_scores, training=embedder_meta,
                                                 run=embedder_dir.name),
                                            repository=repository, check_frames=frames))


def null_videos(data: Path, split: str) -> Path:
    """The videos without a routine of `vqs models`' `split` ("val" or "test": every
    `build.NULL_EVERY`-th video of the generator's split, idle / walk-off / background only / cut
    before take-off), rendered alone into `data`/null_<split> in the folder layout
    `frames.load_null_videos` reads: the same videos as in data/<split> (same seeds, codecs,
    kinds), without rendering the 270 routines around them."""
    from export import build, data as clipdata, synth

    out = Path(data) / f"null_{split}"
    if (out / "frames.lengths.npy").exists():  # written last
        return out
    _, count, seed, lo, hi = build.SPLITS[split]
    every = build.NULL_EVERY
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    records, lengths = [], []
    with open(staging / "frames.u8", "wb") as frames:
        for index in range(every - 1, count, every):
            record = synth._dataset_item((str(staging), index, seed, framedata.SERVED_SIZE, framedata.SERVED_SIZE,
                                          build.FPS, "mix", lo, hi, every))
            video = staging / record["file"]
            decoded = clipdata._decode(str(video))
            video.unlink()
            frames.write(decoded.tobytes())
            records.append(record)
            lengths.append(len(decoded))
    (staging / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    np.save(staging / "frames.lengths.npy", np.asarray(lengths, np.int64))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


RUNS = REPO / "runs" / "segments"
# Step budgets and recipes of the served models (the README's table comes from runs with these).
BUDGETS = dict(stage1=1150, stage2=3000, detector=1250, embedder=2000, cnn_only=1000)
# 128-frame windows, a quarter of them holding the whole action (the rest anywhere, so long idle
# stretches are seen): validation abs F1 0.986 vs 0.984 with 64-frame windows, 3/4 on the action
# (the same stage 1; the choice also counts false boundaries on the videos without a routine).
WINDOWS = ("--window", 128, "--action-share", 0.25)
SERVED_STAGE2 = ("--fresh", "--scale", 4, "--near-weight", 1, "--boundary-weight", 1, "--lr", 1e-3, *WINDOWS)
# The same without the boundary loss:
PAPER_STAGE2 = ("--fresh", "--scale", 4, "--near-weight", 1, "--lr", 1e-3, *WINDOWS)


def build_segments(data: Path = RUNS, repository: Path = MODEL_REPOSITORY, budgets: dict[str, int] = BUDGETS) -> dict:
    """Everything of issue 11 in one call, for `vqs models`: render the per-frame splits and the
    videos without a routine of the generator's val and test splits (cached in `data`), train the
    parser (stage 1, stage 2 as served and with the paper's losses only), the two ablations, the
    detector baseline, the embedder and its CNN-only ablation, evaluate (choices on validation
    with its videos without a routine, which count false boundaries; test once) and export both
    served models. Returns the seconds each part took."""
    from export import evaluate_segments, train_embedder, train_parser

    data = Path(data)
    times, start = {}, time.monotonic()

    def timed(name: str, call, *argv) -> None:
        t0 = time.monotonic()
        call([str(a) for a in argv])
        times[name] = round(time.monotonic() - t0)

    timed("frames", lambda argv: [framedata.load_split(split, count, backgrounds=bgs, cache=data) for split, count, bgs in
                                  (("val", framedata.VAL_VIDEOS, 1), ("test", framedata.TEST_VIDEOS, 1),
                                   ("train", framedata.TRAIN_VIDEOS, 2))])
    timed("videos without a routine", lambda argv: [null_videos(data, split) for split in ("val", "test")])
    d, s1 = ["--data", data], ["--init", data / "parser"]
    timed("parser stage 1", train_parser.main, "--stage", "1", *d, "--out", data / "parser", "--steps", budgets["stage1"])
    for name, extra in (("parser_served", SERVED_STAGE2), ("parser_paper", PAPER_STAGE2),
                        ("sps1_paper", ("--units", 1, "--no-local")),
                        ("sps1_boundary", ("--units", 1, "--no-local", "--fresh", "--scale", 4, "--boundary-weight", 1,
                                           "--lr", 1e-3, *WINDOWS))):
        timed(name, train_parser.main, "--stage", "2", *d, *s1, "--out", data / name, "--steps", budgets["stage2"], *extra)
    timed("detector", train_parser.main, "--stage", "detector", *d, *s1, "--out", data / "detector", "--steps",
          budgets["detector"])
    timed("embedder", train_embedder.main, *d, "--out", data / "embedder", "--steps", budgets["embedder"])
    timed("cnn only", train_embedder.main, *d, "--out", data / "cnn_only", "--no-context", "--steps",
          budgets["cnn_only"])
    timed("evaluation", evaluate_segments.main, *d, "--parser", data / "parser_served", "--paper-losses",
          data / "parser_paper", "--ablation", data / "sps1_paper", data / "sps1_boundary", "--detector",
          data / "detector", "--embedder", data / "embedder", "--cnn-only", data / "cnn_only", "--out",
          data / "evaluation.json", "--null-val", data / "null_val", "--null-videos", data / "null_test")
    timed("export", lambda argv: export_runs(data / "parser_served", data / "embedder", data / "evaluation.json",
                                             data, repository))
    times["total"] = round(time.monotonic() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parser", type=Path, required=True)
    p.add_argument("--embedder", type=Path, required=True)
    p.add_argument("--evaluation", type=Path, help="evaluate_segments json (the knobs chosen on validation)")
    p.add_argument("--embedder-evaluation", type=Path, help="evaluate_segments json with the embedder's rows")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = export_runs(args.parser, args.embedder, args.evaluation, args.data, args.repository,
                      args.embedder_evaluation)
    for name, meta in out.items():
        print(f"{name}: max |torch - onnxruntime| {meta['parity_max_abs_difference']:.2e}")


if __name__ == "__main__":
    main()
