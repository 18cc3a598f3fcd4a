"""Issue 9's measurement, in one run on the test split through the served models.

    python -m export.evaluate_adaptive [--data-dir data] [--videos N] [--split test_large --encoders s3d s3d_sgs]

Starts a real tritonserver on the model repository and sends every test video's clips (decoded by
decord at 112 px, as the gateway decodes them; the split's frame cache) to each clip encoder, then
the clip features to the served `tqn_decoder`; the gateway is not in the loop (its budget knob is
issue 9's serving side), so the budget travels as the encoder's `budget` input. For every
configuration (encoder, budget): per-query accuracy, GMACs per clip (the graph's own count for
adaptive encoders, `gmacs_per_clip` for plain ones), encoder wall-clock per clip at the serving
batch size (Triton's own compute time of the encoder, 64 clips per request; the client's round
trip, which adds the gRPC transfer of the clips, is reported beside it; configurations are
interleaved video by video so machine load hits them alike), and kept counts by clip phase. The top-K token baseline is not served (it is not an
export target): it runs in torch on the same clips at ATS's mean K' per block (the thesis's), and
as a control at each clip's own K' per block (only which tokens are kept differs).

Writes export/adaptive_evaluation.json and PNGs under docs/ (budget curve, B' and K' histograms);
for the other held-out split, test_large (`build.EXTRA_SPLITS`), export/adaptive_evaluation_<split>.json and
docs/<split>/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from export import REPO, adaptive_export, data
from export.build import in_domain_report, make_split, paired_bootstrap
from export.onnx_export import IN_DOMAIN_OUTPUT, IN_DOMAIN_THRESHOLD_PARAMETER
from export.synth import PHASES
from export.train_adaptive import HEADS, accuracy

OUT = REPO / "export" / "adaptive_evaluation.json"
DOCS = REPO / "docs"
BATCH = 64  # the encoders' max_batch_size: the serving batch
# Budgets of each adaptive encoder's curve (ATS's GMACs fall fast below 1: every ATS block samples).
CURVES = {"s3d_sgs": (1.0, 0.5, 0.35, 0.25), "vit_ats": (1.0, 0.99, 0.97, 0.95, 0.9, 0.75, 0.5, 0.35, 0.25)}
# The budget curve runs on every sixth test video (50 of 300): the 2 cores are shared by seven
# sessions; the four encoders' table uses every video.
CURVE_EVERY = 6
ENCODERS = ("s3d", "vit", "s3d_sgs", "vit_ats")


def _log(message: str) -> None:
    print(f"evaluate_adaptive: {message}", file=sys.stderr, flush=True)


def paired_intervals(answers: tuple[np.ndarray, np.ndarray], plain: tuple[np.ndarray, np.ndarray],
                     among: np.ndarray | None = None) -> dict[str, list[float]]:
    """Paired bootstrap 95% intervals, in points, of a configuration's accuracy minus its plain
    encoder's, per query and for the mean over the queries, over the videos both answered (of
    `among`, if given). Each of `answers`, `plain`: (sorted video indices, hits (videos, queries))."""
    (videos, a), (plain_videos, b) = answers, plain
    both = np.intersect1d(videos, plain_videos if among is None else np.intersect1d(plain_videos, among))
    a, b = a[np.searchsorted(videos, both)].astype(float), b[np.searchsorted(plain_videos, both)].astype(float)
    per_query = {q: [100 * x for x in paired_bootstrap(a[:, i], b[:, i])] for i, q in enumerate(HEADS)}
    return per_query | {"mean": [100 * x for x in paired_bootstrap(a.mean(1), b.mean(1))]}


def _parameters(client, model: str) -> dict[str, str]:
    config = client.get_model_config(model, as_json=True)["config"]
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _infer(client, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), grpcclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
    return {n: result.as_numpy(n) for n in outputs}


def _compute_ns(client, model: str, inferences: int | None = None) -> tuple[int, int]:
    """Triton's cumulative compute time of `model` (the python backend's execute: ONNX Runtime
    plus the stub's tensor handling) in ns, and its inference count. Triton updates both after it
    answers: with `inferences`, waits (up to 2 s) until the count has reached it, so the time of
    the requests just sent is in (otherwise it leaks into the next configuration of the model)."""
    deadline = time.monotonic() + 2.0
    while True:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        count = int(stats.get("inference_count", 0))
        if inferences is None or count >= inferences or time.monotonic() > deadline:
            return int(stats["inference_stats"].get("compute_infer", {}).get("ns", 0)), count
        time.sleep(0.002)


def _configurations(budget_defaults: dict[str, float], present: set[str]) -> list[tuple[str, str, float | None]]:
    """(label, model, budget): the served encoders at their defaults, then each adaptive encoder's curve."""
    configs = [("s3d", "clip_encoder_s3d", None), ("vit", "clip_encoder_vit", None),
               ("s3d_sgs", "clip_encoder_s3d_sgs", budget_defaults.get("clip_encoder_s3d_sgs")),
               ("vit_ats", "clip_encoder_vit_ats", budget_defaults.get("clip_encoder_vit_ats"))]
    for encoder in ("s3d_sgs", "vit_ats"):
        for b in CURVES[encoder]:
            if f"clip_encoder_{encoder}" in budget_defaults and b != budget_defaults[f"clip_encoder_{encoder}"]:
                configs.append((f"{encoder}@{b:g}", f"clip_encoder_{encoder}", b))
    return [c for c in configs if c[1] in present]


def run_served(ds: data.ClipDataset, videos: np.ndarray, curve_videos: set[int], repository: Path,
               encoders: tuple[str, ...] = ENCODERS) -> dict:
    import tritonclient.grpc as grpcclient

    from server.launcher import TritonProcess
    from server.settings import Settings

    settings = Settings().triton.model_copy(update={"model_repository": repository})
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"evaluate_adaptive_triton_{os.getpid()}.log"
    process = TritonProcess(settings, log_path=log)
    process.start()
    try:
        process.wait_ready()
        client = grpcclient.InferenceServerClient(process.grpc_url)
        # clip_encoder_vit(_ats) are evaluated when the repository serves them (not by default).
        present = {f"clip_encoder_{e}" for e in encoders if (repository / f"clip_encoder_{e}" / "config.pbtxt").is_file()}
        params = {m: _parameters(client, m) for m in present | {"tqn_decoder"}}
        scored = {m for m in present if any(o["name"] == adaptive_export.DOMAIN_OUTPUT for o in
                                            client.get_model_config(m, as_json=True)["config"]["output"])}
        defaults = {m: float(params[m].get(adaptive_export.BUDGET_DEFAULT_PARAMETER, "1"))
                    for m in ("clip_encoder_s3d_sgs", "clip_encoder_vit_ats") if m in present}
        configs = _configurations(defaults, present)
        decoder_outputs = [f"logits_{q}" for q in HEADS] + [IN_DOMAIN_OUTPUT]
        results = {label: {"model": model, "budget": budget, "seconds": 0.0, "compute_ns": 0, "clips": 0, "videos": [],
                           "preds": defaultdict(list), "kept": [], "gmacs": [], "in_domain_scores": []}
                   for label, model, budget in configs}
        for i, v in enumerate(videos):
            n = int(ds.num_clips[v])
            clips = [np.ascontiguousarray(ds.clips(int(v), s, min(BATCH, n - s))) for s in range(0, n, BATCH)]
            for label, model, budget in configs:
                if "@" in label and int(v) not in curve_videos:
                    continue
                r = results[label]
                r["videos"].append(int(v))
                features, distances = [], []
                before, count = _compute_ns(client, model)
                for batch in clips:
                    inputs = {"clips": batch}
                    outputs = ["features"] + ([adaptive_export.DOMAIN_OUTPUT] if model in scored else [])
                    if budget is not None:
                        inputs["budget"] = np.full((len(batch), 1), budget, np.float32)
                        outputs += ["kept", "gmacs"]
                    start = time.perf_counter()
                    out = _infer(client, model, inputs, outputs)
                    r["seconds"] += time.perf_counter() - start
                    r["clips"] += len(batch)
                    features.append(out["features"])
                    if model in scored:
                        distances.append(out[adaptive_export.DOMAIN_OUTPUT])
                    if budget is not None:
                        r["kept"].append(out["kept"])
                        r["gmacs"].append(out["gmacs"][:, 0])
                r["compute_ns"] += _compute_ns(client, model, count + sum(len(b) for b in clips))[0] - before
                feats = np.concatenate(features)[None]
                logits = _infer(client, "tqn_decoder", {"features": feats, "mask": np.ones(feats.shape[:2], bool)},
                                decoder_outputs)
                for q in HEADS:
                    r["preds"][q].append(int(logits[f"logits_{q}"][0].argmax()))
                # scored as the gateway scores: by the encoder's own Gaussian, else the decoder's
                r["in_domain_scores"].append(-float(np.concatenate(distances).mean()) if distances
                                             else float(logits[IN_DOMAIN_OUTPUT][0]))
            if (i + 1) % 25 == 0 or i + 1 == len(videos):
                _log(f"{i + 1}/{len(videos)} videos")
        stats = client.get_inference_statistics(as_json=True)
        return {"results": results, "parameters": params, "defaults": defaults, "scored": sorted(scored),
                "triton_statistics": stats}
    finally:
        process.stop()


@torch.inference_mode()
def top_k_accuracy(ds: data.ClipDataset, videos: np.ndarray, repository: Path,
                   k_per_block: list[int] | np.ndarray) -> dict:
    """The ViT with the K highest-scoring tokens per ATS block, in torch, decoded by the served
    decoder's weights: K one per block for every clip (the thesis's Table 7.1 baseline), or one
    per clip and block ((clips, blocks), the clips of `videos` in order)."""
    from export.train_adaptive import load_served

    vit = adaptive_export.load_served(repository / "clip_encoder_vit", domain=False).vit
    for block in vit.blocks:
        block.top_k = True
    _, decoder, _ = load_served(repository)
    k = torch.as_tensor(np.asarray(k_per_block, np.int64))
    preds = {q: [] for q in HEADS}
    kept_all, macs = [], []
    at = 0  # the clip of `videos` a per-clip K starts at
    for v in videos:
        n = int(ds.num_clips[v])
        feats = []
        for s in range(0, n, BATCH):
            count = min(BATCH, n - s)
            clip_k = k if k.dim() == 1 else k[at : at + count]
            features, kept = vit(torch.from_numpy(ds.clips(int(v), s, count)), k=clip_k)
            at += count
            feats.append(features)
            kept_all.append(kept - 1)
            macs.append(vit.macs(kept))
        feats = torch.cat(feats)[None]
        logits = decoder(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
        for q, lg in zip(HEADS, logits):
            preds[q].append(int(lg[0].argmax()))
    preds = {q: np.asarray(p) for q, p in preds.items()}
    return {"k_per_block": k_per_block if k.dim() == 1 else "each clip's own", "accuracy": accuracy(preds, ds, videos),
            "kept_mean": torch.cat(kept_all).float().mean(0).tolist(),
            "gmacs_per_clip": float(torch.cat(macs).double().mean() / 1e9)}


def _plain_gmacs(parameters: dict[str, str], model: str, repository: Path) -> float:
    """A plain encoder's GMACs per clip: its `gmacs_per_clip` parameter, else (an s3d exported before
    the parameter existed) counted from the served weights' architecture."""
    if adaptive_export.GMACS_PER_CLIP_PARAMETER in parameters:
        return float(parameters[adaptive_export.GMACS_PER_CLIP_PARAMETER])
    if model != "clip_encoder_s3d":
        raise ValueError(f"{model} has no {adaptive_export.GMACS_PER_CLIP_PARAMETER} parameter")
    from export.models.s3d_sgs import s3d_macs
    from export.train_adaptive import load_served

    return s3d_macs(load_served(repository)[0]) / 1e9


def _sampling_label(summary: dict, encoder: str) -> str | None:
    """The configuration whose kept counts the histograms show: the encoder at its default, unless
    that is an ATS budget of 1 (nothing sampled), then its curve's point at 0.5."""
    if encoder not in summary:
        return None
    if encoder == "vit_ats" and summary[encoder]["budget"] >= 1:
        return "vit_ats@0.5" if "vit_ats@0.5" in summary else None
    return encoder


def _plots(summary: dict, curve: dict, kept: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, encoder, plain in ((axes[0], "s3d_sgs", "s3d"), (axes[1], "vit_ats", "vit")):
        if encoder not in summary:
            ax.set_visible(False)
            continue
        points = sorted(((r["budget"], r) for label, r in curve.items() if label.split("@")[0] == encoder),
                        key=lambda p: p[0])
        budgets = [b for b, _ in points]
        mean_acc = [100 * np.mean(list(r["accuracy"].values())) for _, r in points]
        ms = [r["ms_per_clip"] for _, r in points]
        ax.plot(budgets, mean_acc, "o-", label=f"{encoder} mean accuracy (%)")
        ax.axhline(100 * np.mean(list(curve[plain]["accuracy"].values())), ls="--", c="gray", label=f"{plain}")
        ax.set_xlabel("budget")
        ax.set_ylabel("mean accuracy over queries (%)")
        twin = ax.twinx()
        twin.plot(budgets, ms, "s:", c="tab:red", label="ms / clip (Triton)")
        twin.set_ylabel("encoder ms per clip", color="tab:red")
        ax.set_title(encoder)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out_dir / "adaptive_budget_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if "s3d_sgs" in kept:
        sgs, phases = kept["s3d_sgs"]
        axes[0].hist([sgs[phases == 2, 0], sgs[np.isin(phases, (0, 4)), 0]], bins=np.arange(0.5, 9.5), density=True,
                     label=["flight clips", "idle clips (before/after)"])
        axes[0].set_xlabel("B' (bins kept of 8)")
        axes[0].set_title(f"s3d_sgs at budget {summary['s3d_sgs']['budget']:g}")
        axes[0].legend(fontsize=8)
    else:
        axes[0].set_visible(False)
    ats_label = _sampling_label(summary, "vit_ats")
    if ats_label is not None:
        k, phases = kept[ats_label]
        ats = k.sum(axis=1)  # a clip's tokens kept over its ATS blocks: what the later layers process
        axes[1].hist([ats[phases == 2], ats[np.isin(phases, (0, 4))]], bins=24, density=True,
                     label=["flight clips", "idle clips (before/after)"])
        axes[1].set_xlabel(f"K' summed over the {k.shape[1]} ATS blocks (of {196 * k.shape[1]})")
        axes[1].set_title(f"vit_ats at budget {summary[ats_label]['budget']:g}")
        axes[1].legend(fontsize=8)
    else:
        axes[1].set_visible(False)
    fig.tight_layout()
    path = out_dir / "adaptive_kept_histograms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path))
    return written


def evaluate(data_dir: Path, repository: Path, *, videos: int | None = None, out: Path = OUT,
             docs: Path = DOCS, split: str = "test", encoders: tuple[str, ...] = ENCODERS) -> dict:
    start = time.monotonic()
    load_start = os.getloadavg()
    ds = data.load(make_split(Path(data_dir), split))
    chosen = np.arange(len(ds.records)) if videos is None else np.linspace(0, len(ds.records) - 1, videos).astype(int)
    curve_videos = chosen[::CURVE_EVERY]
    served = run_served(ds, chosen, set(curve_videos.tolist()), repository, encoders)
    phases_of = {int(v): ds.clip_phases(int(v)) for v in chosen}
    summary, kept, curve, hits = {}, {}, {}, {}
    for label, r in served["results"].items():
        preds = {q: np.asarray(p) for q, p in r["preds"].items()}
        model = r["model"]
        evaluated = np.asarray(r["videos"])
        hits[label] = (evaluated, np.stack([preds[q] == ds.targets[q][evaluated] for q in HEADS], axis=1))
        entry = {"model": model, "budget": r["budget"], "videos": len(evaluated),
                 "accuracy": accuracy(preds, ds, evaluated),
                 "ms_per_clip": 1e-6 * r["compute_ns"] / r["clips"],
                 "client_ms_per_clip": 1000 * r["seconds"] / r["clips"], "clips": r["clips"]}
        # Judged as the gateway judges: by the encoder's own Gaussian and threshold, else (the plain
        # s3d the decoder was trained with) the decoder's; any other encoder is not judged.
        own = served["parameters"][model].get(IN_DOMAIN_THRESHOLD_PARAMETER)
        if model in served["scored"]:
            threshold = own
        elif own is None and r["budget"] is None:
            threshold = served["parameters"]["tqn_decoder"].get(IN_DOMAIN_THRESHOLD_PARAMETER)
        else:
            threshold = None
        entry["in_domain"] = None if threshold is None else {
            "threshold": float(threshold),
            **in_domain_report(np.asarray(r["in_domain_scores"]),  # it reads the videos' records only
                               SimpleNamespace(records=[ds.records[int(v)] for v in evaluated]), float(threshold))}
        on_curve = np.isin(evaluated, curve_videos)
        curve[label] = {"budget": r["budget"], "ms_per_clip": entry["ms_per_clip"],
                        "accuracy": accuracy({q: p[on_curve] for q, p in preds.items()}, ds, evaluated[on_curve])}
        if r["budget"] is None:
            entry["gmacs_per_clip"] = _plain_gmacs(served["parameters"][model], model, repository)
        else:
            k = np.concatenate(r["kept"])
            entry["gmacs_per_clip"] = float(np.concatenate(r["gmacs"]).mean())
            curve[label]["gmacs_per_clip"] = entry["gmacs_per_clip"]
            entry["kept_ratio"] = entry["gmacs_per_clip"] / _plain_gmacs(served["parameters"][model], model, repository)
            entry["kept_mean"] = k.mean(0).tolist()
            # by the phase of each clip this configuration encoded (the curve's: its videos only)
            at = np.concatenate([phases_of[int(v)] for v in evaluated])
            kept[label] = (k, at)
            entry["kept_by_phase"] = {PHASES[p]: k[at == p].mean(0).tolist()
                                      for p in range(len(PHASES)) if (at == p).any()}
            entry["kept_null_videos"] = k[at == -1].mean(0).tolist() if (at == -1).any() else None
            # B' per clip; for ATS the K' of each block, in blocks of 10 tokens
            binned = k[:, 0] if label.startswith("s3d_sgs") else (k // 10 * 10).ravel()
            entry["kept_histogram"] = {str(int(u)): int(c) for u, c in zip(*np.unique(binned, return_counts=True))}
        summary[label] = entry
    _log("top-K baseline (torch)")
    top_k = {}
    for label in [lb for lb, r in curve.items() if lb.split("@")[0] == "vit_ats" and r["budget"] < 1]:
        # Same K' per block as ATS kept on average, on the curve's videos.
        k = [max(1, int(round(x))) for x in summary[label]["kept_mean"]]
        top_k[label] = top_k_accuracy(ds, curve_videos, repository, k) | {"ats_accuracy": curve[label]["accuracy"],
                                                                           "ats_gmacs_per_clip": curve[label]["gmacs_per_clip"]}
        # A control beside it: top-K at each clip's own K' per block, so only which tokens differ.
        r = served["results"][label]
        per_video = np.split(np.concatenate(r["kept"]), np.cumsum(ds.num_clips[r["videos"]])[:-1])
        own = dict(zip(r["videos"], per_video))
        top_k[label]["at_each_clips_own_k"] = top_k_accuracy(ds, curve_videos, repository,
                                                             np.concatenate([own[int(v)] for v in curve_videos]))
    def _vs(fast: str, base: str) -> dict:
        f, b = summary[fast], summary[base]
        return {"gmacs_reduction": 1 - f["gmacs_per_clip"] / b["gmacs_per_clip"],
                "speedup": b["ms_per_clip"] / f["ms_per_clip"],
                "accuracy_points": {q: 100 * (f["accuracy"][q] - b["accuracy"][q]) for q in HEADS},
                "interval95_points": paired_intervals(hits[fast], hits[base])}

    for label, point in curve.items():
        plain = {"s3d_sgs": "s3d", "vit_ats": "vit"}.get(label.split("@")[0])
        if plain in hits:
            point[f"interval95_points_vs_{plain}"] = paired_intervals(hits[label], hits[plain], curve_videos)

    report = {
        "split": split, "videos": len(chosen), "clips": int(ds.num_clips[chosen].sum()),
        "path": "tritonserver (python backend, ONNX Runtime) for every encoder and the tqn_decoder; gateway not in the loop",
        "serving_batch": BATCH,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "seconds": time.monotonic() - start,
        "configurations": summary,
        "s3d_sgs_vs_s3d": _vs("s3d_sgs", "s3d") if {"s3d_sgs", "s3d"} <= summary.keys() else None,
        "vit_ats_vs_vit": _vs("vit_ats", "vit") if {"vit_ats", "vit"} <= summary.keys() else None,
        "budget_curve": {"videos": len(curve_videos), "points": curve},
        "top_k_baseline": top_k,
        "budget_defaults": served["defaults"],
        "pngs": None,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")  # before the plots: a plot that fails loses no run
    report["pngs"] = _plots(summary, curve, kept, docs)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _log(f"wrote {out} in {report['seconds']:.0f}s")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--repository", type=Path, default=REPO / "model_repository")
    parser.add_argument("--videos", type=int, default=None, help="evenly spaced test videos (default: all)")
    parser.add_argument("--split", choices=["test", "test_large"], default="test",
                        help="the held-out split (made if absent; test_large: 3,000 videos)")
    parser.add_argument("--encoders", nargs="+", choices=ENCODERS, default=list(ENCODERS))
    parser.add_argument("--out", type=Path, default=None, help="default: export/adaptive_evaluation[_SPLIT].json")
    parser.add_argument("--docs", type=Path, default=None, help="where the PNGs go (default: docs/[SPLIT/])")
    args = parser.parse_args()
    torch.set_num_threads(2)
    other = args.split != "test"
    out = args.out or (OUT.with_name(f"{OUT.stem}_{args.split}.json") if other else OUT)
    docs = args.docs or (DOCS / args.split if other else DOCS)
    report = evaluate(args.data_dir, args.repository, videos=args.videos, out=out, docs=docs, split=args.split,
                      encoders=tuple(args.encoders))
    for label, r in report["configurations"].items():
        acc = " ".join(f"{q}={100 * a:.1f}" for q, a in r["accuracy"].items())
        print(f"{label:14s} budget={r['budget']!s:5s} gmacs={r['gmacs_per_clip']:.4f} "
              f"ms/clip={r['ms_per_clip']:.2f} {acc}")


if __name__ == "__main__":
    main()
