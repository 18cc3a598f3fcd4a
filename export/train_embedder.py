"""Train the frame embedder self-supervised with CARL's sequence contrastive loss.

    python -m export.train_embedder --data runs/r11 --out runs/r11/embedder --steps 1200
    python -m export.train_embedder --data runs/r11 --out runs/r11/cnn_only --no-context --steps 1000

Views: two temporal crops of one training video ([T, 1.5T] frames, at least 20% overlap), T
frames sampled at random inside each and kept in order, each view rendered over a DIFFERENT
background of the same routine (export/frames.py), then per-view spatial augmentation (resized
crop, flip, brightness/contrast, noise). The background pan, clutter and spinner move linearly in
time, so with one shared background the loss could match timestamps by the background alone;
over different backgrounds (each with its own pan, clutter and spinner) only the diver ties the
two views together. Positions are rotary (relative), so no absolute position reaches the
embedding either. No labels are used.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import frames as framedata
from export.models.embedder import FrameEmbedder, sequence_contrastive_loss
from export.train_loop import train_steps


def view_crops(n: int, length: int, rng: np.random.Generator, *, stretch: float = 1.5,
               overlap: float = 0.2, action: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source frame indices (length,) of two views of an n-frame video, sorted, overlapping."""
    sizes = [min(n, int(rng.integers(length, int(length * stretch) + 1))) for _ in range(2)]
    if action is not None and rng.random() < 0.75:  # mostly around the action, where phases change
        centre = int(rng.integers(action[0], action[1] + 1))
        s1 = int(np.clip(centre - rng.integers(0, sizes[0]), 0, n - sizes[0]))
    else:
        s1 = int(rng.integers(0, n - sizes[0] + 1))
    need = int(np.ceil(overlap * min(sizes)))
    lo, hi = max(0, s1 - sizes[1] + need), min(n - sizes[1], s1 + sizes[0] - need)
    s2 = int(rng.integers(lo, hi + 1)) if lo <= hi else s1
    views = []
    for start, size in ((s1, sizes[0]), (s2, sizes[1])):
        pool = np.arange(start, start + size)
        views.append(np.sort(rng.choice(pool, length, replace=size < length)))
    return views[0], views[1]


def augment(frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Temporally consistent spatial augmentation of one view (T, 56, 56, 3) uint8 -> float."""
    t, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2).float()
    size = int(rng.integers(int(0.75 * h), h + 1))
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    x = F.interpolate(x[:, :, top:top + size, left:left + size], size=(h, w), mode="bilinear",
                      align_corners=False)
    if rng.random() < 0.5:
        x = x.flip(-1)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-25, 25)
    x = x + torch.randn_like(x) * rng.uniform(0, 6)
    return x.clamp(0, 255).permute(0, 2, 3, 1)


def train(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    videos = framedata.load_split("train", framedata.TRAIN_VIDEOS, backgrounds=2, cache=args.data)
    config = dict(dim=128, layers=2, heads=4, out_dim=128, contextual=args.context, radius=16)
    model = FrameEmbedder(**config)
    if args.init:
        model.load_state_dict(torch.load(args.init / "embedder.pt", weights_only=True))
    model.train()

    def step_losses(step: int) -> dict[str, torch.Tensor]:
        views, stamps = [[], []], [[], []]
        for i in rng.integers(0, len(videos), args.batch):
            v = videos[i]
            first = rng.permutation(len(v.backgrounds)) if args.break_clocks else [0, 0]
            idx = view_crops(len(v), args.length, rng, action=(int(v.boundaries[0]), int(v.boundaries[-1])))
            for k in range(2):
                views[k].append(augment(torch.from_numpy(v.backgrounds[first[k]][idx[k]]), rng))
                stamps[k].append(torch.from_numpy(idx[k]))
        z1, z2 = (model(torch.stack(views[k])) for k in range(2))
        return dict(scl=sequence_contrastive_loss(z1, z2, torch.stack(stamps[0]), torch.stack(stamps[1]),
                                                  sigma2=args.sigma2, temperature=args.temperature))

    record = train_steps(model.parameters(), step_losses, steps=args.steps, lr=args.lr, name="embedder",
                         log_every=50)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "embedder.pt")
    previous = json.loads((args.init / "embedder.json").read_text()) if args.init else None
    (args.out / "embedder.json").write_text(json.dumps(dict(
        config=config, init=previous, length=args.length, batch=args.batch, sigma2=args.sigma2,
        temperature=args.temperature, break_clocks=args.break_clocks, seed=args.seed, **record), indent=1))
    print(f"embedder: {record['steps']} steps in {record['seconds']}s -> {args.out}", flush=True)


def load_embedder(folder: Path) -> FrameEmbedder:
    meta = json.loads((Path(folder) / "embedder.json").read_text())
    model = FrameEmbedder(**meta["config"])
    model.load_state_dict(torch.load(Path(folder) / "embedder.pt", weights_only=True))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cache folder of export.frames")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--no-context", dest="context", action="store_false",
                   help="CNN only, no positions or Transformer (CARL's ablation)")
    p.add_argument("--same-background", dest="break_clocks", action="store_false",
                   help="both views over one background (leaves the background clocks in)")
    p.add_argument("--length", type=int, default=40, help="frames per view (T)")
    p.add_argument("--batch", type=int, default=3, help="videos per step (two views each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma2", type=float, default=10.0)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", type=Path, help="start from the weights of this run folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
