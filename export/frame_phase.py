"""How much a 1/30 s frame phase moves the served TQN's answers (`python -m export.frame_phase`).

The gateway samples a 30 fps video at the encoder's 15 fps: it takes the 30 fps render's even
frames (those of the 15 fps render) or, where a non-reference frame is skipped, the next one.
Here each of N routines is rendered at 15 and at 30 fps (the settings of the 30 fps test in
tests/integration/test_analyze.py, more videos), decoded like the training data, and the served
models' weights (model_repository, temperatures included) answer the 15 fps video and three
samplings of its 30 fps twin: even frames (the ideal pick), odd frames (every sample one 30 fps
frame late: the most skipping can do) and consecutive frames (broken sampling, half the motion).
Printed per sampling and motion query: the largest probability change against the 15 fps answer
(mean, max) and how often the arg-max is the same; and the change averaged over every group of 4
videos and the three queries (what the test bounds)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export import build, data, train
from export.data import CLIP_FRAMES
from export.models.tqn import TQNDecoder
from export.synth import write_dataset

QUERIES = ("somersaults", "twists", "flight_pose")
SAMPLINGS = {"even": lambda f: f[0::2], "odd": lambda f: f[1::2], "consecutive": lambda f: f}
TEST_VIDEOS = 4  # the 30 fps test's videos


def _served_decoder() -> TQNDecoder:
    folder = build.MODEL_REPOSITORY / "tqn_decoder" / "1"
    model = TQNDecoder(**json.loads((folder / "model.json").read_text())["config"])
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval()


@torch.inference_mode()
def answers(encoder: nn.Module, decoder: TQNDecoder, frames: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities per query from all clips of these frames (the last clip padded, as served)."""
    n = -(-len(frames) // CLIP_FRAMES)
    idx = np.arange(n * CLIP_FRAMES).clip(max=len(frames) - 1)
    features = encoder(torch.from_numpy(np.ascontiguousarray(frames[idx].reshape(n, CLIP_FRAMES, *frames.shape[1:]))))
    outputs = decoder(features[None], torch.ones(1, n, dtype=torch.bool))
    return {q: torch.softmax(logits[0], -1).numpy() for q, logits in zip(train.HEADS, outputs)}


def measure(videos: int, folder: Path) -> dict[str, dict]:
    encoder, decoder = train.load_served_encoder(build.MODEL_REPOSITORY / "clip_encoder_s3d")[0], _served_decoder()
    for fps in (15, 30):
        write_dataset(folder / f"fps{fps}", count=videos, seed=777, fps=fps, codec="h264",
                      min_seconds=4.0, max_seconds=10.0, workers=1)
    records = [json.loads(line) for line in (folder / "fps15" / "labels.jsonl").read_text().splitlines()]
    moves = {s: np.zeros((videos, len(QUERIES))) for s in SAMPLINGS}
    same = {s: np.zeros((videos, len(QUERIES)), bool) for s in SAMPLINGS}
    for v, record in enumerate(records):
        at15 = answers(encoder, decoder, data._decode(str(folder / "fps15" / record["file"])))
        frames30 = data._decode(str(folder / "fps30" / record["file"]))
        for name, pick in SAMPLINGS.items():
            at30 = answers(encoder, decoder, pick(frames30))
            for i, q in enumerate(QUERIES):
                moves[name][v, i] = np.abs(at30[q] - at15[q]).max()
                same[name][v, i] = at30[q].argmax() == at15[q].argmax()
    groups = videos // TEST_VIDEOS * TEST_VIDEOS
    return {name: {"per_query": {q: {"mean_move": float(moves[name][:, i].mean()),
                                     "max_move": float(moves[name][:, i].max()),
                                     "same_argmax": float(same[name][:, i].mean())}
                                 for i, q in enumerate(QUERIES)},
                   "mean_move_per_4_videos": moves[name][:groups].reshape(-1, TEST_VIDEOS * len(QUERIES))
                   .mean(1).round(3).tolist()}
            for name in SAMPLINGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.videos, Path(tmp))
    for name, r in result.items():
        for q, m in r["per_query"].items():
            print(f"{name:12s} {q:12s} move mean {m['mean_move']:.3f} max {m['max_move']:.3f} "
                  f"same arg-max {100 * m['same_argmax']:.0f}%")
        groups = r["mean_move_per_4_videos"]
        print(f"{name:12s} mean move per 4 videos (3 queries): min {min(groups):.3f} max {max(groups):.3f} {groups}")


if __name__ == "__main__":
    main()
