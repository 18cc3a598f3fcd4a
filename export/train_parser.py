"""Train the action parser (two stages), its ablation, and the boundary-detector baseline.

    python -m export.train_parser --stage 1 --data runs/r11 --out runs/r11/parser --steps 1150
    python -m export.train_parser --stage 2 --data runs/r11 --init runs/r11/parser --out runs/r11/parser_s2
    python -m export.train_parser --stage 2 --data runs/r11 --init runs/r11/parser --out runs/r11/sps1_s2 \\
        --units 1 --no-local
    python -m export.train_parser --stage detector --data runs/r11 --init runs/r11/parser --out runs/r11/detector

Stage 1 trains everything end to end (frame CNN, SPS units, classifier) on windows of frames.
Stage 2 freezes stage 1's per-frame features and trains a temporal-conv front end, the SPS units
and the classifier on them: without the CNN in the loop a step costs ~1/50, so the local loss
gets thousands of steps in minutes. The ablation (1 SPS unit, global loss only) and the
boundary detector train on the same frozen features, so every method parses the same input.
Knobs that only post-process (change window, minimum segment length, threshold, k of k-means)
are chosen on the validation split by export/evaluate_segments.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import frames as framedata
from export import vocab
from export.models.parser import ActionParser, BoundaryDetector, boundary_loss, change_scores, local_loss
from export.train_loop import train_steps


def window_indices(video: framedata.Video, length: int, rng: np.random.Generator,
                   action_share: float = 0.75) -> np.ndarray:
    """Frame indices of a `length`-frame window.

    Most windows hold the whole action with idle on both sides (where the boundaries are); the
    rest are anywhere, so long idle stretches are seen too. Short videos repeat their last frame.
    """
    n = len(video)
    if n <= length:
        return np.minimum(np.arange(length), n - 1)
    first, last = int(video.boundaries[0]), int(video.boundaries[-1])
    lo, hi = max(0, last - length + 1), min(first, n - length)
    start = rng.integers(lo, hi + 1) if rng.random() < action_share and lo <= hi else \
        rng.integers(0, n - length + 1)
    return np.arange(start, start + length)


def load_parser(folder: Path) -> ActionParser:
    meta = json.loads((Path(folder) / "parser.json").read_text())
    model = ActionParser(**meta["config"])
    model.load_state_dict(torch.load(Path(folder) / "parser.pt", weights_only=True))
    return model.eval()


@torch.no_grad()
def frame_features(model: ActionParser, frames: np.ndarray) -> np.ndarray:
    """Stage-1 per-frame features (T, D) of one whole video at model size."""
    return model.features(torch.from_numpy(frames)[None])[0].numpy()


@torch.no_grad()
def parse_features(model: ActionParser, features: np.ndarray) -> np.ndarray:
    """Responses (T, m) of the parser's heads on one video's stage-1 features."""
    return model.heads(torch.from_numpy(features)[None])[0][0].numpy()


def _save(model: torch.nn.Module, out: Path, name: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / f"{name}.pt")
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    print(f"{name}: {meta['steps']} steps in {meta['seconds']}s -> {out}", flush=True)


def train_stage1(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    videos = framedata.load_split("train", framedata.TRAIN_VIDEOS, backgrounds=2, cache=args.data)
    config = dict(classes=len(vocab.CLASS_NAMES), dim=128, patterns=args.patterns, units=args.units)
    model = ActionParser(**config).train()

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        picks = rng.integers(0, len(videos), args.batch)
        windows, phases = [], []
        for i in picks:
            idx = window_indices(videos[i], args.window, rng)
            window = videos[i].backgrounds[rng.integers(len(videos[i].backgrounds))][idx]
            windows.append(window[:, :, ::-1] if rng.random() < 0.5 else window)
            phases.append(videos[i].phases[idx])
        responses, logits = model(torch.from_numpy(np.stack(windows).copy()))
        losses = dict(global_=args.global_weight * F.cross_entropy(logits, torch.tensor([videos[i].label for i in picks])))
        if args.local:
            losses["local"] = local_loss(responses, torch.from_numpy(np.stack(phases)), margin=args.margin)
        return losses

    record = train_steps(model.parameters(), step_losses, steps=args.steps, lr=args.lr, name="parser stage 1",
                         log_every=20)
    _save(model, args.out, "parser", dict(config=config, stage=1, window=args.window, batch=args.batch,
                                          margin=args.margin, local=args.local, global_weight=args.global_weight,
                                          seed=args.seed, **record))


def train_features(init: Path, data: Path) -> tuple[ActionParser, list[torch.Tensor], list[framedata.Video]]:
    """The stage-1 parser and its frozen features of every training video over each background
    (one sequence per video and background), cached in the stage-1 folder."""
    stage1 = load_parser(init)
    videos = framedata.load_split("train", framedata.TRAIN_VIDEOS, backgrounds=2, cache=data)
    owners = [v for v in videos for _ in v.backgrounds]
    cache = Path(init) / "train_features.npy"
    if cache.exists() and cache.stat().st_mtime > (Path(init) / "parser.pt").stat().st_mtime:
        flat = np.load(cache)
    else:
        flat = np.concatenate([frame_features(stage1, bg) for v in videos for bg in v.backgrounds])
        np.save(cache, flat)
    bounds = np.cumsum([len(v) for v in owners])[:-1]
    return stage1, [torch.from_numpy(f) for f in np.split(flat, bounds)], owners


def train_stage2(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    stage1, feats, videos = train_features(args.init, args.data)
    meta1 = json.loads((args.init / "parser.json").read_text())
    config = dict(meta1["config"], units=args.units, front=args.front, scale=args.scale)
    model = ActionParser(**config)
    model.features.load_state_dict(stage1.features.state_dict())
    if args.units == meta1["config"]["units"] and not args.fresh:  # the SPS units carry on from stage 1
        model.units.load_state_dict(stage1.units.state_dict())
        model.classifier.load_state_dict(stage1.classifier.state_dict())
    heads = [p for name, p in model.named_parameters() if not name.startswith("features.")]
    model.train()

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        picks = rng.integers(0, len(videos), args.batch)
        idx = [window_indices(videos[i], args.window, rng, args.action_share) for i in picks]
        responses, logits = model.heads(torch.stack([feats[i][j] for i, j in zip(picks, idx)]))
        losses = dict(global_=args.global_weight * F.cross_entropy(logits, torch.tensor([videos[i].label for i in picks])))
        if args.local:
            phases = torch.from_numpy(np.stack([videos[i].phases[j] for i, j in zip(picks, idx)]))
            losses["local"] = local_loss(responses, phases, margin=args.margin)
            if args.near_weight:
                losses["local_near"] = args.near_weight * local_loss(responses, phases, margin=args.margin,
                                                                     radius=args.near_radius)
        if args.boundary_weight:
            starts = torch.from_numpy(np.stack([boundary_targets(videos[i].phases[j], 0) for i, j in zip(picks, idx)]))
            losses["boundary"] = args.boundary_weight * boundary_loss(change_scores(responses, 1), starts)
        return losses

    record = train_steps(heads, step_losses, steps=args.steps, lr=args.lr, name="parser stage 2", log_every=200)
    _save(model, args.out, "parser", dict(config=config, stage=2, stage1=meta1, window=args.window,
                                          batch=args.batch, margin=args.margin, local=args.local,
                                          near_weight=args.near_weight, near_radius=args.near_radius,
                                          action_share=args.action_share,
                                          boundary_weight=args.boundary_weight,
                                          global_weight=args.global_weight, seed=args.seed, **record))


def boundary_targets(phases: np.ndarray, spread: int) -> np.ndarray:
    """1 at each sub-action start and its `spread` neighbours (TAPOS's detector labels)."""
    target = np.zeros(len(phases), np.float32)
    for b in np.flatnonzero(phases[1:] != phases[:-1]) + 1:
        target[max(0, b - spread):b + spread + 1] = 1
    return target


def train_detector(args) -> None:
    """The temporal-conv boundary detector on the stage-1 parser's frozen per-frame features."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    _, feats, videos = train_features(args.init, args.data)
    targets = [torch.from_numpy(boundary_targets(v.phases, 1)) for v in videos]
    positives = float(sum(t.sum() for t in targets) / sum(len(t) for t in targets))
    detector = BoundaryDetector(feats[0].shape[1]).train()
    pos_weight = torch.tensor((1 - positives) / positives)

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        picks = rng.integers(0, len(feats), args.batch)
        loss = sum(F.binary_cross_entropy_with_logits(detector(feats[i][None])[0], targets[i], pos_weight=pos_weight)
                   for i in picks)
        return dict(bce=loss / len(picks))

    record = train_steps(detector.parameters(), step_losses, steps=args.steps, lr=1e-3, name="detector",
                         log_every=100)
    _save(detector, args.out, "detector", dict(config=dict(dim=feats[0].shape[1]), stage1=str(args.init),
                                               batch=args.batch, seed=args.seed, **record))


def load_detector(folder: Path) -> BoundaryDetector:
    meta = json.loads((Path(folder) / "detector.json").read_text())
    detector = BoundaryDetector(**meta["config"])
    detector.load_state_dict(torch.load(Path(folder) / "detector.pt", weights_only=True))
    return detector.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("1", "2", "detector"), required=True)
    p.add_argument("--data", type=Path, required=True, help="cache folder of export.frames")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--init", type=Path, help="stage 2 and detector: the stage-1 run folder")
    p.add_argument("--steps", type=int, help="default: 1150 (stage 1), 3000 (stage 2), 1250 (detector)")
    p.add_argument("--units", type=int, default=2)
    p.add_argument("--patterns", type=int, default=8)
    p.add_argument("--no-front", dest="front", action="store_false", help="stage 2 without the temporal-conv front end")
    p.add_argument("--fresh", action="store_true", help="stage 2: new SPS units and classifier, not stage 1's")
    p.add_argument("--scale", type=float, help="SPS attention as scale * cosine (bounded responses)")
    p.add_argument("--no-local", dest="local", action="store_false", help="global loss only (ablation)")
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--near-weight", type=float, default=0.0,
                   help="stage 2: weight of the local loss on frames at most --near-radius apart")
    p.add_argument("--near-radius", type=int, default=2)
    p.add_argument("--boundary-weight", type=float, default=0.0,
                   help="stage 2: weight of a boundary loss on the pattern-change score (beyond the paper)")
    p.add_argument("--global-weight", type=float, default=0.2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--action-share", type=float, default=0.75,
                   help="stage 2: share of windows that hold the whole action (the rest fall anywhere)")
    p.add_argument("--batch", type=int, help="default: 8 (stages), 16 (detector)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1: on a crowded machine, threads of one op wait for the slowest")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage != "1" and args.init is None:
        p.error("--init (the stage-1 run) is required for stage 2 and the detector")
    args.steps = args.steps or {"1": 1150, "2": 3000, "detector": 1250}[args.stage]
    args.batch = args.batch or (16 if args.stage == "detector" else 8)
    {"1": train_stage1, "2": train_stage2, "detector": train_detector}[args.stage](args)


if __name__ == "__main__":
    main()
