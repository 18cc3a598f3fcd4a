"""Recipe study for the counts (issue 8), judged on VALIDATION only.

`python -m export.count_study NAME [--warmup-steps N] [--bank-steps M] [--stem-difference] [--fine-stem]
[--rate-loss W] [--free-flight-share P] [--zoom [--zoom-variant NAME]] [--init-encoder PT] [--count-loss W]
[--save-at STEPS] [--from-save PT] [--bank-free-flight-share P] [--seed S]`
trains the warm-up (as `train.train_all` does: encoder, TQN, average-pooling and per-clip heads on the
short videos) with the given changes, then, with `--bank-steps`, TQN's feature-bank stage; it prints
the TQN's validation accuracy and the linear probe of the encoder's flight-clip features
(`diagnose_counts.probe_report`), appends them as one JSON line to runs/count_study.jsonl and saves
the encoder and decoder in runs/.

`--free-flight-share P` warms up on a short split whose routines have, with probability P, a flight
drawn attribute by attribute instead of from the class table (`synth`'s `free_flight_share`): the
split as `vqs models` builds it at its own share (`build.FREE_FLIGHT_SHARE`, the default), else
rendered once into data/short_free<P>, same seed and spec otherwise. With the table alone, twists
follow from (pose, somersaults) in 10 of the 12 flights, and the model learns that instead of
reading the twist. `--bank-free-flight-share P` does the same for the feature-bank stage's train
split (data/train_free<P>). Validation keeps the table's videos; the probe is fitted on data/train.

`--zoom` trains an `s3d_zoom` encoder (`export.models.s3d_zoom`, `--zoom-variant`) instead of `s3d`: its localiser
learns, in both stages, the torso's middle in every frame that has a figure, from the generator's
own geometry (`diagnose_counts.figure_track`, recomputed from each video's seed and its split's
spec; no generator change). The record adds the localiser's error on validation flight clips.
`--init-encoder` starts from a `count_specialist` run's encoder (the same encoder and variant):
per-clip count pre-training on all-flight free clips before the warm-up.

`--count-loss W` keeps that pre-training's loss in the recipe (`CountLoss`): every step of both
stages adds W x the count specialist's loss on a batch of its all-flight free clips.
`--save-at 0,500,...` saves the encoder and decoder after those warm-up steps (0: before the first)
as runs/count_study_NAME_w<step>.pt, and with `--bank-steps` the warm-up's end as
runs/count_study_NAME_warmup.pt, for `count_specialist --probe` and `diagnose_counts --grid`
while the run goes on: where does the recipe lose what the encoder read?
`--from-save PT` skips the warm-up: the run starts from such a save's encoder and decoder, and from
the random draws where it was saved, so the feature-bank stage from a `_warmup.pt` save is the one
the saving run trained (given the same bank data); without `--bank-steps` it only scores the save.
Pass the save's encoder arguments (`--zoom`, `--zoom-variant`, ...) again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from dataclasses import asdict, replace

import numpy as np
import torch
from torch import nn

from export import REPO, build, count_specialist, data, diagnose_counts, synth, train, vocab
from export.models import s3d_zoom

COUNT_BATCH = 8  # all-flight free clips per step: a sixth of a warm-up step's clips


def free_flight_split(split: str, share: float) -> Path:
    """The split's spec with a share of its flights off the class table: data/<split> at the split's
    own share (`build.FREE_FLIGHT_SHARE`), else data/<split>_free<share>."""
    folder, count, seed, lo, hi = build.SPLITS[split]
    if share == build.FREE_FLIGHT_SHARE.get(split, 0.0):
        return REPO / "data" / folder
    out = REPO / "data" / f"{folder}_free{share:g}"
    if not (out / "labels.jsonl").exists():
        synth.write_dataset(out, count=count, seed=seed, fps=build.FPS, min_seconds=lo, max_seconds=hi,
                            null_every=build.NULL_EVERY, free_flight_share=share)
    return out


class CountLoss(nn.Module):
    """`count_specialist`'s loss inside the recipe: each call draws `batch` clips of a specialist bank
    (`count_specialist.flight_clips`: wholly in flight, free flights) and returns `weight` x (the
    cross-entropy of a linear somersault head and a linear twist head on their features, plus the
    localiser's loss on the bank's torso positions for an `s3d_zoom`), as the specialist trains."""

    def __init__(self, bank: dict[str, np.ndarray], feature_dim: int, weight: float, seed: int,
                 batch: int = COUNT_BATCH):
        super().__init__()
        if weight <= 0 or batch < 1:
            raise ValueError(f"CountLoss needs weight > 0 and batch >= 1, got {weight}, {batch}")
        self.bank, self.weight, self.batch = bank, weight, batch
        self.rng = np.random.default_rng([seed, 1])  # its own draws: the recipe's video order is unchanged
        self.heads = nn.ModuleList(nn.Linear(feature_dim, len(vocab.ATTRIBUTES[q])) for q in count_specialist.COUNTS)

    def forward(self, encoder: nn.Module) -> torch.Tensor:
        idx = np.sort(self.rng.choice(len(self.bank["clips"]), self.batch, replace=False))
        return self.weight * count_specialist.specialist_loss(encoder, self.heads, self.bank, idx)[0]


def save(path: Path, args: argparse.Namespace, encoder: nn.Module, tqn: nn.Module, rng: np.random.Generator) -> None:
    """The encoder and decoder, and the random state (`restore`)."""
    torch.save({"args": vars(args), "encoder": encoder.state_dict(), "tqn": tqn.state_dict(),
                "rng": {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}}, path)


def restore(path: Path | str, encoder: nn.Module, tqn: nn.Module) -> np.random.Generator:
    """Load a `save` into `encoder` and `tqn`, and return the recipe's generator (torch's global one
    reset too) as they were when it was saved: training goes on as it would have in the saving run."""
    saved = torch.load(path, weights_only=False)
    encoder.load_state_dict(saved["encoder"])
    tqn.load_state_dict(saved["tqn"])
    torch.set_rng_state(saved["rng"]["torch"])
    rng = np.random.default_rng()
    rng.bit_generator.state = saved["rng"]["numpy"]
    return rng


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--warmup-steps", type=int, default=train.Budget().warmup_steps)
    parser.add_argument("--bank-steps", type=int, default=0)
    parser.add_argument("--stem-difference", action="store_true")
    parser.add_argument("--fine-stem", action="store_true", help="4x4 patches, max-pooled to 8x8 after the stem")
    parser.add_argument("--rate-loss", type=float, default=0.0)
    parser.add_argument("--free-flight-share", type=float, default=build.FREE_FLIGHT_SHARE["short"])
    parser.add_argument("--zoom", action="store_true", help="an s3d_zoom encoder, its localiser's target from geometry")
    parser.add_argument("--zoom-variant", choices=sorted(s3d_zoom.VARIANTS), default=diagnose_counts.ZOOM_VARIANT)
    parser.add_argument("--init-encoder", metavar="PT", help="start from a count_specialist save's encoder")
    parser.add_argument("--count-loss", type=float, default=0.0, metavar="W",
                        help="add W x the count specialist's loss on its free-flight clips to every step")
    parser.add_argument("--save-at", default="", metavar="STEPS", help="comma-separated warm-up steps to save after")
    parser.add_argument("--from-save", metavar="PT", help="skip the warm-up: start from a count_study save")
    parser.add_argument("--bank-free-flight-share", type=float, default=build.FREE_FLIGHT_SHARE["train"], metavar="P",
                        help="the feature-bank stage on data/train_free<P>")
    parser.add_argument("--seed", type=int, default=build.TRAIN_SEED)
    args = parser.parse_args()
    if args.from_save and (args.init_encoder or args.save_at or args.rate_loss
                           or args.free_flight_share != parser.get_default("free_flight_share")):
        parser.error("--from-save skips the warm-up: drop the warm-up's options (the save has them)")
    torch.set_num_threads(train.TRAIN_THREADS)
    start = time.monotonic()
    splits = {s: data.load(REPO / "data" / s) for s in ("train", "val")}
    if not args.from_save:
        splits["short"] = data.load(free_flight_split("short", args.free_flight_share))
    bank_data = data.load(free_flight_split("train", args.bank_free_flight_share))
    budget = replace(train.Budget(), warmup_steps=args.warmup_steps, bank_steps=max(1, args.bank_steps))
    rng = train.seed_everything(args.seed)
    encoder = diagnose_counts.study_encoder(vars(args))
    if args.init_encoder:
        encoder.load_state_dict(torch.load(args.init_encoder, weights_only=False)["encoder"])
    track = ({"train": diagnose_counts.figure_track(bank_data, "train", args.bank_free_flight_share),
              "val": diagnose_counts.figure_track(splits["val"], "val"),
              **({} if args.from_save else
                 {"short": diagnose_counts.figure_track(splits["short"], "short", args.free_flight_share)})}
             if args.zoom else {})
    tqn, avg, clip_head = train.build_tqn(), train.build_average_pooling(), train.build_short_term()
    count_loss = (CountLoss(count_specialist.specialist_bank(), encoder.feature_dim, args.count_loss, args.seed)
                  if args.count_loss > 0 else None)
    out = REPO / "runs"
    out.mkdir(exist_ok=True)
    save_at = {int(s) for s in args.save_at.split(",") if s}

    def after_step(step: int) -> None:
        if step in save_at:
            save(out / f"count_study_{args.name}_w{step}.pt", args, encoder, tqn, rng)

    if args.from_save:
        rng = restore(args.from_save, encoder, tqn)
    else:
        after_step(0)
        train.warmup(encoder, [tqn, avg], clip_head, splits["short"], budget, rng, rate_weight=args.rate_loss,
                     torso=track.get("short"), extra=count_loss, after_step=after_step)
        if args.bank_steps:
            save(out / f"count_study_{args.name}_warmup.pt", args, encoder, tqn, rng)
    if args.bank_steps:
        train.train_with_bank("tqn", encoder, tqn, bank_data, train.build_bank(encoder, bank_data),
                              budget, rng, torso=track.get("train"), extra=count_loss)
    val = splits["val"]
    preds = train.predict(encoder, tqn, val)
    summary = build.summarise(preds, val)
    record = {"name": args.name, "args": vars(args), "budget": asdict(budget),
              "threads": train.TRAIN_THREADS, "val_tqn_accuracy": summary["accuracy"],
              "val_tqn_by_flight": diagnose_counts.by_flight(preds, val),
              "probe": diagnose_counts.probe_report(encoder, splits["train"], val),
              **({"val_localiser_error_px": diagnose_counts.localiser_error(encoder, val, track["val"])}
                 if args.zoom else {}),
              "seconds": round(time.monotonic() - start),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(record), flush=True)
    with open(out / "count_study.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    save(out / f"count_study_{args.name}.pt", args, encoder, tqn, rng)


if __name__ == "__main__":
    main()
