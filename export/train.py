"""Training on CPU: a shared warm-up, then TQN and the paper's two baselines (the stages as
`vqs models` runs them, and the count pre-training before them: `export.recipe`).

Curriculum (TQN paper §3.2 and appendix D):
1. warm-up: encoder + TQN decoder + average-pooling head + per-clip head trained end to end on
   short videos, where every clip fits in one step;
2. TQN and the average-pooling baseline each go on from there with the stochastically updated
   feature bank on the full-length videos: per video, n_online random contiguous clips are
   recomputed with gradients and written back, the others come from the bank;
3. the short-term baseline goes on from the warm-up encoder on single clips labelled with their
   video's answers (probabilities averaged over clips at test).
All three start from the same warm-up, so no model gets a head start over the others, and after
it each gets the same number of clip gradients (`Budget.clip_gradients`) and the same key/value
MLP in front of its classifiers.

Controls (`recipe.controls`), same harness and budget: a single-frame model (a per-frame 2D encoder,
max over frames, TQN decoder) and TQN trained and tested on frame-shuffled videos. Neither can
see motion, so on somersaults and twists they must stay near chance if the data has no static
shortcut.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from export import vocab
from export.data import CLIP_FRAMES, NO_TARGET, ClipDataset, shuffle_frames
from export.models.baselines import AveragePooling, ShortTerm
from export.models import s3d_zoom
from export.models.s3d import S3D
from export.models.s3d_zoom import S3DZoom
from export.models.tqn import TQNDecoder
from export.parallel import SINGLE, Shard, average_buffers, average_gradients

HEADS = vocab.head_attributes()
# Part of what makes training reproducible (the split of every reduction follows it). One thread:
# on the 2 shared cores under load two threads wait on each other at every barrier (50 warm-up
# steps took 311 s at load average 13-15, against 15 s on a quiet machine).
TRAIN_THREADS = 1
# Likewise: the count pre-training and the warm-up split every batch over this many processes
# (`export.parallel`, `export.recipe`), which decides how gradients are summed.
TRAIN_PROCESSES = 2
# The served clip encoder: the full-frame s3d plus a localiser and a stream on a window around the
# diver (docs/recipe.md "The s3d_zoom encoder"); the twist is read only through the window.
SERVED_ENCODER = "s3d_zoom_32x112_112"
HEAD_SIZES = {q: len(a) for q, a in HEADS.items()}


@dataclass(frozen=True)
class Budget:
    # The encoder is pre-trained as a per-clip count specialist first (`specialist_steps`, export.recipe);
    # from it, 1,000 warm-up steps read validation's counts at 98.9 / 99.3 (export.count_study, seed 7).
    specialist_steps: int = 1500
    # Its first steps cut the window at the diver's true position while the localiser learns to
    # find him: without it the window stream learnt the twist late or not at all in some seeds.
    specialist_forced_window_steps: int = 750
    warmup_steps: int = 1000
    bank_steps: int = 600
    videos_per_step: int = 8
    # 8 videos x 4 online clips: the encoder cost per step of generator v1's 16 x 2, with each
    # video's brief take-off clip recomputed twice as often (4 of ~21 clips per visit).
    bank_videos_per_step: int = 8
    n_online: int = 4
    clips_per_step: int = 48
    lr: float = 1e-3  # encoder
    head_lr: float = 1e-3  # decoder / baseline heads
    weight_decay: float = 1e-4

    @property
    def clip_gradients(self) -> int:
        """Clips backpropagated through the encoder after the warm-up, the same for every model."""
        return self.bank_steps * self.bank_videos_per_step * self.n_online

    @property
    def short_term_steps(self) -> int:
        return -(-self.clip_gradients // self.clips_per_step)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# Constructor configs, saved beside every exported artifact.
ENCODER_CONFIG = dict(channels=[24, 32, 64, 128], feature_dim=256, clip_frames=8, frame_size=112, stem_patch=8,
                      stem_temporal_kernel=1)
TQN_CONFIG = dict(head_sizes=HEAD_SIZES, feature_dim=256, d_model=128, num_layers=2, num_heads=8, ffn_dim=256,
                  dropout=0.1, feature_dropout=0.1, memory_mlp=True)


def build_encoder(**overrides) -> S3D:
    config = {**ENCODER_CONFIG, "channels": tuple(ENCODER_CONFIG["channels"]), **overrides}
    if config.get("temporal_kernel_size") == 1:  # per-frame: the stem must not span frames either
        config["stem_temporal_kernel"] = 1
    return S3D(**config)


def served_encoder_config() -> dict:
    """The served encoder's constructor config (saved beside the artifact): its variant's."""
    return {"variant": SERVED_ENCODER, **s3d_zoom.VARIANTS[SERVED_ENCODER]}


def build_served_encoder() -> S3DZoom:
    return s3d_zoom.create(SERVED_ENCODER)


def encoder_from_config(config: dict) -> S3D | S3DZoom:
    """A clip encoder from the `config` its model.json saved: an `s3d_zoom` variant when the config
    names one (`served_encoder_config`), else a plain `S3D` (the encoders served before issue 8)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    variant = options.pop("variant", None)
    return s3d_zoom.create(variant, **options) if variant is not None else S3D(**options)


def load_served_encoder(model_dir: Path) -> tuple[S3D | S3DZoom, dict]:
    """The clip encoder a model directory serves (`<model_dir>/1/model.json` and `model.pt`), in eval
    mode, and its model.json."""
    version = Path(model_dir) / "1"
    meta = json.loads((version / "model.json").read_text())
    encoder = encoder_from_config(meta["config"])
    encoder.load_state_dict(torch.load(version / "model.pt", map_location="cpu", weights_only=True))
    return encoder.eval(), meta


def build_tqn() -> TQNDecoder:
    return TQNDecoder(**TQN_CONFIG)


def build_average_pooling() -> AveragePooling:
    return AveragePooling(head_sizes=HEAD_SIZES, feature_dim=256, hidden_dim=TQN_CONFIG["d_model"], dropout=0.3)


def build_short_term() -> ShortTerm:
    return ShortTerm(head_sizes=HEAD_SIZES, feature_dim=256, hidden_dim=TQN_CONFIG["d_model"], dropout=0.3)


def query_loss(logits: tuple[torch.Tensor, ...], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over the items that have a target (a flight off the
    class table has no class target; a batch of only those adds 0 for the class, not NaN)."""
    total = 0
    for q, lg in zip(HEADS, logits):
        target = targets[q]
        has = target != NO_TARGET
        if not has.all():
            if not has.any():
                continue
            lg, target = lg[has], target[has]
        total = total + F.cross_entropy(lg, target)
    return total


def _targets(ds: ClipDataset, videos: np.ndarray) -> dict[str, torch.Tensor]:
    return {q: torch.as_tensor(ds.targets[q][videos]) for q in HEADS}


# Which phase (synth.PHASES index) shows each query's answer; the class needs two and has none.
_EVENT_PHASE = {"take_off": 1, "somersaults": 2, "twists": 2, "flight_pose": 2}
EVENT_MIN_FRAMES = 3  # of a clip's 8 frames, for the clip to show the event


def clip_targets(ds: ClipDataset, video: int) -> dict[str, np.ndarray]:
    """Per clip of a video, the answer that clip shows: the video's answer to a query if at least
    EVENT_MIN_FRAMES of its frames are in that query's phase, else "null" (the class: the video's
    answer on every clip). From the generator's per-frame phases; videos without them (hand-made
    test data) get the video's answers on every clip."""
    n = int(ds.num_clips[video])
    targets = {q: np.full(n, ds.targets[q][video]) for q in HEADS}
    phases = ds.records[video].get("phases")
    if phases is None:
        return targets
    padded = np.full(n * CLIP_FRAMES, -1)
    padded[: len(phases)] = phases
    per_clip = padded.reshape(n, CLIP_FRAMES)
    for q, phase in _EVENT_PHASE.items():
        shows = (per_clip == phase).sum(1) >= EVENT_MIN_FRAMES
        targets[q][~shows] = HEAD_SIZES[q] - 1  # null is every head's last attribute
    return targets


class _Progress:
    """Running loss and per-query accuracy, printed to stderr as training goes."""

    def __init__(self, name: str, steps: int, every: int = 50, quiet: bool = False):
        self.name, self.steps, self.every, self.quiet = name, steps, every, quiet
        self.start = time.monotonic()
        self.loss, self.hits, self.seen = 0.0, {q: 0 for q in HEADS}, 0

    def update(self, step: int, loss: float, logits, targets) -> None:
        self.loss += loss
        self.seen += len(targets["class"])
        for q, lg in zip(HEADS, logits):
            self.hits[q] += int((lg.argmax(-1) == targets[q]).sum())
        if not self.quiet and ((step + 1) % self.every == 0 or step + 1 == self.steps):
            elapsed = time.monotonic() - self.start
            eta = elapsed / (step + 1) * (self.steps - step - 1)
            accs = " ".join(f"{q}={self.hits[q] / self.seen:.2f}" for q in HEADS)
            print(f"[{self.name}] step {step + 1}/{self.steps} loss {self.loss / self.every:.3f} "
                  f"train-acc {accs} ({elapsed:.0f}s, eta {eta:.0f}s)", file=sys.stderr, flush=True)
            self.loss, self.hits, self.seen = 0.0, {q: 0 for q in HEADS}, 0


def _optimizer(encoder: nn.Module, heads: list[nn.Module], budget: Budget, steps: int):
    """AdamW, encoder at `lr` and heads at `head_lr`; linear warm-up then cosine to 5%."""
    groups = [{"params": list(encoder.parameters()), "lr": budget.lr},
              {"params": [p for m in heads for p in m.parameters()], "lr": budget.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=budget.weight_decay)
    warm = max(1, min(50, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, shard: Shard = SINGLE) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients((p for group in opt.param_groups for p in group["params"]), shard)
    opt.step()
    sched.step()


def _pad(per_video: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length (n_i, D) features into (B, N, D) plus a validity mask."""
    n = max(len(f) for f in per_video)
    feats = torch.zeros(len(per_video), n, per_video[0].shape[-1])
    mask = torch.zeros(len(per_video), n, dtype=torch.bool)
    for i, f in enumerate(per_video):
        feats[i, : len(f)] = f
        mask[i, : len(f)] = True
    return feats, mask


_RATE_QUERIES = ("somersaults", "twists")
_RATE_CENTRE = torch.tensor([2.0, 1.0])  # middle of 1-3 somersaults and of 0-2 twists


def clip_rates(ds: ClipDataset, video: int) -> tuple[np.ndarray, np.ndarray]:
    """Per clip of a video: does it show the flight (`clip_targets`), and the video's somersault
    and twist counts as numbers (n_clips, 2), the rotation and twist rates in turns per flight."""
    shown = clip_targets(ds, video)["somersaults"] != HEAD_SIZES["somersaults"] - 1
    rec = ds.records[video]
    counts = [float(rec[q]) if rec[q] != vocab.NULL else 0.0 for q in _RATE_QUERIES]
    return shown, np.tile(np.asarray(counts, np.float32), (len(shown), 1))


def rate_loss(rate_head: nn.Module, flat: torch.Tensor, ds: ClipDataset, videos) -> torch.Tensor:
    rates = [clip_rates(ds, int(v)) for v in videos]
    shown = torch.as_tensor(np.concatenate([s for s, _ in rates]))
    if not shown.any():
        return flat.sum() * 0
    target = torch.as_tensor(np.concatenate([r for _, r in rates]))[shown] - _RATE_CENTRE
    return F.smooth_l1_loss(rate_head(flat[shown]), target)


def encode(encoder: nn.Module, ds: ClipDataset, spans: list[tuple[int, int, int]],
           torso: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the clips (video, first, count) of `spans`, with gradient, and the localiser's loss:
    with `torso` (per frame of `ds.frames`, `diagnose_counts.figure_track`) the encoder is an
    `s3d_zoom` whose localiser learns where the figure is; without, the loss is 0."""
    clips = torch.from_numpy(np.concatenate([ds.clips(v, first, count) for v, first, count in spans]))
    if torso is None:
        return encoder(clips), torch.zeros(())
    features, heatmaps, _ = encoder.forward_with_heatmap(clips)
    where = np.concatenate([ds.frame_index(v, first, count) for v, first, count in spans])
    return features, encoder.localiser_loss(heatmaps, torch.from_numpy(torso[where]).reshape(*heatmaps.shape[:2], 2))


def warmup(encoder: S3D, heads: list[nn.Module], clip_head: ShortTerm, ds: ClipDataset, budget: Budget,
           rng: np.random.Generator, name: str = "warm-up", rate_weight: float = 0.0,
           torso: np.ndarray | None = None, extra: nn.Module | None = None,
           after_step: Callable[[int], None] | None = None, shard: Shard = SINGLE) -> None:
    """Stage 1 on short videos, all clips online. Video-level heads (TQN, pooling) learn together
    with a per-clip head (the per-clip pre-training the design calls for) whose targets are what
    each clip shows (`clip_targets`): the take-off clip its take-off, flight clips the flight,
    other clips null. This gives the brief take-off clip as much encoder gradient as the flight
    and no clip a label it cannot show; attention alone spreads the gradient thin at first.
    `rate_weight` > 0 adds an auxiliary loss (recipe study, `export.count_study`): a linear head
    on each clip feature regresses the somersault and twist counts (the rotation and twist rates)
    of the clips that show the flight. `torso`: the localiser's target for an `s3d_zoom` (`encode`).
    `extra` (recipe study): a module whose `extra(encoder)` is one more loss term every step, its
    parameters trained with the heads. `after_step(k)` is called after the k-th step (1-based).
    `shard`: this process's share of every step's videos when the warm-up runs data-parallel
    (`export.parallel`); every rank draws the same videos and keeps the same weights."""
    encoder.train()
    rate_head = nn.Linear(encoder.feature_dim, len(_RATE_QUERIES)) if rate_weight > 0 else None
    aux = [m for m in (rate_head, extra) if m is not None]
    for h in (*heads, clip_head, *aux):
        h.train()
    opt, sched = _optimizer(encoder, [*heads, clip_head, *aux], budget, budget.warmup_steps)
    progress = _Progress(name, budget.warmup_steps, quiet=not shard.leads)
    n_videos = len(ds.records)
    for step in range(budget.warmup_steps):
        videos = shard.take(rng.choice(n_videos, budget.videos_per_step, replace=False))
        counts = [int(ds.num_clips[v]) for v in videos]
        flat, loss = encode(encoder, ds, [(int(v), 0, n) for v, n in zip(videos, counts)], torso)
        feats, mask = _pad(list(flat.split(counts)))
        targets = _targets(ds, videos)
        outputs = [h(feats, mask) for h in heads]
        loss = loss + sum(query_loss(out[: len(HEADS)], targets) for out in outputs)
        shown = [clip_targets(ds, int(v)) for v in videos]
        per_clip = {q: torch.as_tensor(np.concatenate([t[q] for t in shown])) for q in HEADS}
        loss = loss + query_loss(clip_head.heads(flat), per_clip)
        if rate_head is not None:
            loss = loss + rate_weight * rate_loss(rate_head, flat, ds, videos)
        if extra is not None:
            loss = loss + extra(encoder)
        _step(opt, sched, loss, shard)
        progress.update(step, loss.item(), outputs[0][: len(HEADS)], targets)
        if after_step is not None:
            after_step(step + 1)
    for m in (encoder, *heads, clip_head):
        average_buffers(m, shard)


@torch.inference_mode()
def clip_features(encoder: S3D, ds: ClipDataset, video: int, batch: int = 64) -> torch.Tensor:
    """Features of every clip of one video, (n_clips, D)."""
    n = int(ds.num_clips[video])
    return torch.cat([encoder(torch.from_numpy(ds.clips(video, s, min(batch, n - s))))
                      for s in range(0, n, batch)])


def build_bank(encoder: S3D, ds: ClipDataset) -> torch.Tensor:
    encoder.eval()
    bank = torch.empty(ds.total_clips, encoder.feature_dim)
    for v in range(len(ds.records)):
        o = int(ds.clip_offset[v])
        bank[o : o + int(ds.num_clips[v])] = clip_features(encoder, ds, v)
    return bank


def train_with_bank(name: str, encoder: S3D, head: nn.Module, ds: ClipDataset, bank: torch.Tensor,
                    budget: Budget, rng: np.random.Generator, torso: np.ndarray | None = None,
                    extra: nn.Module | None = None) -> None:
    """Stage 2: stochastically updated feature bank over full-length videos (`torso`, `extra`: see
    `encode`, `warmup`)."""
    encoder.train()
    head.train()
    opt, sched = _optimizer(encoder, [head, *([extra] if extra is not None else [])], budget, budget.bank_steps)
    progress = _Progress(name, budget.bank_steps)
    for step in range(budget.bank_steps):
        videos = rng.choice(len(ds.records), budget.bank_videos_per_step, replace=False)
        spans = []
        for v in videos:
            n = int(ds.num_clips[v])
            k = min(budget.n_online, n)
            first = int(rng.integers(0, n - k + 1))
            spans.append((first, k))
        online, localiser_loss = encode(encoder, ds, [(int(v), f, k) for v, (f, k) in zip(videos, spans)], torso)
        online = online.split([k for _, k in spans])
        per_video = []
        for v, (first, k), fresh in zip(videos, spans, online):
            o = int(ds.clip_offset[v])
            feats = bank[o : o + int(ds.num_clips[v])].clone()
            feats[first : first + k] = fresh
            bank[o + first : o + first + k] = fresh.detach()
            per_video.append(feats)
        feats, mask = _pad(per_video)
        targets = _targets(ds, videos)
        logits = head(feats, mask)[: len(HEADS)]
        loss = query_loss(logits, targets) + localiser_loss
        if extra is not None:
            loss = loss + extra(encoder)
        _step(opt, sched, loss)
        progress.update(step, loss.item(), logits, targets)


def train_short_term(encoder: S3D, head: ShortTerm, datasets: list[ClipDataset], budget: Budget,
                     rng: np.random.Generator, torsos: list[np.ndarray] | None = None) -> None:
    """Single clips, each labelled with its video's answers (`torsos`: each dataset's localiser
    target, see `encode`)."""
    encoder.train()
    head.train()
    opt, sched = _optimizer(encoder, [head], budget, budget.short_term_steps)
    progress = _Progress("short-term", budget.short_term_steps)
    sizes = np.asarray([d.total_clips for d in datasets], np.float64)
    for step in range(budget.short_term_steps):
        which = rng.choice(len(datasets), budget.clips_per_step, p=sizes / sizes.sum())
        clips, torso, targets = [], [], {q: [] for q in HEADS}
        for d_index in range(len(datasets)):
            ds = datasets[d_index]
            flat = rng.integers(0, ds.total_clips, int((which == d_index).sum()))
            for v, c in zip(ds.video_of_clip(flat), flat):
                clips.append(ds.clips(v, int(c - ds.clip_offset[v]), 1))
                if torsos is not None:
                    torso.append(torsos[d_index][ds.frame_index(v, int(c - ds.clip_offset[v]), 1)])
                for q in HEADS:
                    targets[q].append(ds.targets[q][v])
        targets = {q: torch.as_tensor(np.asarray(t)) for q, t in targets.items()}
        clips = torch.from_numpy(np.concatenate(clips))
        if torsos is None:
            features, localiser_loss = encoder(clips), 0
        else:
            features, heatmaps, _ = encoder.forward_with_heatmap(clips)
            localiser_loss = encoder.localiser_loss(
                heatmaps, torch.from_numpy(np.concatenate(torso)).reshape(*heatmaps.shape[:2], 2))
        logits = head.heads(features)
        loss = query_loss(logits, targets) + localiser_loss
        _step(opt, sched, loss)
        progress.update(step, loss.item(), logits, targets)


@torch.inference_mode()
def video_logits(encoder: S3D, head: nn.Module, ds: ClipDataset) -> dict[str, np.ndarray]:
    """Per-video logits (n_videos, n_attributes) for every head, from all clips of each video
    (no bank); for a TQN decoder also its "in_domain_score" (n_videos,)."""
    encoder.eval()
    head.eval()
    out: dict[str, list] = {q: [] for q in HEADS}
    for v in range(len(ds.records)):
        feats = clip_features(encoder, ds, v).unsqueeze(0)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        outputs = head(feats, mask)
        for q, lg in zip(HEADS, outputs):
            out[q].append(lg[0].numpy())
        if isinstance(head, TQNDecoder):
            out.setdefault("in_domain_score", []).append(float(outputs[-1][0]))
    return {k: np.asarray(v) for k, v in out.items()}


def predict(encoder: S3D, head: nn.Module, ds: ClipDataset) -> dict[str, np.ndarray]:
    """Per-video predicted index for every head, using all clips of each video (no bank)."""
    logits = video_logits(encoder, head, ds)
    return {q: logits[q].argmax(-1) for q in HEADS}


def accuracy(preds: dict[str, np.ndarray], ds: ClipDataset) -> dict[str, float]:
    return {q: float((preds[q] == ds.targets[q]).mean()) for q in HEADS}


def load_models(states: dict[str, tuple[dict, dict]]) -> dict[str, tuple]:
    """{name: (encoder, head)} from `recipe.train_all`'s models' state dicts ("warm": the warm-up's
    encoder and TQN)."""
    builders = {"tqn": build_tqn, "warm": build_tqn, "average_pooling": build_average_pooling,
                "short_term": build_short_term}
    models = {}
    for name, (encoder_state, head_state) in states.items():
        encoder, head = build_served_encoder(), builders[name]()
        encoder.load_state_dict(encoder_state)
        head.load_state_dict(head_state)
        models[name] = (encoder, head)
    return models


class MiddleFrame(nn.Module):
    """Single-frame control encoder: a per-frame 2D CNN that sees only the middle frame of a clip."""

    def __init__(self, encoder: S3D):
        super().__init__()
        if not encoder.per_frame:
            raise ValueError("MiddleFrame needs a per-frame encoder (temporal_kernel_size=1)")
        self.encoder, self.feature_dim = encoder, encoder.feature_dim

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        middle = clips.shape[1] // 2
        return self.encoder(clips[:, middle : middle + 1])  # B, 1, H, W, C -> B, D


def train_tqn_only(name: str, encoder: S3D, short: ClipDataset, full: ClipDataset, budget: Budget,
                   rng: np.random.Generator) -> tuple[S3D, TQNDecoder]:
    """Warm-up (with its per-clip head) then the feature-bank stage, for one encoder + TQN."""
    tqn = build_tqn()
    warmup(encoder, [tqn], build_short_term(), short, budget, rng, name=f"{name} warm-up")
    train_with_bank(name, encoder, tqn, full, build_bank(encoder, full), budget, rng)
    return encoder, tqn
