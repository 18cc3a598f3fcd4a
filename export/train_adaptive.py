"""Train and export the adaptive encoders (issue 9) on top of the served s3d + TQN decoder.

- `vit`: the tubelet ViT (`vit_mini_112`: dim 64, 6 blocks, 2×16×16 tubelets) distilled from the served s3d's clip features (no labels),
  so the served TQN decoder reads its features unchanged; `vit_ats` is the same weights with ATS in
  blocks 3..6 (no retraining; ATS has no parameters).
- `s3d_sgs`: the served s3d's weights with SGS inserted (a centred similarity net whose bias is
  calibrated on training clips; bins passed on as time-ordered means, see `S3DSGS`), trained
  through the served (frozen) TQN decoder on the short training videos (every clip online): the
  query loss plus the distillation loss to the s3d's own clip features, so the decoder needs no
  retraining and both encoders serve with it. Each step draws every clip's B uniformly from 1..8
  (one weight set for every budget); the similarity net is held fixed for the first
  `sgs_frozen_steps`, then trained. Each placement in `PLACEMENTS` is trained the same way; the
  one exported is chosen on validation.

Choices are made on the validation split through the exported ONNX graphs (ONNX Runtime, as
served), on every `VAL_EVERY`-th validation video: each adaptive encoder's `budget_default` is the
smallest budget whose accuracy averaged over the queries is within `TOLERANCE_POINTS` of its plain
encoder's (s3d for s3d_sgs, vit for vit_ats), and the SGS placement exported is the one with the
fewest GMACs at its default. Everything is step-based and seeded.

    python -m export.train_adaptive [--data-dir data] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import MODEL_REPOSITORY, REPO, adaptive_export, data, train
from export.models.s3d import S3D
from export.models.s3d_sgs import S3DSGS, s3d_macs
from export.models.tqn import TQNDecoder
from export.models.vit import VideoViT
from export.models.vit import VARIANTS as VIT_VARIANTS
from export.models.vit import create as create_vit

REPORT = REPO / "export" / "adaptive_training.json"
SEED = 9
VIT_VARIANT = "vit_mini_112"
# Where SGS can go, earliest first: after the patchify conv (B' = 1 costs 0.29 of s3d's work), after the
# stem (0.32), after stage 2 (the thesis's place for X3D; 0.67).
PLACEMENTS = ("patchify", "stem", "stage2")
CALIBRATION_CLIPS = 64  # random training clips that set the similarity net's bias (calibrate_similarity)
BIAS_SCALE = 1.0  # the similarity net's output bias, in units of the median ‖Z_t‖ (calibrate_similarity)
VAL_BUDGETS = (1.0, 0.5, 0.35, 0.25)  # B = 8, 4, 3, 2; K = 196, 98, 69, 49
SGS_VAL_BUDGETS = (1.0, 0.5, 0.25)
# Every sixth validation video (50 of 300, ~1,000 clips): every choice needs a curve of passes, and
# the 2 cores are shared by seven sessions.
VAL_EVERY = 6
# Mean accuracy over the queries (less noisy on 100 videos than each query alone).
TOLERANCE_POINTS = 1.0
HEADS = train.HEADS


@dataclass(frozen=True)
class AdaptiveBudget:
    vit_steps: int = 100
    vit_clips_per_step: int = 32
    vit_lr: float = 1e-3
    vit_tune_steps: int = 120  # after the distillation, through the frozen decoder (`tune_vit`)
    sgs_steps: int = 800
    sgs_videos_per_step: int = 4
    sgs_lr: float = 1e-3
    sgs_frozen_steps: int = 600  # of sgs_steps, with the similarity net fixed (fine_tune_sgs)
    similarity_lr: float = 1e-4
    distill_weight: float = 1.0
    event_fraction: float = 0.5  # of the ViT's clips, drawn from clips that show an event
    refit_clips: int = 2048  # for the least-squares refit of the ViT's last layer
    val_every: int = VAL_EVERY


QUICK = AdaptiveBudget(vit_steps=20, vit_tune_steps=5, sgs_steps=10, sgs_frozen_steps=5, refit_clips=256,
                      val_every=15)


def _log(message: str) -> None:
    print(f"adaptive: {message}", file=sys.stderr, flush=True)


def load_served(repository: Path = MODEL_REPOSITORY) -> tuple[S3D, TQNDecoder, dict]:
    """The served s3d and TQN decoder (from their model.pt and model.json), in eval mode."""
    meta = json.loads((repository / "clip_encoder_s3d" / "1" / "model.json").read_text())
    encoder = train.build_encoder(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    encoder.load_state_dict(torch.load(repository / "clip_encoder_s3d" / "1" / "model.pt", weights_only=True))
    decoder = train.build_tqn()
    decoder.load_state_dict(torch.load(repository / "tqn_decoder" / "1" / "model.pt", weights_only=True))
    return encoder.eval(), decoder.eval(), meta


def _event_clips(ds: data.ClipDataset) -> np.ndarray:
    """Flat indices of the clips that show a query's event (take-off or flight)."""
    flat = []
    for v in range(len(ds.records)):
        shown = train.clip_targets(ds, v)
        event = np.zeros(int(ds.num_clips[v]), bool)
        for q in ("take_off", "somersaults"):
            event |= shown[q] != train.HEAD_SIZES[q] - 1
        flat.append(np.flatnonzero(event) + int(ds.clip_offset[v]))
    return np.concatenate(flat)


def _clip_batch(ds: data.ClipDataset, flat: np.ndarray) -> torch.Tensor:
    videos = ds.video_of_clip(flat)
    return torch.from_numpy(np.concatenate([ds.clips(int(v), int(c - ds.clip_offset[v]), 1)
                                            for v, c in zip(videos, flat)]))


def _optimizer(params, lr: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warm = max(1, min(50, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def distill_vit(teacher: S3D, datasets: list[data.ClipDataset], budget: AdaptiveBudget,
                rng: np.random.Generator, student: VideoViT | None = None) -> VideoViT:
    """The ViT regressing the teacher's clip features (MSE over the teacher's feature scale), from
    `student` when given (else a fresh one)."""
    student = student if student is not None else create_vit(VIT_VARIANT)
    student.train()
    opt, sched = _optimizer(student.parameters(), budget.vit_lr, budget.vit_steps)
    events = [_event_clips(ds) for ds in datasets]
    sizes = np.asarray([ds.total_clips for ds in datasets], np.float64)
    start, running = time.monotonic(), 0.0
    scale = None
    for step in range(budget.vit_steps):
        n_event = int(round(budget.vit_clips_per_step * budget.event_fraction))
        which = rng.choice(len(datasets), budget.vit_clips_per_step, p=sizes / sizes.sum())
        clips = []
        for d, ds in enumerate(datasets):
            count = int((which == d).sum())
            from_events = min(count, int(round(count * n_event / budget.vit_clips_per_step)))
            flat = np.concatenate([rng.choice(events[d], from_events),
                                   rng.integers(0, ds.total_clips, count - from_events)])
            if len(flat):
                clips.append(_clip_batch(ds, flat))
        clips = torch.cat(clips)
        with torch.no_grad():
            target = teacher(clips)
            if scale is None:  # the teacher's feature scale, fixed at the first batch
                scale = target.var(dim=0).mean().clamp(min=1e-6)
        loss = F.mse_loss(student(clips), target) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 25 == 0 or step + 1 == budget.vit_steps:
            elapsed = time.monotonic() - start
            _log(f"vit distill step {step + 1}/{budget.vit_steps} loss {running / 25:.4f} "
                 f"({elapsed:.0f}s, eta {elapsed / (step + 1) * (budget.vit_steps - step - 1):.0f}s)")
            running = 0.0
    return student.eval()


def sgs_config(s3d_config: dict, placement: str) -> dict:
    """S3DSGS's constructor config: the served s3d's (its model.json `config`) with SGS after
    `placement`, its similarity net centred and its bins time-ordered means (see S3DSGS)."""
    return {**s3d_config, "sgs_after": placement, "similarity_centred": True, "bins": "time_means"}


@torch.inference_mode()
def refit_projection(vit: VideoViT, teacher: S3D, ds: data.ClipDataset, clips: int, rng: np.random.Generator,
                     ridge: float = 1e-3) -> float:
    """Least-squares refit of the ViT's last layer (its cls features -> the teacher's clip features)
    on `clips` random clips, half showing an event: aligns a ViT distilled from an earlier teacher
    with this one. Returns the relative residual (MSE over the teacher's feature variance)."""
    vit.eval()
    events = _event_clips(ds)
    flat = np.concatenate([rng.choice(events, clips // 2), rng.integers(0, ds.total_clips, clips - clips // 2)])
    cls, target = [], []
    for start in range(0, len(flat), 64):
        batch = _clip_batch(ds, flat[start : start + 64])
        x = (batch.permute(0, 4, 1, 2, 3).float() - vit.mean) / vit.std
        cls.append(vit.forward_features(x)[0].double())
        target.append(teacher(batch).double())
    h, t = torch.cat(cls), torch.cat(target)
    h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
    gram = h1.T @ h1 + ridge * len(h) * torch.eye(h1.shape[1], dtype=h.dtype)
    solution = torch.linalg.solve(gram, h1.T @ t)  # (dim + 1, D)
    vit.proj.weight.copy_(solution[:-1].T.float())
    vit.proj.bias.copy_(solution[-1].float())
    return float(((h1 @ solution - t) ** 2).mean() / t.var(dim=0).mean())


def s3d_sgs_from(teacher: S3D, s3d_config: dict, placement: str, calibration: torch.Tensor) -> S3DSGS:
    """The served s3d's architecture and weights with SGS after `placement` and a fresh, centred
    similarity net whose output bias is set from `calibration` clips (see `calibrate_similarity`)."""
    model = S3DSGS(**sgs_config(s3d_config, placement))
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("sgs.") for k in missing):
        raise ValueError(f"s3d weights do not fit s3d_sgs: missing {missing}, unexpected {unexpected}")
    calibrate_similarity(model, calibration)
    return model


@torch.no_grad()
def calibrate_similarity(model: S3DSGS, clips: torch.Tensor) -> float:
    """Set the similarity net's output bias to a random direction whose length is the median
    ‖Z_t‖ of `clips` without it (`BIAS_SCALE` times): Δ_t = ‖bias + u_t‖, so a clip whose frames
    deviate from their mean less than the typical clip's collapses to fewer bins and one whose
    frames deviate more spreads over more. Binning is scale-free (γ = Δ_max / 2B), so without a
    bias a still clip's noise spreads as far as a dive; with a bias 2-4x this one nearly every clip
    keeps 1-2 bins of 8 (untrained, on validation). Returns the median."""
    net = model.sgs.similarity
    net.conv1.bias.zero_()
    net.conv2.bias.zero_()
    was_training = model.training
    model.eval()
    x = (clips.permute(0, 4, 1, 2, 3).float() - model.mean) / model.std
    median = float(torch.linalg.vector_norm(net(model.before_sgs(x)), dim=-1).median())
    model.train(was_training)
    direction = torch.randn(net.conv2.out_channels)
    net.conv2.bias.copy_(direction / direction.norm() * median * BIAS_SCALE)
    return median


def tune_through_decoder(name: str, model: torch.nn.Module, encode, groups: list[dict], teacher: S3D,
                         decoder: TQNDecoder, short: data.ClipDataset, *, steps: int, videos_per_step: int,
                         lr: float, distill_weight: float, rng: np.random.Generator) -> None:
    """Every clip of a few short videos online through `encode(clips, rng) -> (features, kept)`,
    the frozen decoder's query loss plus distillation to the teacher's clip features."""
    model.train()
    for p in decoder.parameters():
        p.requires_grad_(False)
    opt, sched = _optimizer(groups, lr, steps)
    start, running = time.monotonic(), 0.0
    for step in range(steps):
        videos = rng.choice(len(short.records), videos_per_step, replace=False)
        clips = [torch.from_numpy(short.clips(v, 0, int(short.num_clips[v]))) for v in videos]
        counts = [len(c) for c in clips]
        clips = torch.cat(clips)
        with torch.no_grad():
            target = teacher(clips)
        features, kept = encode(clips, rng)
        feats, mask = train._pad(list(features.split(counts)))
        logits = decoder(feats, mask)[: len(HEADS)]
        targets = {q: torch.as_tensor(short.targets[q][videos]) for q in HEADS}
        scale = target.var(dim=0).mean().clamp(min=1e-6)
        distill = F.mse_loss(features, target) / scale
        loss = train.query_loss(logits, targets) + distill_weight * distill
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - start
            shown = "" if kept is None else f"mean kept {float(kept.float().mean()):.2f} "
            _log(f"{name} step {step + 1}/{steps} loss {running / 10:.3f} (distill {distill.item():.3f}) {shown}"
                 f"({elapsed:.0f}s, eta {elapsed / (step + 1) * (steps - step - 1):.0f}s)")
            running = 0.0
    model.eval()


def fine_tune_sgs(model: S3DSGS, teacher: S3D, decoder: TQNDecoder, short: data.ClipDataset,
                  budget: AdaptiveBudget, rng: np.random.Generator) -> S3DSGS:
    """`tune_through_decoder` with each clip's B drawn from 1..T: first the s3d's layers around a
    fixed similarity net (`budget.sgs_frozen_steps`), then everything with the similarity net at
    `budget.similarity_lr`. Why in two phases: the layers after SGS answer badly at first whatever
    the bins, and a similarity net trained from the start learnt to put every frame of every clip
    in one bin (B' 1.0-1.1 within 30 steps at the patchify placement)."""
    fresh = list(model.sgs.parameters())
    known = [p for n, p in model.named_parameters() if not n.startswith("sgs.")]
    name = f"s3d_sgs[{model.sgs_after}]"

    def encode(clips, rng):
        return model(clips, torch.from_numpy(rng.integers(1, model.clip_frames + 1, len(clips))))

    common = dict(videos_per_step=budget.sgs_videos_per_step, lr=budget.sgs_lr, distill_weight=budget.distill_weight,
                  rng=rng)
    frozen = min(budget.sgs_frozen_steps, budget.sgs_steps)
    if frozen:
        for p in fresh:
            p.requires_grad_(False)
        tune_through_decoder(f"{name} (similarity net fixed)", model, encode, [{"params": known}], teacher, decoder,
                             short, steps=frozen, **common)
        for p in fresh:
            p.requires_grad_(True)
    if budget.sgs_steps > frozen:
        tune_through_decoder(name, model, encode, [{"params": known}, {"params": fresh, "lr": budget.similarity_lr}],
                             teacher, decoder, short, steps=budget.sgs_steps - frozen, **common)
    return model


def tune_vit(vit: VideoViT, teacher: S3D, decoder: TQNDecoder, short: data.ClipDataset, budget: AdaptiveBudget,
             rng: np.random.Generator) -> VideoViT:
    """The distilled ViT trained on through the frozen decoder (`tune_through_decoder`)."""
    tune_through_decoder("vit", vit, lambda clips, rng: (vit(clips), None), [{"params": list(vit.parameters())}],
                         teacher, decoder, short, steps=budget.vit_tune_steps,
                         videos_per_step=budget.sgs_videos_per_step, lr=budget.vit_lr,
                         distill_weight=budget.distill_weight, rng=rng)
    return vit


def onnx_clip_outputs(path: Path, ds: data.ClipDataset, budget: float | None, *, batch: int = 32,
                      threads: int = 2, videos: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """An exported encoder's outputs for every clip of `ds` (or of `videos`) through ONNX Runtime,
    as served: {"features": (clips, D), and for adaptive graphs "kept", "gmacs"}, video-major."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Busy-waiting threads burn the shared cores (as the served runner, onnx_runner.py, avoids).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    adaptive = any(i.name == adaptive_export.BUDGET_INPUT for i in session.get_inputs())
    videos = np.arange(len(ds.records)) if videos is None else videos
    out: dict[str, list] = {n: [] for n in names}
    for v in videos:
        n = int(ds.num_clips[v])
        for s in range(0, n, batch):
            clips = ds.clips(int(v), s, min(batch, n - s))
            feed = {adaptive_export.ENCODER_INPUT: np.ascontiguousarray(clips)}
            if adaptive:
                feed[adaptive_export.BUDGET_INPUT] = np.full((len(clips), 1), budget, np.float32)
            for name, value in zip(names, session.run(names, feed)):
                out[name].append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.inference_mode()
def decode_videos(decoder: TQNDecoder, features: np.ndarray, ds: data.ClipDataset,
                  videos: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-video predicted index per query from per-clip features (video-major, as returned by
    `onnx_clip_outputs`)."""
    videos = np.arange(len(ds.records)) if videos is None else videos
    preds = {q: [] for q in HEADS}
    at = 0
    for v in videos:
        n = int(ds.num_clips[v])
        feats = torch.from_numpy(features[at : at + n]).unsqueeze(0)
        at += n
        logits = decoder(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
        for q, lg in zip(HEADS, logits):
            preds[q].append(int(lg[0].argmax()))
    return {q: np.asarray(p) for q, p in preds.items()}


def accuracy(preds: dict[str, np.ndarray], ds: data.ClipDataset, videos: np.ndarray | None = None) -> dict[str, float]:
    videos = np.arange(len(ds.records)) if videos is None else videos
    return {q: float((preds[q] == ds.targets[q][videos]).mean()) for q in HEADS}


def _within(acc: dict[str, float], reference: dict[str, float], points: float) -> bool:
    return np.mean([acc[q] for q in HEADS]) >= np.mean([reference[q] for q in HEADS]) - points / 100


def _score(path: Path, decoder: TQNDecoder, ds: data.ClipDataset, budget: float | None, every: int) -> dict:
    videos = np.arange(0, len(ds.records), every)
    start = time.monotonic()
    out = onnx_clip_outputs(path, ds, budget, videos=videos)
    result = {"accuracy": accuracy(decode_videos(decoder, out["features"], ds, videos), ds, videos),
              "videos": len(videos), "seconds": time.monotonic() - start}
    if "gmacs" in out:
        result["gmacs_per_clip"] = float(out["gmacs"].mean())
        result["kept_mean"] = out["kept"].mean(axis=0).tolist()
    return result


def _choose_budget(curve: dict[str, dict], reference: dict[str, float]) -> float:
    ok = [float(b) for b, r in curve.items() if _within(r["accuracy"], reference, TOLERANCE_POINTS)]
    return min(ok) if ok else 1.0


def build_adaptive(data_dir: Path, repository: Path = MODEL_REPOSITORY, *, budget: AdaptiveBudget = AdaptiveBudget(),
                   seed: int = SEED, report: Path | None = REPORT, work_dir: Path | None = None,
                   init_vit: Path | None = None, encoders: tuple[str, ...] = ("s3d_sgs",)) -> dict:
    """Train, choose on validation, and export clip_encoder_{vit,vit_ats,s3d_sgs} into `repository`,
    which must hold the served clip_encoder_s3d and tqn_decoder. Returns (and writes) the report.

    `init_vit`: a ViT state dict to start from (e.g. `--distill-vit`'s, distilled from an earlier
    s3d); the distillation then runs `budget.vit_steps` more steps from it. Either way the ViT's
    last layer is finally refit by least squares to this s3d's features.

    `encoders`: which to (re)build; the report keeps the other's entries from the last run. By
    default only s3d_sgs: the ViT did not learn in this budget (README), so clip_encoder_vit and
    clip_encoder_vit_ats are built only when asked (`--encoders vit s3d_sgs`) and are not served."""
    t0 = time.monotonic()
    torch.set_num_threads(train.TRAIN_THREADS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    teacher, decoder, s3d_meta = load_served(repository)
    clip_fps = float(s3d_meta["clip_fps"])
    data_dir = Path(data_dir)
    short, full, val = (data.load(data_dir / name) for name in ("short", "train", "val"))
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="vqs-adaptive-"))
    work.mkdir(parents=True, exist_ok=True)
    provenance = {"seed": seed, "budget": asdict(budget), "teacher": s3d_meta.get("provenance"),
                  "teacher_onnx_sha256": adaptive_export._sha256(repository / "clip_encoder_s3d" / "1" / "model.onnx"),
                  "torch": torch.__version__}
    result: dict = {"provenance": provenance, "tolerance_points": TOLERANCE_POINTS, "val": {}}

    _log("s3d on val (reference)")
    s3d_val = _score(repository / "clip_encoder_s3d" / "1" / "model.onnx", decoder, val, None, budget.val_every)
    result["val"]["s3d"] = s3d_val | {"gmacs_per_clip": s3d_macs(teacher) / 1e9}

    # Exports go to a staging directory beside the repository and move in whole at the end.
    stage = Path(tempfile.mkdtemp(prefix=".adaptive-staging-", dir=repository.parent))

    previous = json.loads(report.read_text()) if report is not None and report.exists() else {}
    if "vit" not in encoders:
        for key in ("vit_train_seconds", "vit_refit_residual", "vit_ats_budget_default"):
            if key in previous:
                result[key] = previous[key]
        for key in ("vit", "vit_ats"):
            if key in previous.get("val", {}):
                result["val"][key] = previous["val"][key]
    else:
        # ViT, distilled, and the same weights with ATS.
        t = time.monotonic()
        vit = None
        if init_vit is not None:
            vit = create_vit(VIT_VARIANT)
            vit.load_state_dict(torch.load(init_vit, weights_only=True))
            provenance["vit_init_sha256"] = adaptive_export._sha256(Path(init_vit))
        if budget.vit_steps or vit is None:
            vit = distill_vit(teacher, [full, short], budget, rng, student=vit)
        if budget.vit_tune_steps:
            vit = tune_vit(vit, teacher, decoder, short, budget, rng)
        result["vit_refit_residual"] = refit_projection(vit, teacher, full, budget.refit_clips, rng)
        _log(f"vit last layer refit: residual {result['vit_refit_residual']:.3f} of the teacher's variance")
        result["vit_train_seconds"] = time.monotonic() - t
        vit_dir, ats_dir = stage / "clip_encoder_vit", stage / "clip_encoder_vit_ats"
        meta = {"encoder": "vit", "variant": VIT_VARIANT, "config": VIT_VARIANTS[VIT_VARIANT],
                "training": "distilled from clip_encoder_s3d's features (no labels)", "provenance": provenance}
        adaptive_export.export_served(adaptive_export.ServedViT(vit), vit, vit_dir, adaptive=False, kept_dims=None,
                                      parameters=adaptive_export.vit_parameters(vit, ats=False, clip_fps=clip_fps,
                                                                                budget_default=None), meta=meta)
        _log("vit on val")
        result["val"]["vit"] = _score(vit_dir / "1" / "model.onnx", decoder, val, None, budget.val_every) | {
            "gmacs_per_clip": vit.macs() / 1e9}
        adaptive_export.export_served(adaptive_export.ServedViTATS(vit), vit, ats_dir, adaptive=True,
                                      kept_dims=len(vit.ats_blocks),
                                      parameters=adaptive_export.vit_parameters(vit, ats=True, clip_fps=clip_fps,
                                                                                budget_default=None),
                                      meta={**meta, "encoder": "vit_ats", "ats_blocks": [b + 1 for b in vit.ats_blocks]},
                                      weights=vit_dir / "1" / "model.pt")
        ats_curve = {}
        for b in VAL_BUDGETS:
            _log(f"vit_ats on val at budget {b}")
            ats_curve[str(b)] = _score(ats_dir / "1" / "model.onnx", decoder, val, b, budget.val_every)
        result["val"]["vit_ats"] = ats_curve
        ats_default = _choose_budget(ats_curve, result["val"]["vit"]["accuracy"])
        adaptive_export.set_parameters(ats_dir, {adaptive_export.BUDGET_DEFAULT_PARAMETER: f"{ats_default:g}"})
        result["vit_ats_budget_default"] = ats_default

    if "s3d_sgs" not in encoders:
        for key in ("s3d_sgs_placement",):
            if key in previous:
                result[key] = previous[key]
        if "s3d_sgs" in previous.get("val", {}):
            result["val"]["s3d_sgs"] = previous["val"]["s3d_sgs"]
    else:
        # s3d_sgs at each placement, chosen on val.
        plain = s3d_macs(teacher)
        placements = {}
        calibration = _clip_batch(full, rng.integers(0, full.total_clips, CALIBRATION_CLIPS))
        for where in PLACEMENTS:
            t = time.monotonic()
            model = s3d_sgs_from(teacher, s3d_meta["config"], where, calibration)
            model = fine_tune_sgs(model, teacher, decoder, short, budget, rng)
            seconds = time.monotonic() - t
            out_dir = work / where / "clip_encoder_s3d_sgs"
            adaptive_export.export_served(
                adaptive_export.ServedS3DSGS(model), model, out_dir, adaptive=True, kept_dims=1,
                parameters=adaptive_export.sgs_parameters(model, plain, clip_fps=clip_fps, budget_default=None),
                meta={"encoder": "s3d_sgs", "sgs_after": where, "config": sgs_config(s3d_meta["config"], where),
                      "provenance": provenance})
            curve = {}
            for b in SGS_VAL_BUDGETS:
                _log(f"s3d_sgs[{where}] on val at budget {b}")
                curve[str(b)] = _score(out_dir / "1" / "model.onnx", decoder, val, b, budget.val_every)
            chosen = _choose_budget(curve, s3d_val["accuracy"])
            placements[where] = {"train_seconds": seconds, "curve": curve, "budget_default": chosen,
                                 "gmacs_at_default": curve[str(chosen)]["gmacs_per_clip"]}
        result["val"]["s3d_sgs"] = placements
        # Fewest GMACs among placements within the tolerance of s3d at their default; if none is, the
        # most accurate one (its budget the most accurate of its curve).
        meeting = [w for w, p in placements.items()
                   if _within(p["curve"][str(p["budget_default"])]["accuracy"], s3d_val["accuracy"], TOLERANCE_POINTS)]
        if meeting:
            best = min(meeting, key=lambda w: placements[w]["gmacs_at_default"])
        else:
            def mean_acc(r):
                return float(np.mean(list(r["accuracy"].values())))

            for p in placements.values():
                p["budget_default"] = max((float(b) for b in p["curve"]), key=lambda b: mean_acc(p["curve"][str(b)]))
                p["gmacs_at_default"] = p["curve"][str(p["budget_default"])]["gmacs_per_clip"]
            best = max(placements, key=lambda w: mean_acc(placements[w]["curve"][str(placements[w]["budget_default"])]))
        result["s3d_sgs_placement"] = best
        shutil.copytree(work / best / "clip_encoder_s3d_sgs", stage / "clip_encoder_s3d_sgs", symlinks=True)
        adaptive_export.set_parameters(stage / "clip_encoder_s3d_sgs", {
            adaptive_export.BUDGET_DEFAULT_PARAMETER: f"{placements[best]['budget_default']:g}"})
    result["installed"] = adaptive_export.install(stage, repository)
    shutil.rmtree(stage, ignore_errors=True)
    result["seconds"] = time.monotonic() - t0
    if report is not None:
        report.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"done in {result['seconds']:.0f}s: s3d_sgs placement {result.get('s3d_sgs_placement')}, "
         f"vit_ats budget {result.get('vit_ats_budget_default')} (installed: {', '.join(result['installed']) or 'none'})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--quick", action="store_true", help="a few steps of each, to check the pipeline")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--encoders", nargs="+", default=["s3d_sgs"], choices=["vit", "s3d_sgs"],
                        help="vit builds and installs clip_encoder_vit(_ats) too (not served: it did not learn)")
    parser.add_argument("--sgs-steps", type=int, default=None)
    parser.add_argument("--vit-steps", type=int, default=None, help="distillation steps (default: the budget's)")
    parser.add_argument("--init-vit", type=Path, default=None, help="ViT state dict to start the distillation from")
    parser.add_argument("--distill-vit", type=Path, default=None, metavar="OUT",
                        help="only distill the ViT from the served s3d and save its state dict to OUT")
    parser.add_argument("--tune-vit", type=Path, default=None, metavar="OUT",
                        help="only train --init-vit on through the served decoder (--vit-tune-steps) and save it to OUT")
    parser.add_argument("--vit-tune-steps", type=int, default=None)
    args = parser.parse_args()
    if args.quick and args.repository.resolve() == MODEL_REPOSITORY.resolve():
        parser.error("--quick needs --repository (a copy holding clip_encoder_s3d and tqn_decoder): "
                     "it would replace the served adaptive encoders with barely trained ones")
    budget = QUICK if args.quick else AdaptiveBudget()
    if args.vit_steps is not None:
        budget = replace(budget, vit_steps=args.vit_steps)
    if args.vit_tune_steps is not None:
        budget = replace(budget, vit_tune_steps=args.vit_tune_steps)
    if args.sgs_steps is not None:
        budget = replace(budget, sgs_steps=args.sgs_steps)
    if args.tune_vit:
        torch.set_num_threads(train.TRAIN_THREADS)
        torch.manual_seed(args.seed)
        teacher, decoder, _ = load_served(args.repository)
        vit = create_vit(VIT_VARIANT)
        vit.load_state_dict(torch.load(args.init_vit, weights_only=True))
        vit = tune_vit(vit, teacher, decoder, data.load(args.data_dir / "short"), budget,
                       np.random.default_rng(args.seed))
        torch.save(vit.state_dict(), args.tune_vit)
        return
    if args.distill_vit:
        torch.set_num_threads(train.TRAIN_THREADS)
        torch.manual_seed(args.seed)
        teacher, _, _ = load_served(args.repository)
        datasets = [data.load(args.data_dir / name) for name in ("train", "short")]
        vit = None
        if args.init_vit is not None:
            vit = create_vit(VIT_VARIANT)
            vit.load_state_dict(torch.load(args.init_vit, weights_only=True))
        vit = distill_vit(teacher, datasets, budget, np.random.default_rng(args.seed), student=vit)
        torch.save(vit.state_dict(), args.distill_vit)
        return
    build_adaptive(args.data_dir, args.repository, budget=budget, seed=args.seed, report=args.report,
                   init_vit=args.init_vit, encoders=tuple(args.encoders))


if __name__ == "__main__":
    main()
