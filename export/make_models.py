"""`vqs models`: the served models, rebuilt from nothing, part by part; each part is its own make
target, so each keeps its own time box (`make models` = tqn, `make models-adaptive`,
`make models-segments`).

Parts, in the order they run (a later part reads what an earlier one served):
- `tqn`: data splits, the s3d clip encoder + TQN decoder and both baselines, calibration,
  in-domain fit, test once, the controls (`export/build.py`; export/evaluation.json);
- `adaptive`: s3d_sgs and the ViT pair (vit, vit_ats), trained against the served s3d and TQN
  decoder, so after `tqn` whenever that changes (`export/train_adaptive.py`;
  export/adaptive_training.json);
- `segments`: the action parser and the frame embedder with their baselines and ablations
  (`export/segments_export.py`); it does not depend on the others.
Each part's wall time is printed and written to export/models_timing.json (a run's output, not committed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from export.build import REPO

PARTS = ("tqn", "adaptive", "segments")
DEFAULT_PARTS = ("tqn",)
TIMING = REPO / "export" / "models_timing.json"


def _tqn(data_dir: Path) -> None:
    from export import build

    build.main(data_dir)


def _adaptive(data_dir: Path) -> None:
    from export import build, train_adaptive

    build.make_splits(data_dir)  # the same splits as `tqn` (reused when current): its own target may run first
    train_adaptive.build_adaptive(data_dir)


def _segments(data_dir: Path) -> None:
    from export import segments_export

    segments_export.build_segments()


BUILDERS = {"tqn": _tqn, "adaptive": _adaptive, "segments": _segments}


def chosen_parts(parts: list[str] | None) -> list[str]:
    """The parts to build, in build order (DEFAULT_PARTS when none are named)."""
    unknown = sorted(set(parts or []) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; choose from {list(PARTS)}")
    return [p for p in PARTS if p in (parts or DEFAULT_PARTS)]


def main(parts: list[str] | None = None, data_dir: Path | None = None) -> dict[str, float]:
    data_dir = Path(data_dir or REPO / "data")
    seconds: dict[str, float] = {}
    for part in chosen_parts(parts):
        start = time.monotonic()
        BUILDERS[part](data_dir)
        seconds[part] = round(time.monotonic() - start)
        print(f"models: {part} built in {seconds[part]:.0f} s", flush=True)
    previous = json.loads(TIMING.read_text()) if TIMING.exists() else {}
    TIMING.write_text(json.dumps({**previous, **seconds}, indent=2) + "\n")
    return seconds
