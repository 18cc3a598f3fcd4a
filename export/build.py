"""`vqs models`: regenerate data, train every model, export the served artifacts, print the
evaluation table. Deterministic for the seeds below."""

from __future__ import annotations

import json
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

# Splits: (folder, count, seed, min seconds, max seconds). The test seed is used nowhere else.
SPLITS = {
    "short": ("short", 1000, 101, 2.2, 3.6),
    "train": ("train", 1200, 102, 2.0, 20.0),
    "test": ("test", 300, 103, 2.0, 20.0),
}
TRAIN_SEED = 7
# The dataset's frame rate: the encoder learns motion at it and the gateway samples videos at it.
FPS = 15.0
MODEL_NAMES = {"tqn": "TQN (s3d + decoder)", "average_pooling": "long-term average pooling",
               "short_term": "short-term (clip average)"}


def _log(msg: str) -> None:
    print(f"models: {msg}", file=sys.stderr, flush=True)


def make_splits(data_dir: Path) -> dict[str, data.ClipDataset]:
    datasets = {}
    for split, (folder, count, seed, lo, hi) in SPLITS.items():
        out = data_dir / folder
        if not (out / "labels.jsonl").exists():
            _log(f"synthesising {count} {split} videos ({lo}-{hi} s, seed {seed})")
            synth.write_dataset(out, count=count, seed=seed, fps=FPS, min_seconds=lo, max_seconds=hi)
        datasets[split] = data.load(out)
    return datasets


def evaluate(models: dict, test: data.ClipDataset) -> dict[str, dict[str, float]]:
    return {name: train.accuracy(train.predict(enc, head, test), test) for name, (enc, head) in models.items()}


def format_table(results: dict[str, dict[str, float]], videos: int) -> str:
    queries = list(train.HEADS)
    lines = [f"Per-video accuracy (%) on {videos} held-out test videos",
             "| model | " + " | ".join(queries) + " |",
             "|---|" + "---|" * len(queries)]
    for name, acc in results.items():
        lines.append(f"| {MODEL_NAMES[name]} | " + " | ".join(f"{100 * acc[q]:.1f}" for q in queries) + " |")
    return "\n".join(lines)


def check_bar(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's acceptance bar; returns one line per criterion, prefixed PASS or FAIL."""
    tqn, short, pooled = results["tqn"], results["short_term"], results["average_pooling"]
    gap = 100 * (tqn["class"] - short["class"])
    lines = [f"{'PASS' if gap >= 15 else 'FAIL'}: TQN beats the short-term baseline on class by "
             f"{gap:.1f} points (needs >= 15)"]
    for q in train.HEADS:
        ok = tqn[q] >= pooled[q]
        lines.append(f"{'PASS' if ok else 'FAIL'}: TQN {100 * tqn[q]:.1f} vs average pooling "
                     f"{100 * pooled[q]:.1f} on {q} (must not lose)")
    return lines


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


def main(data_dir: Path | None = None, budget: train.Budget | None = None) -> dict:
    start = time.monotonic()
    data_dir = Path(data_dir or REPO / "data")
    budget = budget or train.Budget()
    datasets = make_splits(data_dir)
    _log(f"data ready ({time.monotonic() - start:.0f}s); training with {budget}")
    models = train.train_all(datasets["short"], datasets["train"], budget, TRAIN_SEED)
    _log(f"training done ({time.monotonic() - start:.0f}s); evaluating")
    results = evaluate(models, datasets["test"])
    table = format_table(results, len(datasets["test"].records))
    bar = check_bar(results)
    print(table + "\n\n" + "\n".join(bar))
    export_served(models)
    report = {"results": results, "test_videos": len(datasets["test"].records), "budget": asdict(budget),
              "splits": SPLITS, "train_seed": TRAIN_SEED, "torch": torch.__version__,
              "bar": bar, "wall_seconds": round(time.monotonic() - start)}
    EVALUATION.write_text(json.dumps(report, indent=2) + "\n")
    _log(f"done in {time.monotonic() - start:.0f}s; artifacts in model_repository/, table in {EVALUATION.name}")
    return report
