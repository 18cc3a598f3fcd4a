"""`vqs models`: regenerate data, train every model, export the served artifacts, print the
evaluation table. Deterministic for the seeds below."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from export import data, onnx_export, synth, train

REPO = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO / "model_repository"
EVALUATION = REPO / "export" / "evaluation.json"
CONTROLS = REPO / "export" / "controls.json"

# Splits: (folder, count, seed, min seconds, max seconds), each from its own seed. Every choice
# (architecture, budget, learning rate) is made on "val"; "test" is scored once per run.
SPLITS = {
    "short": ("short", 1000, 201, 2.2, 3.6),
    "train": ("train", 1200, 202, 2.0, 20.0),
    "val": ("val", 300, 203, 2.0, 20.0),
    "test": ("test", 300, 204, 2.0, 20.0),
}
TRAIN_SEED = 7
# The dataset's frame rate: the encoder learns motion at it and the gateway samples videos at it.
FPS = 15.0
MODEL_NAMES = {"tqn": "TQN (s3d + decoder)", "average_pooling": "long-term average pooling",
               "short_term": "short-term (clip average)",
               "single_frame": "control: single frame per clip (2D CNN) + TQN",
               "shuffled": "control: TQN on frame-shuffled videos"}
SHUFFLE_SEED = 11
LENGTH_BINS = ((2, 8), (8, 14), (14, 21))


def _log(msg: str) -> None:
    print(f"models: {msg}", file=sys.stderr, flush=True)


def _split_spec(split: str) -> dict:
    folder, count, seed, lo, hi = SPLITS[split]
    return {"generator_version": synth.GENERATOR_VERSION, "count": count, "seed": seed,
            "min_seconds": lo, "max_seconds": hi, "fps": FPS}


def fingerprint(folder: Path) -> str:
    """sha256 of a split's labels.jsonl (which names the generator version and every video seed)."""
    return hashlib.sha256((Path(folder) / "labels.jsonl").read_bytes()).hexdigest()


def make_split(data_dir: Path, split: str) -> Path:
    """The split's folder, (re)synthesised unless it holds exactly this generator version and spec."""
    out = Path(data_dir) / SPLITS[split][0]
    spec = _split_spec(split)
    spec_path = out / "split.json"
    if spec_path.exists() and (out / "labels.jsonl").exists() and json.loads(spec_path.read_text()) == spec:
        return out
    if out.exists():
        _log(f"{out} was made by another generator version or spec: rebuilding it")
        shutil.rmtree(out)
    _log(f"synthesising {spec['count']} {split} videos ({spec['min_seconds']}-{spec['max_seconds']} s, "
         f"seed {spec['seed']}, generator v{spec['generator_version']})")
    synth.write_dataset(out, count=spec["count"], seed=spec["seed"], fps=FPS, min_seconds=spec["min_seconds"],
                        max_seconds=spec["max_seconds"])
    spec_path.write_text(json.dumps(spec) + "\n")  # written last: a half-made split is rebuilt
    return out


def make_splits(data_dir: Path) -> dict[str, data.ClipDataset]:
    return {split: data.load(make_split(data_dir, split)) for split in SPLITS}


def predict_all(models: dict, ds: data.ClipDataset) -> dict[str, dict[str, np.ndarray]]:
    return {name: train.predict(enc, head, ds) for name, (enc, head) in models.items()}


def chance(ds: data.ClipDataset) -> dict[str, float]:
    """The majority answer's rate per query: what a model that ignores the video scores."""
    return {q: float(np.bincount(t).max() / len(t)) for q, t in ds.targets.items()}


def summarise(preds: dict[str, np.ndarray], ds: data.ClipDataset) -> dict:
    """Per-video accuracy per query, per-class mean accuracy (as the paper reports) and
    accuracy by video length."""
    hits = {q: preds[q] == ds.targets[q] for q in train.HEADS}
    classes = ds.targets["class"]
    lengths = np.asarray([r["duration_s"] for r in ds.records])
    by_length = {}
    for lo, hi in LENGTH_BINS:
        sel = (lengths >= lo) & (lengths < hi)
        by_length[f"{lo}-{hi}s"] = {"videos": int(sel.sum()),
                                    **{q: float(hits[q][sel].mean()) if sel.any() else None
                                       for q in ("somersaults", "twists", "class")}}
    return {"accuracy": {q: float(h.mean()) for q, h in hits.items()},
            "per_class_accuracy": float(np.mean([hits["class"][classes == c].mean() for c in np.unique(classes)])),
            "by_length": by_length}


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of mean(a) - mean(b) over videos resampled with replacement (a, b: hits)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (rounds, len(a)))
    diffs = a[idx].mean(1) - b[idx].mean(1)
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]


def tqn_minus_baselines(preds: dict, ds: data.ClipDataset) -> dict:
    out = {}
    for base in ("average_pooling", "short_term"):
        out[base] = {}
        for q in train.HEADS:
            a, b = preds["tqn"][q] == ds.targets[q], preds[base][q] == ds.targets[q]
            out[base][q] = {"difference": float(a.mean() - b.mean()), "interval95": paired_bootstrap(a, b)}
    return out


def format_table(results: dict[str, dict], videos: int, split: str = "test") -> str:
    queries = list(train.HEADS)
    lines = [f"Per-video accuracy (%) on {videos} {split} videos",
             "| model | " + " | ".join(queries) + " | class, mean per class |",
             "|---|" + "---|" * (len(queries) + 1)]
    for name, summary in results.items():
        acc = summary["accuracy"]
        lines.append(f"| {MODEL_NAMES[name]} | " + " | ".join(f"{100 * acc[q]:.1f}" for q in queries)
                     + f" | {100 * summary['per_class_accuracy']:.1f} |")
    return "\n".join(lines)


def check_bar(results: dict[str, dict]) -> list[str]:
    """The issue's acceptance bar (one seed); one line per criterion, prefixed PASS or FAIL."""
    tqn, short, pooled = (results[m]["accuracy"] for m in ("tqn", "short_term", "average_pooling"))
    gap = 100 * (tqn["class"] - short["class"])
    lines = [f"{'PASS' if gap >= 15 else 'FAIL'}: TQN beats the short-term baseline on class by "
             f"{gap:.1f} points (needs >= 15)"]
    for q in ("somersaults", "twists"):
        lines.append(f"{'PASS' if tqn[q] >= 0.85 else 'FAIL'}: TQN {100 * tqn[q]:.1f} on {q} (needs >= 85)")
    for q in train.HEADS:
        ok = tqn[q] >= pooled[q]
        lines.append(f"{'PASS' if ok else 'FAIL'}: TQN {100 * tqn[q]:.1f} vs average pooling "
                     f"{100 * pooled[q]:.1f} on {q} (must not lose)")
    return lines


def check_controls(results: dict[str, dict], base_rates: dict[str, float]) -> list[str]:
    """Models that cannot see motion must stay within 15 points of chance on the counts."""
    lines = []
    for name, summary in results.items():
        for q in ("somersaults", "twists"):
            over = 100 * (summary["accuracy"][q] - base_rates[q])
            lines.append(f"{'PASS' if over <= 15 else 'FAIL'}: control {name} {100 * summary['accuracy'][q]:.1f} "
                         f"on {q}, {over:+.1f} points over chance {100 * base_rates[q]:.1f} (needs <= +15)")
    return lines


def data_fingerprint(data_dir: Path) -> dict:
    """What the results were computed on: generator version, split specs (seeds) and label hashes."""
    return {"generator_version": synth.GENERATOR_VERSION,
            "splits": {split: {**_split_spec(split), "labels_sha256": fingerprint(Path(data_dir) / SPLITS[split][0])}
                       for split in SPLITS}}


def _stamp_provenance(folder: Path, provenance: dict) -> None:
    """Add how the artifact was made (data version, fingerprint, seed, budget) to its model.json."""
    path = folder / "model.json"
    meta = json.loads(path.read_text())
    meta["provenance"] = provenance
    path.write_text(json.dumps(meta, indent=2) + "\n")


def export_served(models: dict) -> None:
    encoder, decoder = models["tqn"]
    enc_dir = MODEL_REPOSITORY / "clip_encoder_s3d" / "1"
    dec_dir = MODEL_REPOSITORY / "tqn_decoder" / "1"
    enc_path = onnx_export.export_encoder(
        encoder, train.ENCODER_CONFIG, enc_dir, "clip_encoder_s3d", clip_fps=FPS
    )
    dec_path = onnx_export.export_decoder(decoder, train.TQN_CONFIG, dec_dir)
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (4, 8, 112, 112, 3), dtype=np.uint8)
    feats = rng.standard_normal((2, 9, 256)).astype(np.float32)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False
    diffs = {**onnx_export.max_abs_diff(encoder, enc_path, {"clips": clips}),
             **onnx_export.max_abs_diff(decoder, dec_path, {"features": feats, "mask": mask})}
    _log("torch vs ONNX Runtime max abs diff: " + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items()))


def main(data_dir: Path | None = None, budget: train.Budget | None = None, controls: bool = True) -> dict:
    """Train, select on validation, score test once, export; then (optional) the controls."""
    start = time.monotonic()
    data_dir = Path(data_dir or REPO / "data")
    budget = budget or train.Budget()
    datasets = make_splits(data_dir)
    provenance = {**data_fingerprint(data_dir), "train_seed": TRAIN_SEED, "budget": asdict(budget),
                  "torch": torch.__version__}
    _log(f"data ready ({time.monotonic() - start:.0f}s); training with {budget}, "
         f"{budget.clip_gradients} clip gradients per model after the warm-up")
    models, warm = train.train_all(datasets["short"], datasets["train"], budget, TRAIN_SEED)
    _log(f"training done ({time.monotonic() - start:.0f}s); evaluating on validation, then test once")
    report = {"provenance": provenance, "timing_s": {"training": round(time.monotonic() - start)}}
    for split in ("val", "test"):
        ds = datasets[split]
        preds = predict_all(models, ds)
        results = {name: summarise(p, ds) for name, p in preds.items()}
        report[split] = {"videos": len(ds.records), "chance": chance(ds), "results": results,
                         "tqn_minus": tqn_minus_baselines(preds, ds)}
        print(format_table(results, len(ds.records), split), flush=True)
    report["bar"] = check_bar(report["test"]["results"])
    print("\n".join(report["bar"]), flush=True)
    export_served(models)
    for folder in (MODEL_REPOSITORY / "clip_encoder_s3d" / "1", MODEL_REPOSITORY / "tqn_decoder" / "1"):
        _stamp_provenance(folder, provenance)
    report["timing_s"]["served_models"] = round(time.monotonic() - start)
    EVALUATION.write_text(json.dumps(report, indent=2) + "\n")
    _log(f"served models done in {time.monotonic() - start:.0f}s; artifacts in model_repository/, "
         f"table in {EVALUATION.name}")
    if controls:
        report["controls"] = run_controls(datasets, warm, budget)
        report["timing_s"]["total"] = round(time.monotonic() - start)
        EVALUATION.write_text(json.dumps(report, indent=2) + "\n")
        _log(f"controls done in {time.monotonic() - start:.0f}s")
    return report


def run_controls(datasets: dict[str, data.ClipDataset], warm: tuple | None, budget: train.Budget) -> dict:
    """Train the no-motion controls and score them on test (the shuffled one on shuffled test)."""
    models = train.train_controls(datasets["short"], datasets["train"], warm, budget, TRAIN_SEED, SHUFFLE_SEED)
    test = datasets["test"]
    results = {"single_frame": summarise(train.predict(*models["single_frame"], test), test),
               "shuffled": summarise(train.predict(*models["shuffled"], data.shuffle_frames(test, SHUFFLE_SEED + 1)),
                                     test)}
    print(format_table(results, len(test.records), "test"), flush=True)
    checks = check_controls(results, chance(test))
    print("\n".join(checks), flush=True)
    return {"results": results, "chance": chance(test), "checks": checks}


def controls_only(data_dir: Path | None = None, budget: train.Budget | None = None) -> dict:
    """The controls alone (each with its own warm-up), written to export/controls.json."""
    start = time.monotonic()
    data_dir = Path(data_dir or REPO / "data")
    budget = budget or train.Budget()
    datasets = make_splits(data_dir)
    report = {"provenance": {**data_fingerprint(data_dir), "train_seed": TRAIN_SEED, "budget": asdict(budget),
                             "torch": torch.__version__},
              **run_controls(datasets, None, budget)}
    report["wall_seconds"] = round(time.monotonic() - start)
    CONTROLS.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    if "--controls-only" in sys.argv[1:]:
        controls_only()
    else:
        main(controls="--no-controls" not in sys.argv[1:])
