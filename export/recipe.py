"""How `vqs models` and `make seeds` train the served models for one seed: TQN's curriculum
(`export.train`) after a count pre-training of the encoder, laid out over the machine's 2 cores.

0. Count pre-training: the served encoder (`train.SERVED_ENCODER`) is trained as a per-clip count
   specialist (`count_specialist.train_specialist`) on the all-flight clips of `build.FLIGHT_ROUTINES`
   freely drawn flights, learning their somersaults and twists and where the diver is. Without it
   no recipe taught the encoder the twist (docs/recipe.md "Teaching the twist").
1. The warm-up from that encoder (`train.warmup`, the short split).
2. From the warm-up, at once: TQN's and average pooling's feature-bank stages and the short-term
   baseline (`train.train_with_bank`, `train.train_short_term`), each in its own process with its
   own random stream (STREAMS).
Stages 0 and 1 are data-parallel over `train.TRAIN_PROCESSES` processes (`export.parallel`); so is the
bank's first fill. In every stage the localiser learns where the torso is, from the generator's
geometry (`diagnose_counts.figure_track`). The controls (`controls`) run as two processes too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from export import count_specialist, diagnose_counts, parallel, train
from export.data import ClipDataset, shuffle_frames

STREAMS = {"tqn": 1, "average_pooling": 2, "short_term": 3, "single_frame": 4, "shuffled": 5}


def _threads() -> None:
    torch.set_num_threads(train.TRAIN_THREADS)


def _pretrain(shard: parallel.Shard, flights: Path, budget: train.Budget, seed: int):
    _threads()
    encoder, _ = count_specialist.train_specialist(
        count_specialist.read_flight_bank(flights), encoder="s3d-zoom", zoom_variant=train.SERVED_ENCODER,
        steps=budget.specialist_steps, forced_window_steps=budget.specialist_forced_window_steps, seed=seed,
        shard=shard)
    return encoder


def _warmup(shard: parallel.Shard, encoder, short: ClipDataset, torso: np.ndarray, budget: train.Budget,
            seed: int) -> tuple:
    _threads()
    rng = train.seed_everything(seed)
    tqn, avg, short_term = train.build_tqn(), train.build_average_pooling(), train.build_short_term()
    train.warmup(encoder, [tqn, avg], short_term, short, budget, rng, torso=torso, shard=shard)
    return encoder, tqn, avg, short_term


@torch.inference_mode()
def _bank(shard: parallel.Shard, encoder, ds: ClipDataset) -> torch.Tensor:
    """`train.build_bank`, each rank filling every world-th video, summed over the ranks."""
    _threads()
    encoder.eval()
    bank = torch.zeros(ds.total_clips, encoder.feature_dim)
    for v in shard.take(range(len(ds.records))):
        o = int(ds.clip_offset[v])
        bank[o : o + int(ds.num_clips[v])] = train.clip_features(encoder, ds, v)
    if shard.world > 1:
        dist.all_reduce(bank)
    return bank


def _seed(seed: int, name: str) -> np.random.Generator:
    torch.manual_seed(seed * 100 + STREAMS[name])
    return np.random.default_rng([seed, STREAMS[name]])


def _bank_stage(name: str, encoder, head, ds: ClipDataset, bank: torch.Tensor, torso: np.ndarray,
                budget: train.Budget, seed: int) -> tuple:
    _threads()
    train.train_with_bank(name, encoder, head, ds, bank, budget, _seed(seed, name), torso=torso)
    return encoder, head


def _short_term_stage(encoder, head, datasets: list[ClipDataset], torsos: list[np.ndarray], budget: train.Budget,
                      seed: int) -> tuple:
    _threads()
    train.train_short_term(encoder, head, datasets, budget, _seed(seed, "short_term"), torsos)
    return encoder, head


def torso_tracks(short: ClipDataset, full: ClipDataset) -> dict[str, np.ndarray]:
    """The localiser's target per frame of the two training splits, a process each."""
    tracks = parallel.concurrently([(diagnose_counts.figure_track, (short, "short")),
                                    (diagnose_counts.figure_track, (full, "train"))])
    return dict(zip(("short", "train"), tracks))


def train_all(short: ClipDataset, full: ClipDataset, flights: Path, budget: train.Budget,
              seed: int) -> tuple[dict[str, tuple], tuple]:
    """({model name: (encoder, head)} for tqn, average_pooling and short_term; the warm-up's
    (encoder, tqn) for the controls). `flights`: `count_specialist.write_flight_bank`'s folder."""
    _threads()
    torso = torso_tracks(short, full)
    encoder = parallel.run(_pretrain, train.TRAIN_PROCESSES, flights, budget, seed)
    encoder, tqn, avg, short_term = parallel.run(_warmup, train.TRAIN_PROCESSES, encoder, short, torso["short"],
                                                 budget, seed)
    bank = parallel.run(_bank, train.TRAIN_PROCESSES, encoder, full)
    trained = parallel.concurrently([
        (_bank_stage, ("tqn", encoder, tqn, full, bank, torso["train"], budget, seed)),
        (_bank_stage, ("average_pooling", encoder, avg, full, bank, torso["train"], budget, seed)),
        (_short_term_stage, (encoder, short_term, [full, short], [torso["train"], torso["short"]], budget, seed)),
    ])
    return dict(zip(("tqn", "average_pooling", "short_term"), trained)), (encoder, tqn)


def _single_frame(short: ClipDataset, full: ClipDataset, budget: train.Budget, seed: int) -> tuple:
    _threads()
    encoder = train.MiddleFrame(train.build_encoder(temporal_kernel_size=1))
    return train.train_tqn_only("single-frame", encoder, short, full, budget, _seed(seed, "single_frame"))


def _shuffled(encoder, tqn, full: ClipDataset, shuffle_seed: int, budget: train.Budget, seed: int) -> tuple:
    _threads()
    shuffled = shuffle_frames(full, shuffle_seed)
    return _bank_stage("shuffled", encoder, tqn, shuffled, train.build_bank(encoder, shuffled),
                       diagnose_counts.figure_track(full, "train"), budget, seed)


def controls(short: ClipDataset, full: ClipDataset, warm: tuple, budget: train.Budget, seed: int,
             shuffle_seed: int) -> dict[str, tuple]:
    """{"single_frame": ..., "shuffled": ...}, TQN models that cannot use motion, two processes at
    once: "single_frame" reads one frame per clip with a 2D CNN (its own warm-up; no count
    pre-training, which a single frame cannot follow); "shuffled" goes on from the warm-up `warm`
    (encoder, tqn) with the feature-bank stage on frame-shuffled videos (the localiser's target
    shuffled with the frames), and must be tested on shuffled videos too."""
    single, shuffled = parallel.concurrently([(_single_frame, (short, full, budget, seed)),
                                              (_shuffled, (*warm, full, shuffle_seed, budget, seed))])
    return {"single_frame": single, "shuffled": shuffled}


@torch.inference_mode()
def _logits(models: dict[str, tuple], ds: ClipDataset) -> dict[str, dict[str, np.ndarray]]:
    _threads()
    return {name: train.video_logits(encoder, head, ds) for name, (encoder, head) in models.items()}


def logits(models: dict[str, tuple], splits: list[ClipDataset]) -> list[dict[str, dict[str, np.ndarray]]]:
    """`train.video_logits` of every model on each split, a process per split."""
    return parallel.concurrently([(_logits, (models, ds)) for ds in splits])
