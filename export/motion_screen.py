"""Screen how vit_ats spreads a request's budget over its clips by their motion (`MotionBudget`),
on a validation split, with the served ViT's weights (no retraining).

    python -m export.motion_screen [--split val_large] [--points 1:1@0.5 1.25:0.5@0.35 ...] [--out F]

A point STILL:MOVING@BUDGET runs every clip of the split through the served vit_ats module in torch
(`adaptive_export.ServedViTATS`, equal to its graph within 1e-5) with a clip at the short training
clips' `--percentiles` of motion or below at BUDGET ** STILL, one at or above the upper one at
BUDGET ** MOVING (1:1: one budget for every clip, as before session 28). Per point: accuracy, GMACs
per clip and K' per ATS block by clip phase; paired bootstrap intervals between points with
`--pairs`. What chose `AdaptiveBudget.ats_still_power` / `ats_moving_power` (export/ats_motion_screen.json).

`--spread-steps 0 N`: the points also for the served weights distilled N steps more with ATS at the
served motion budgets (the run a build with `vit_spread_steps` N adds to the student, here after
the refit and tuning), named "spread-N/POINT" ("0": the served weights, their points named as above).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from export import MODEL_REPOSITORY, REPO, adaptive_export, build, data, train
from export.build import paired_bootstrap
from export.models.vit import MOTION_STRIDE, MotionBudget
from export.synth import PHASES
from export.train_adaptive import (HEADS, SEED, SPREAD_STAGE_SEED, AdaptiveBudget, _clip_batches, accuracy,
                                   decode_videos, distill_vit, load_served, motion_budget, motion_levels)

OUT = REPO / "export" / "ats_motion_screen.json"


def parse_point(point: str) -> tuple[float, float, float]:
    """"STILL:MOVING@BUDGET" -> (still power, moving power, budget)."""
    powers, budget = point.split("@")
    still, moving = powers.split(":")
    return float(still), float(moving), float(budget)


def screened_weights(data_dir: Path, spread_steps: list[int], teacher, repository: Path = MODEL_REPOSITORY) -> dict:
    """Name prefix -> ViT: the served one ("") and, per nonzero step count N, it distilled N steps
    more at the motion budgets ("spread-N/")."""
    datasets = [data.load(build.make_split(data_dir, split)) for split in ("train", "short")]
    budget = AdaptiveBudget()
    stage = replace(budget, ats_distill_share=budget.vit_ats_share)
    weights = {}
    for steps in spread_steps:
        vit = adaptive_export.load_served(repository / "clip_encoder_vit", domain=False).vit
        if steps:
            torch.manual_seed(SPREAD_STAGE_SEED)
            vit = distill_vit(teacher, datasets, stage, np.random.default_rng(SPREAD_STAGE_SEED), student=vit,
                              steps=steps, motion=motion_budget(datasets[1], budget))
        weights[f"spread-{steps}/" if steps else ""] = vit
    return weights


@torch.inference_mode()
def screen(data_dir: Path, split: str, points: list[str], percentiles: tuple[float, float],
           pairs: list[tuple[str, str]], spread_steps: list[int], repository: Path = MODEL_REPOSITORY) -> dict:
    torch.set_num_threads(train.TRAIN_THREADS)
    with torch.inference_mode(False):  # the weights may train
        teacher, decoder, _ = load_served(repository)
        weights = screened_weights(data_dir, spread_steps, teacher, repository)
    ds = data.load(build.make_split(data_dir, split))
    low, high = motion_levels(data.load(build.make_split(data_dir, "short")), 1024, np.random.default_rng(SEED),
                              percentiles, MOTION_STRIDE)
    phases = np.concatenate([ds.clip_phases(v) for v in range(len(ds.records))])
    report = {"split": split, "videos": len(ds.records), "motion_levels": [low, high], "percentiles": list(percentiles),
              "points": {}, "paired_bootstrap_95_points": {}}
    hits = {}
    for name, point in ((name, point) for name in weights for point in points):
        still, moving, budget = parse_point(point)
        served = adaptive_export.ServedViTATS(weights[name], MotionBudget(low, high, still, moving))
        point = name + point
        features, kept, gmacs = [], [], []
        for clips in _clip_batches(ds):
            f, k, g = served(clips, torch.full((len(clips), 1), budget))
            features.append(f.numpy())
            kept.append(k.numpy())
            gmacs.append(g.numpy()[:, 0])
        preds = decode_videos(decoder, np.concatenate(features), ds)[0]
        hits[point] = np.stack([preds[q] == ds.targets[q] for q in HEADS], axis=1)
        k = np.concatenate(kept)
        report["points"][point] = {
            "accuracy": accuracy(preds, ds), "gmacs_per_clip": float(np.concatenate(gmacs).mean()),
            "kept_by_phase": {name: k[phases == p].mean(0).tolist()
                              for p, name in enumerate(PHASES) if (phases == p).any()}}
        print(f"{point}: {report['points'][point]}", flush=True)
    for a, b in pairs:  # per query and for the mean over queries: [difference, low, high]
        columns = {**{q: (hits[a][:, i], hits[b][:, i]) for i, q in enumerate(HEADS)},
                   "mean": (hits[a].mean(1), hits[b].mean(1))}
        report["paired_bootstrap_95_points"][f"{a} - {b}"] = {
            q: [100 * float(x) for x in (ha.mean() - hb.mean(), *paired_bootstrap(ha, hb))]
            for q, (ha, hb) in columns.items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--split", default="val_large")
    parser.add_argument("--points", nargs="+", default=["1:1@0.5", "1:1@0.35", "1:1@0.25", "1.25:0.5@0.5",
                                                         "1.25:0.5@0.35", "1.25:0.5@0.25"])
    parser.add_argument("--percentiles", type=float, nargs=2, default=(35.0, 70.0))
    parser.add_argument("--pairs", nargs="*", default=["1.25:0.5@0.25-1:1@0.25", "1.25:0.5@0.25-1:1@0.5"],
                        help="A-B: point A minus point B, paired by video")
    parser.add_argument("--spread-steps", type=int, nargs="+", default=[0],
                        help="the weights screened: served (0) and served distilled N steps more at the motion budgets")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    pairs = [tuple(p.split(" - ")) if " - " in p else tuple(p.split("-")) for p in args.pairs]
    report = screen(args.data_dir, args.split, args.points, tuple(args.percentiles), pairs, args.spread_steps)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
