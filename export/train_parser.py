"""Train the action parser (or its ablation), then the boundary-detector baseline on its features.

    python -m export.train_parser --data runs/r11 --out runs/r11/parser --minutes 14
    python -m export.train_parser --data runs/r11 --out runs/r11/sps1 --units 1 --no-local --minutes 14
    python -m export.train_parser --data runs/r11 --out runs/r11/parser --detector --minutes 4

Training is time-boxed: the learning rate follows a cosine over the wall-clock budget, so a
budget always ends annealed. Knobs that only post-process (minimum segment length, detector
threshold, k of k-means) are chosen on the validation split by export/evaluate_segments.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import frames as framedata
from export import vocab
from export.models.parser import ActionParser, BoundaryDetector, local_loss

TRAIN_VIDEOS = 320
VAL_VIDEOS = 100
TEST_VIDEOS = 100


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


def sample_window(video: framedata.Video, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A window (frames, phases) from a random background of the video, flipped half the time."""
    idx = window_indices(video, length, rng)
    window = video.backgrounds[rng.integers(len(video.backgrounds))][idx]
    if rng.random() < 0.5:
        window = window[:, :, ::-1]
    return window, video.phases[idx]


def batches(videos, length: int, batch: int, rng: np.random.Generator):
    while True:
        picks = rng.integers(0, len(videos), batch)
        items = [sample_window(videos[i], length, rng) for i in picks]
        yield (torch.from_numpy(np.stack([w for w, _ in items]).copy()),
               torch.from_numpy(np.stack([p for _, p in items])),
               torch.tensor([videos[i].label for i in picks]))


def cosine_lr(optimizer, base: float, progress: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_parser(args) -> None:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    videos = framedata.load_split("train", TRAIN_VIDEOS, backgrounds=2, cache=args.data)
    config = dict(classes=len(vocab.CLASS_NAMES), dim=128, patterns=args.patterns, units=args.units)
    model = ActionParser(**config)
    if args.resume:
        model.load_state_dict(torch.load(args.out / "parser.pt", weights_only=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    start, step = time.monotonic(), 0
    budget = args.minutes * 60
    log = []
    for frames, phases, labels in batches(videos, args.window, args.batch, rng):
        progress = (time.monotonic() - start) / budget
        if progress >= 1:
            break
        cosine_lr(optimizer, args.lr, progress)
        responses, logits, _ = model.parse_small(frames)
        glob = F.cross_entropy(logits, labels)
        loc = local_loss(responses, phases, margin=args.margin) if args.local else glob * 0
        loss = loc + args.global_weight * glob
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 20 == 0:
            log.append(dict(step=step, seconds=round(time.monotonic() - start), local=float(loc),
                            global_=float(glob)))
            print(f"step {step} {time.monotonic() - start:.0f}s local {float(loc):.3f} "
                  f"global {float(glob):.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "parser.pt")
    (args.out / "parser.json").write_text(json.dumps(dict(
        config=config, resumed=args.resume, steps=step, seconds=round(time.monotonic() - start), window=args.window,
        batch=args.batch, lr=args.lr, margin=args.margin, local=args.local,
        global_weight=args.global_weight, seed=args.seed, log=log), indent=1))
    print(f"parser: {step} steps in {time.monotonic() - start:.0f}s -> {args.out}", flush=True)


FRAMES_INPUT = "frames"  # (B, T, 112, 112, 3) uint8, as the server decodes


def export_onnx(model: torch.nn.Module, path: Path, output_names: tuple[str, ...], frames: int = 20) -> Path:
    """torch -> ONNX with dynamic batch and time axes; the input is served uint8 frames."""
    model.eval()
    example = torch.randint(0, 256, (1, frames, framedata.SERVED_SIZE, framedata.SERVED_SIZE, 3),
                            dtype=torch.uint8)
    dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("time", min=2, max=4096)}
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18,
                                input_names=[FRAMES_INPUT], output_names=list(output_names),
                                dynamic_shapes={"frames": dims}, optimize=True, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def onnx_max_difference(model: torch.nn.Module, path: Path, frames: np.ndarray) -> float:
    """Largest |torch - ONNX Runtime| over all outputs for one input (B, T, 112, 112, 3) uint8."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(frames))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(None, {FRAMES_INPUT: frames})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


def served_frames(video: framedata.Video) -> np.ndarray:
    """A cached 28 px video blown up to the served 112 px (each pixel a 4x4 block), for checks."""
    return np.repeat(np.repeat(video.frames, 4, axis=1), 4, axis=2)[None]


PARSER_OUTPUTS = ("responses", "class_logits")


def load_parser(folder: Path) -> ActionParser:
    meta = json.loads((Path(folder) / "parser.json").read_text())
    model = ActionParser(**meta["config"])
    model.load_state_dict(torch.load(Path(folder) / "parser.pt", weights_only=True))
    return model.eval()


@torch.no_grad()
def frame_features(model: ActionParser, video_frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(responses (T, m), input features (T, D)) of one whole video at model size."""
    responses, _, features = model.parse_small(torch.from_numpy(video_frames)[None])
    return responses[0].numpy(), features[0].numpy()


def boundary_targets(phases: np.ndarray, spread: int) -> np.ndarray:
    """1 at each sub-action start and its `spread` neighbours (TAPOS's detector labels)."""
    target = np.zeros(len(phases), np.float32)
    for b in np.flatnonzero(phases[1:] != phases[:-1]) + 1:
        target[max(0, b - spread):b + spread + 1] = 1
    return target


def train_detector(args) -> None:
    """The temporal-conv boundary detector on the parser's frozen per-frame features."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    parser = load_parser(args.out)
    videos = framedata.load_split("train", TRAIN_VIDEOS, backgrounds=2, cache=args.data)[:args.detector_videos]
    start = time.monotonic()
    feats = [frame_features(parser, v.frames)[1] for v in videos]
    targets = [boundary_targets(v.phases, 1) for v in videos]
    print(f"detector: features of {len(feats)} sequences in {time.monotonic() - start:.0f}s", flush=True)
    positives = sum(t.sum() for t in targets) / sum(len(t) for t in targets)
    detector = BoundaryDetector(feats[0].shape[1])
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3, weight_decay=1e-4)
    pos_weight = torch.tensor((1 - positives) / positives)
    budget, t0, step = args.minutes * 60, time.monotonic(), 0
    while (progress := (time.monotonic() - t0) / budget) < 1:
        cosine_lr(optimizer, 1e-3, progress)
        loss = 0
        for i in rng.integers(0, len(feats), 16):
            logits = detector(torch.from_numpy(feats[i])[None])[0]
            loss = loss + F.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets[i]),
                                                             pos_weight=pos_weight)
        optimizer.zero_grad()
        (loss / 16).backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"detector step {step} loss {float(loss) / 16:.3f}", flush=True)
    torch.save(detector.state_dict(), args.out / "detector.pt")
    print(f"detector: {step} steps in {time.monotonic() - t0:.0f}s", flush=True)


def train_heads(args) -> None:
    """Stage 2: the SPS units and classifier alone, on the frozen per-frame features of the
    stage-1 parser in --init. Without the CNN in the loop a step costs ~1/50, so the local loss
    gets thousands of steps in minutes."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = load_parser(args.init)
    meta = json.loads((args.init / "parser.json").read_text())
    videos = framedata.load_split("train", TRAIN_VIDEOS, backgrounds=2, cache=args.data)
    start = time.monotonic()
    feats = [torch.from_numpy(frame_features(model, v.frames)[1]) for v in videos]
    print(f"heads: features of {len(feats)} videos in {time.monotonic() - start:.0f}s", flush=True)
    heads = [*model.units.parameters(), *model.classifier.parameters()]
    optimizer = torch.optim.AdamW(heads, lr=args.lr, weight_decay=1e-4)
    model.units.train()
    start, step, budget, log = time.monotonic(), 0, args.minutes * 60, []
    while (progress := (time.monotonic() - start) / budget) < 1:
        cosine_lr(optimizer, args.lr, progress)
        picks = rng.integers(0, len(videos), args.batch)
        idx = [window_indices(videos[i], args.window, rng) for i in picks]
        x = torch.stack([feats[i][j] for i, j in zip(picks, idx)])
        phases = torch.from_numpy(np.stack([videos[i].phases[j] for i, j in zip(picks, idx)]))
        labels = torch.tensor([videos[i].label for i in picks])
        responses = None
        for unit in model.units:
            x, responses = unit(x)
        glob = F.cross_entropy(model.classifier(x.mean(dim=1)), labels)
        loc = local_loss(responses, phases, margin=args.margin) if args.local else glob * 0
        loss = loc + args.global_weight * glob
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % 200 == 0:
            log.append(dict(step=step, seconds=round(time.monotonic() - start), local=loc.item(),
                            global_=glob.item()))
            print(f"heads step {step} {time.monotonic() - start:.0f}s local {loc.item():.3f} "
                  f"global {glob.item():.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "parser.pt")
    (args.out / "parser.json").write_text(json.dumps(dict(
        config=meta["config"], stage1=meta, stage2=dict(steps=step, seconds=round(time.monotonic() - start),
                                                        window=args.window, batch=args.batch, lr=args.lr,
                                                        local=args.local, log=log)), indent=1))
    print(f"heads: {step} steps in {time.monotonic() - start:.0f}s -> {args.out}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="cache folder of export.frames")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=14.0)
    p.add_argument("--units", type=int, default=2)
    p.add_argument("--patterns", type=int, default=8)
    p.add_argument("--no-local", dest="local", action="store_false", help="global loss only (ablation)")
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--global-weight", type=float, default=0.2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="1: on a crowded machine, threads of one op wait for the slowest")
    p.add_argument("--resume", action="store_true", help="start from the weights in --out")
    p.add_argument("--detector-videos", type=int, default=120)
    p.add_argument("--detector", action="store_true", help="train the boundary-detector baseline")
    p.add_argument("--export-onnx", type=Path, help="export the trained parser in --out to this file")
    p.add_argument("--init", type=Path, help="stage 2: train the heads on the frozen features of this run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.export_onnx:
        model = load_parser(args.out)
        path = export_onnx(model, args.export_onnx, PARSER_OUTPUTS)
        video = framedata.load_split("val", VAL_VIDEOS, cache=args.data)[0]
        print(f"{path}: max |torch - onnxruntime| on a validation video "
              f"{onnx_max_difference(model, path, served_frames(video)):.2e}")
    elif args.detector:
        train_detector(args)
    elif args.init:
        train_heads(args)
    else:
        train_parser(args)


if __name__ == "__main__":
    main()
