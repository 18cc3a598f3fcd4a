"""Per-clip count specialists (issue 8): the cheap, decisive test of whether an encoder or a
rendering lets a model read the twist, before any full-recipe screen on validation.

`python -m export.count_specialist NAME [--input full|crop|learned-crop|zoom] [--crop PX] [--crop-per-clip]
[--stem default|difference|fine] [--zoom-variant NAME] [--routines N] [--steps S] [--seed K]` renders N
routines whose flights are drawn attribute by attribute (`synth`'s `free_flight_share` = 1, the short split's
durations, seeds of their own), keeps the 8-frame clips that lie wholly in flight (each through an
H.264 round trip in memory, as the datasets are), trains a fresh clip encoder with a somersault and
a twist head on them, and scores it on the all-flight clips of 300 held-out free flights and of the
counterfactual grid (`diagnose_counts.grid_routines`: the table's flights re-drawn with every
count, so the pose and the class table give nothing away; chance 20% per count). One JSON line is
appended to runs/count_specialist.jsonl; the rendered clips are cached in runs/, and the trained
encoder is saved as runs/count_specialist_NAME.pt (`export.count_study --init-encoder` starts from it).

`--input crop` feeds each frame's PX-px window (default 32) around the torso's middle (the
generator's own geometry, `synth._Scene.figure_pixels`) scaled up to 112 px: the figure found and
magnified 112/PX times. It is the control for the harness itself (if a specialist cannot read the
twist from that, the training set-up is at fault, not the encoder or the rendering), and with
`--crop-per-clip` (one window per clip, at the torso's mean position over its 8 frames, so the
figure moves inside it as it does in the video) it stands for an encoder that finds the diver once
per clip and looks closer. `--input learned-crop` finds the window itself (`FigureZoom`): no
geometry at test time, the generator's torso positions only as the localiser's training target.
`--input zoom` trains the servable version of that idea, the `s3d_zoom` encoder
(`export.models.s3d_zoom`: the full frame's s3d, a localiser on its stem, a window stream on a
32-px window cut once per clip), on the full frames; its localiser learns the same target.

`python -m export.count_specialist NAME --probe MODEL` trains nothing: it fits linear probes on the
frozen clip features of MODEL's encoder (an `export.count_study` or `vqs models` save) over 2,000 of
the free-flight training clips and scores them on the held-out free flights and the grid. Does the
encoder carry the counts where the class table gives nothing away, whatever its decoder answers?
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export import REPO, build, data, diagnose_counts, parallel, synth, train, vocab
from export.models import s3d, s3d_zoom

COUNTS = ("somersaults", "twists")
HELD_OUT_SEED = 1_000_000  # held-out free flights: seeds far from the training routines'
HELD_OUT_ROUTINES = 300
PROBE_FIT_CLIPS = 2000
CROP = 32  # px around the torso's middle, as rendered at 112 px
STEMS = {"default": {}, "difference": {"stem_difference": True}, "fine": {"stem_patch": 4, "stem_pool": 2}}
ENCODERS = ("s3d", "figure-zoom", "s3d-zoom")  # the last two localise the figure and learn its position
INPUT_ENCODERS = {"learned-crop": "figure-zoom", "zoom": "s3d-zoom"}  # --input's encoder where not s3d


def free_routine(seed: int) -> synth.Routine:
    _, _, _, lo, hi = build.SPLITS["short"]
    return synth.sample_routine(np.random.default_rng([seed, 0]), seed, None, lo, hi, free_flight_share=1.0)


def _h264_round_trip(frames: list[np.ndarray]) -> np.ndarray:
    buffer = io.BytesIO()
    synth.encode(frames, buffer, data.FRAME_SIZE, data.FRAME_SIZE, build.FPS, "h264")
    buffer.seek(0)
    with av.open(buffer) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def flight_clips(routines: list[synth.Routine], per_routine: int = 2) -> dict[str, np.ndarray]:
    """Up to `per_routine` clips wholly in flight per routine, aligned as the datasets' clips are:
    "clips" (N, 8, 112, 112, 3) uint8 decoded from H.264, "torso" (N, 8, 2) the torso's middle
    (x, y) per frame, and one target index per count (vocab.ATTRIBUTES order)."""
    size, n = data.FRAME_SIZE, data.CLIP_FRAMES
    clips, torso, targets = [], [], {q: [] for q in COUNTS}
    for routine in routines:
        scene = synth._Scene(routine, size, size, build.FPS)
        phases = np.asarray(synth.labels_for(routine, build.FPS)["phases"])
        whole = [c for c in range(len(phases) // n) if (phases[c * n:(c + 1) * n] == diagnose_counts.FLIGHT).all()]
        for c in whole[:per_routine]:
            frames = range(c * n, (c + 1) * n)
            clips.append(_h264_round_trip([scene.frame(i) for i in frames]))
            middles = []
            for i in frames:
                at, _ = scene.figure_pixels(i / build.FPS)
                middles.append((np.asarray(at["hip"]) + at["neck"]) / 2)
            torso.append(middles)
            for q in COUNTS:
                targets[q].append(vocab.ATTRIBUTES[q].index(routine.labels[q]))
    return {"clips": np.stack(clips), "torso": np.asarray(torso, np.float32),
            **{q: np.asarray(t) for q, t in targets.items()}}


def torso_crops(clips: np.ndarray, torso: np.ndarray, crop: int = CROP, per_clip: bool = False) -> np.ndarray:
    """Each frame's crop x crop window centred on the torso's middle (edges repeated), scaled to the
    frame size; `per_clip`: every frame of a clip cut at the torso's mean position over the clip."""
    if per_clip:
        torso = np.repeat(torso.mean(1, keepdims=True), torso.shape[1], 1)
    size, half = clips.shape[2], crop // 2
    padded = np.pad(clips, ((0, 0), (0, 0), (half, half), (half, half), (0, 0)), mode="edge")
    out = np.empty_like(clips)
    for i, j in np.ndindex(*clips.shape[:2]):
        x, y = np.round(torso[i, j]).astype(int).clip(0, size - 1) + half
        out[i, j] = cv2.resize(padded[i, j, y - half:y + half, x - half:x + half], (size, size),
                               interpolation=cv2.INTER_LINEAR)
    return out


class FigureZoom(nn.Module):
    """A clip encoder that finds the diver and looks closer: a small per-frame localiser (2D CNN to a
    14 x 14 heatmap on the stride-8 grid; its soft-argmax is the window's centre) and a `crop`-px
    window there, scaled to the frame size (bilinear), given to a clip encoder
    (`train.build_encoder(**encoder_options)`). The window follows the detached centre: the
    localiser learns only from its own target (`localiser_loss`)."""

    def __init__(self, *, crop: int = CROP, frame_size: int = data.FRAME_SIZE, **encoder_options):
        super().__init__()
        self.crop, self.frame_size = crop, frame_size
        self.register_buffer("mean", torch.tensor(s3d.PIXEL_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(s3d.PIXEL_STD).view(1, 3, 1, 1) * 255)
        self.localiser = nn.Sequential(
            nn.Conv2d(3, 16, 5, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 1, 1),
        )
        self.grid = frame_size // 8
        centres = torch.arange(self.grid).float() * 8 + 3.5  # px, the middle of each 8-px cell
        self.register_buffer("cell_x", centres.repeat(self.grid))
        self.register_buffer("cell_y", centres.repeat_interleave(self.grid))
        self.encoder = train.build_encoder(**encoder_options)
        self.feature_dim = self.encoder.feature_dim

    def locate(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (N, H, W, 3) -> heatmap logits (N, grid * grid) and centres (N, 2) in px."""
        x = (frames.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits = self.localiser(x).flatten(1)
        p = logits.softmax(-1)
        return logits, torch.stack([p @ self.cell_x, p @ self.cell_y], -1)

    def window(self, frames: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """The crop x crop window at each frame's centre, scaled to the frame size: (N, H, W, 3) float."""
        n, h, w, _ = frames.shape
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = self.crop / w, self.crop / h
        theta[:, 0, 2], theta[:, 1, 2] = (2 * centres[:, 0] + 1) / w - 1, (2 * centres[:, 1] + 1) / h - 1
        grid = F.affine_grid(theta, (n, 3, self.frame_size, self.frame_size), align_corners=False)
        x = frames.permute(0, 3, 1, 2).float()
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False).permute(0, 2, 3, 1)

    def forward_with_heatmap(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, D), heatmap logits (B*T, grid * grid) and centres (B*T, 2) px, frame by frame."""
        b, t = clips.shape[:2]
        frames = clips.reshape(b * t, *clips.shape[2:])  # B*T, H, W, 3
        logits, centres = self.locate(frames)
        windows = self.window(frames, centres.detach()).reshape(b, t, self.frame_size, self.frame_size, 3)
        return self.encoder(windows), logits, centres

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_with_heatmap(clips)[0]

    def localiser_loss(self, logits: torch.Tensor, torso: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the heatmap against the cell holding the torso's middle (N, 2) px."""
        cell = (torso // 8).long().clamp(0, self.grid - 1)
        return F.cross_entropy(logits, cell[:, 1] * self.grid + cell[:, 0])


def _cached(name: str, routines) -> dict[str, np.ndarray]:
    path = REPO / "runs" / f"count_specialist_{name}.npz"
    if path.exists():
        with np.load(path) as z:
            return dict(z)
    made = flight_clips(routines())
    path.parent.mkdir(exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), **made)
    os.replace(path.with_suffix(".tmp.npz"), path)  # a half-written cache is never read
    return made


def specialist_bank(routines: int = 3000) -> dict[str, np.ndarray]:
    """The specialists' training clips: `flight_clips` of `routines` free flights (cached in runs/)."""
    return _cached(f"train{routines}", lambda: [free_routine(s) for s in range(routines)])


BANK_ARRAYS = ("clips", "torso", *COUNTS)


def _flight_clips_of(seeds: range) -> dict[str, np.ndarray]:
    return flight_clips([free_routine(s) for s in seeds])


def write_flight_bank(folder: Path, routines: int, workers: int = 2) -> Path:
    """`flight_clips` of free flights 0..routines-1 (the specialists' training clips) as .npy files
    in `folder`, rendered by `workers` processes; reused when `folder` holds that many routines'."""
    folder = Path(folder)
    spec = {"routines": routines, "generator_version": synth.GENERATOR_VERSION}
    if (folder / "bank.json").exists() and json.loads((folder / "bank.json").read_text()) == spec:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [range(s, min(s + 100, routines)) for s in range(0, routines, 100)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_flight_clips_of, chunks)
    for name in BANK_ARRAYS:
        np.save(folder / f"{name}.npy", np.concatenate([p[name] for p in parts]))
    (folder / "bank.json").write_text(json.dumps(spec) + "\n")  # written last: a half-made bank is rebuilt
    return folder


def read_flight_bank(folder: Path) -> dict[str, np.ndarray]:
    """A `write_flight_bank` folder; its clips memory-mapped, not read."""
    return {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r" if name == "clips" else None)
            for name in BANK_ARRAYS}


def mirror_and_reverse(clips: np.ndarray, torso: np.ndarray, mirror: np.ndarray,
                       reverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clips (N, T, H, W, 3) left-right mirrored where `mirror` and played backwards where `reverse`,
    with their torso positions (N, T, 2) moved along. Both keep the counts (a rotation seen in a
    mirror or backwards turns the other way as many times), so they cost a specialist nothing but
    stop it from remembering clips."""
    clips, torso = clips.copy(), torso.copy()
    clips[mirror] = clips[mirror][:, :, :, ::-1]
    torso[mirror, :, 0] = clips.shape[3] - 1 - torso[mirror, :, 0]
    clips[reverse] = clips[reverse][:, ::-1]
    torso[reverse] = torso[reverse][:, ::-1]
    return clips, torso


def specialist_loss(encoder: nn.Module, heads: nn.ModuleList, bank: dict[str, np.ndarray],
                    idx: np.ndarray, augment: np.random.Generator | None = None,
                    window_at_torso: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The specialists' loss on the bank's clips `idx`: the localiser's against the bank's torso
    positions (encoders that localise), plus each count head's cross-entropy; and each head's logits.
    `augment`: each clip mirrored and reversed each at even odds drawn from it. `window_at_torso`
    (`s3d_zoom` only): its window cut at the clip's mean torso position, not the localiser's."""
    clips, torso = bank["clips"][idx], bank["torso"][idx]
    if augment is not None:
        clips, torso = mirror_and_reverse(clips, torso, augment.random(len(idx)) < 0.5, augment.random(len(idx)) < 0.5)
    clips, torso = torch.from_numpy(np.ascontiguousarray(clips)), torch.from_numpy(np.ascontiguousarray(torso))
    if hasattr(encoder, "localiser_loss"):
        forced = {"window_at": torso.mean(1)} if window_at_torso else {}
        features, heatmaps, _ = encoder.forward_with_heatmap(clips, **forced)
        loss = encoder.localiser_loss(heatmaps, torso.reshape(-1, 2))
    else:
        features, loss = encoder(clips), torch.zeros(())
    logits = [head(features) for head in heads]
    for head_logits, q in zip(logits, COUNTS):
        loss = loss + F.cross_entropy(head_logits, torch.from_numpy(bank[q][idx]))
    return loss, logits


@torch.inference_mode()
def score(encoder: nn.Module, heads: nn.ModuleList, bank: dict[str, np.ndarray], batch: int = 64) -> dict[str, float]:
    encoder.eval()
    features = _features(encoder, bank["clips"], batch)
    encoder.train()
    return {q: round(float((head(features).argmax(-1).numpy() == bank[q]).sum() / len(bank["clips"])), 3)
            for head, q in zip(heads, COUNTS)}


@torch.inference_mode()
def _features(encoder: nn.Module, clips: np.ndarray, batch: int = 48) -> torch.Tensor:
    return torch.cat([encoder(torch.from_numpy(np.asarray(clips[s:s + batch]))) for s in range(0, len(clips), batch)])


def frozen_probe(encoder: nn.Module, banks: dict[str, dict[str, np.ndarray]],
                 fit_clips: int = PROBE_FIT_CLIPS) -> dict:
    """Per count, the accuracy on banks["held_out_free"] and banks["grid"] of a linear probe
    (`diagnose_counts.logistic_probe`) of the encoder's frozen features, fitted on `fit_clips` of banks["train"]."""
    encoder.eval()
    fit = np.sort(np.random.default_rng(0).choice(len(banks["train"]["clips"]), fit_clips, replace=False))
    x_fit = _features(encoder, banks["train"]["clips"][fit])
    out = {"fit_clips": fit_clips}
    for k in ("held_out_free", "grid"):
        x = _features(encoder, banks[k]["clips"])
        out[k] = {}
        for q in COUNTS:
            pred = diagnose_counts.logistic_probe(x_fit, banks["train"][q][fit], x, len(vocab.ATTRIBUTES[q]))
            out[k][q] = round(float((pred == banks[k][q]).mean()), 3)
    return out


def localiser_error(zoom: FigureZoom | s3d_zoom.S3DZoom, bank: dict[str, np.ndarray], batch: int = 64) -> float:
    """Mean distance (px) between the learned window centres and the torso's middle over a bank: per
    frame for a `FigureZoom`, per clip (against the torso's mean position over the clip) for `s3d_zoom`."""
    zoom.eval()
    errors = []
    with torch.inference_mode():
        for s in range(0, len(bank["clips"]), batch):
            centres = zoom.forward_with_heatmap(torch.from_numpy(bank["clips"][s:s + batch]))[2]
            torso = torch.from_numpy(bank["torso"][s:s + batch])
            torso = torso.reshape(-1, 2) if isinstance(zoom, FigureZoom) else torso.mean(1)
            errors.append((centres - torso).norm(dim=-1))
    zoom.train()
    return round(float(torch.cat(errors).mean()), 2)


def train_specialist(bank: dict[str, np.ndarray], *, stem: str = "default", encoder: str = "s3d",
                     zoom_variant: str = diagnose_counts.ZOOM_VARIANT, steps: int = 1500, batch: int = 24,
                     lr: float = 1e-3, seed: int = 0, log_every: int = 100, augment: bool = False,
                     forced_window_steps: int = 0,
                     shard: parallel.Shard = parallel.SINGLE) -> tuple[nn.Module, nn.ModuleList]:
    """A fresh encoder (one of ENCODERS; "figure-zoom" is a `FigureZoom` and "s3d-zoom" the
    `s3d_zoom` encoder (`zoom_variant`), whose localisers learn the bank's "torso" positions) and one linear head per
    count, cross-entropy on both, AdamW with a one-cycle learning rate. `shard`: this process's share
    of every batch when it trains data-parallel (`export.parallel`); `augment`: clips mirrored and
    reversed at random (`mirror_and_reverse`), from a stream of their own seeded by `seed` and the rank;
    `forced_window_steps`: for that many first steps an `s3d_zoom` cuts its window at the torso's
    true position (`specialist_loss`'s `window_at_torso`) while its localiser learns to find it."""
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {sorted(STEMS)}")
    if encoder not in ENCODERS or (encoder == "s3d-zoom" and stem != "default"):
        raise ValueError(f"unknown encoder {encoder!r} (choose one of {ENCODERS}; s3d-zoom has the default stem)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    flips = np.random.default_rng([seed, shard.rank, 1]) if augment else None
    encoder = {"s3d": lambda: train.build_encoder(**STEMS[stem]), "figure-zoom": lambda: FigureZoom(**STEMS[stem]),
               "s3d-zoom": lambda: s3d_zoom.create(zoom_variant)}[encoder]()
    heads = nn.ModuleList(nn.Linear(encoder.feature_dim, len(vocab.ATTRIBUTES[q])) for q in COUNTS)
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    encoder.train()
    hits, seen, start = np.zeros(len(COUNTS)), 0, time.monotonic()
    for step in range(1, steps + 1):
        idx = shard.take(rng.choice(len(bank["clips"]), batch, replace=False))
        loss, logits = specialist_loss(encoder, heads, bank, idx, flips, window_at_torso=step <= forced_window_steps)
        for k, q in enumerate(COUNTS):
            hits[k] += int((logits[k].argmax(-1) == torch.from_numpy(bank[q][idx])).sum())
        seen += len(idx)
        opt.zero_grad()
        loss.backward()
        parallel.average_gradients([*encoder.parameters(), *heads.parameters()], shard)
        opt.step()
        sched.step()
        if step % log_every == 0 and shard.leads:
            accuracy = " ".join(f"{q} {h / seen:.2f}" for q, h in zip(COUNTS, hits))
            print(f"specialist step {step}: train {accuracy} ({time.monotonic() - start:.0f} s)", flush=True)
            hits[:], seen = 0, 0
    parallel.average_buffers(encoder, shard)
    return encoder, heads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--input", choices=("full", "crop", "learned-crop", "zoom"), default="full")
    parser.add_argument("--crop", type=int, default=CROP, help="window side in px with --input crop")
    parser.add_argument("--crop-per-clip", action="store_true", help="one crop window per clip, not per frame")
    parser.add_argument("--stem", choices=sorted(STEMS), default="default")
    parser.add_argument("--zoom-variant", choices=sorted(s3d_zoom.VARIANTS), default=diagnose_counts.ZOOM_VARIANT,
                        help="the s3d_zoom variant with --input zoom")
    parser.add_argument("--routines", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--augment", action="store_true", help="mirror and reverse training clips at random")
    parser.add_argument("--forced-window-steps", type=int, default=0,
                        help="with --input zoom: first steps whose window is cut at the torso's true position")
    parser.add_argument("--probe", metavar="MODEL", help="probe MODEL's frozen encoder instead of training one")
    args = parser.parse_args()
    torch.set_num_threads(train.TRAIN_THREADS)
    banks = {
        "train": specialist_bank(args.routines),
        "held_out_free": _cached(f"held{HELD_OUT_ROUTINES}", lambda: [
            free_routine(HELD_OUT_SEED + s) for s in range(HELD_OUT_ROUTINES)]),
        "grid": _cached("grid", diagnose_counts.grid_routines),
    }
    if args.input == "crop":
        banks = {k: {**b, "clips": torso_crops(b["clips"], b["torso"], args.crop, args.crop_per_clip)}
                 for k, b in banks.items()}
    start = time.monotonic()
    record = {"name": args.name, "args": vars(args), "threads": train.TRAIN_THREADS,
              "clips": {k: len(b["clips"]) for k, b in banks.items()}}
    if args.probe:
        record["probe"] = frozen_probe(diagnose_counts.load_tqn(args.probe)[0], banks)
    else:
        encoder, heads = train_specialist(banks["train"], stem=args.stem, steps=args.steps, seed=args.seed,
                                          encoder=INPUT_ENCODERS.get(args.input, "s3d"), zoom_variant=args.zoom_variant,
                                          augment=args.augment, forced_window_steps=args.forced_window_steps)
        record.update({k: score(encoder, heads, banks[k]) for k in ("held_out_free", "grid")})
        if args.input in ("learned-crop", "zoom"):
            record["grid_localiser_error_px"] = localiser_error(encoder, banks["grid"])
        torch.save({"args": vars(args), "encoder": encoder.state_dict()},
                   REPO / "runs" / f"count_specialist_{args.name}.pt")
    record.update(train_seconds=round(time.monotonic() - start), load_average=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(record), flush=True)
    with open(REPO / "runs" / "count_specialist.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
