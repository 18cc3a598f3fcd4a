"""Golden snapshot of served outputs (after text-generation-inference's snapshot tests).

A few fixed videos, generated at test time by the project's own renderer, are analysed through
the real gateway and Triton; what the gateway answered (every query's attribute, probability and
distribution, the attention over clips, the video summary) is stored in `analyze.json` beside
this file, with the tolerance it is held to. `tests/integration/test_analyze.py` compares what
is served now against it. The snapshot says what the served models answer, not whether they
are right: accuracy is measured by `make models` on held-out data.

After retraining (or any intended change of outputs) regenerate it with one command,
`make golden` (`python -m tests.golden.regenerate`), and review the diff it prints.

Tolerance: a probability or an attention weight may move by `TOLERANCE[...]` (absolute). The
same models over the same video differ by ~1e-5 between runs (Triton batching other requests'
clips beside them, ONNX Runtime on another CPU); 0.02 leaves room for a different ffmpeg/x264
build encoding the rendered frames slightly differently, and is far below what a retrained model
or a change in sampling moves. An answer must be the snapshot's attribute, unless the snapshot's
top two were within two tolerances of each other (then either may win). Clip and frame counts
must be equal.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SNAPSHOT = Path(__file__).with_name("analyze.json")
TOLERANCE = {"probability": 0.02, "attention": 0.02}
# Served model files whose change explains a changed output (reported on a mismatch).
MODEL_FILES = (
    "clip_encoder_s3d/config.pbtxt",
    "clip_encoder_s3d/1/model.onnx",
    "tqn_decoder/config.pbtxt",
    "tqn_decoder/1/model.onnx",
)


@dataclass(frozen=True)
class Case:
    """One fixed video: `export.synth.render_video` arguments."""

    name: str
    seed: int
    seconds: float
    fps: float = 15
    codec: str = "h264"
    width: int = 112
    height: int = 112

    @property
    def filename(self) -> str:
        return f"{self.name}.{'avi' if self.codec == 'mpeg4' else 'mp4'}"

    def arguments(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "name"}


CASES = (
    Case("dive_6s", seed=2001, seconds=6.0),
    Case("dive_12s_30fps", seed=2002, seconds=12.0, fps=30),
    Case("dive_8s_mpeg4", seed=2003, seconds=8.0, codec="mpeg4"),
    Case("dive_20s_160x120", seed=2004, seconds=20.0, width=160, height=120),
)


def render(case: Case, folder: Path) -> Path:
    from export.synth import render_video

    path = Path(folder) / case.filename
    if not path.exists():
        render_video(path, **case.arguments())
    return path


def served(response) -> dict:
    """The parts of an `AnalyzeResponse` the snapshot holds (no timings, no request id)."""
    v = response.video
    return {
        "video": {
            "clips": v.clips, "frames": v.frames, "width": v.width, "height": v.height,
            "fps": round(v.fps, 6), "duration_s": round(v.duration_s, 6),
        },
        "encoder": response.encoder,
        "answers": {
            a.query: {
                "attribute": a.attribute,
                "probability": round(a.probability, 6),
                "distribution": {k: round(p, 6) for k, p in sorted(a.distribution.items())},
            }
            for a in response.answers
        },
        "attention": {m.query: [round(w, 6) for w in m.weights] for m in response.attention},
    }


def fingerprint(repository: Path) -> dict[str, str]:
    """sha256 (first 16 hex digits) of each served model file; "missing" where absent."""
    out = {}
    for name in MODEL_FILES:
        path = Path(repository) / name
        out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
    return out


def load(path: Path = SNAPSHOT) -> dict:
    return json.loads(Path(path).read_text())


def dump(snapshot: dict, path: Path = SNAPSHOT) -> None:
    text = json.dumps(snapshot, indent=1)
    # One line per list of numbers (the attention weights), so a diff shows which query moved.
    numbers = re.compile(r"\[\s*([-0-9.e,\s]+?)\s*\]")
    text = numbers.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    Path(path).write_text(text + "\n")


def compare(want: dict, got: dict, tolerance: dict = TOLERANCE) -> list[str]:
    """What differs between a snapshot case and served outputs beyond the tolerance (empty: same)."""
    problems = []
    wv, gv = want["video"], got["video"]
    for key in ("clips", "frames", "width", "height"):
        if wv[key] != gv[key]:
            problems.append(f"video {key}: {gv[key]} served, {wv[key]} in the snapshot")
    for key in ("fps", "duration_s"):
        if abs(wv[key] - gv[key]) > 1e-3:
            problems.append(f"video {key}: {gv[key]} served, {wv[key]} in the snapshot")
    if want["encoder"] != got["encoder"]:
        problems.append(f"encoder {got['encoder']!r} served, {want['encoder']!r} in the snapshot")
    if list(want["answers"]) != list(got["answers"]):
        problems.append(f"queries {list(got['answers'])} served, "
                        f"{list(want['answers'])} in the snapshot")
        return problems

    p_tol, a_tol = tolerance["probability"], tolerance["attention"]
    for query, w in want["answers"].items():
        g = got["answers"][query]
        if set(w["distribution"]) != set(g["distribution"]):
            problems.append(f"{query}: attributes {sorted(g['distribution'])} served, "
                            f"{sorted(w['distribution'])} in the snapshot")
            continue
        moved = {k: g["distribution"][k] - p for k, p in w["distribution"].items()
                 if abs(g["distribution"][k] - p) > p_tol}
        if moved:
            problems.append(f"{query}: probabilities moved beyond {p_tol}: "
                            + ", ".join(f"{k} {d:+.4f}" for k, d in moved.items()))
        ranked = sorted(w["distribution"].items(), key=lambda kv: -kv[1])
        allowed = {ranked[0][0]}
        if len(ranked) > 1 and ranked[0][1] - ranked[1][1] <= 2 * p_tol:
            allowed.add(ranked[1][0])  # a near tie in the snapshot: either may win
        if g["attribute"] not in allowed:
            problems.append(f"{query}: answered {g['attribute']!r} "
                            f"({g['probability']:.3f}), snapshot {w['attribute']!r} "
                            f"({w['probability']:.3f})")

    for query, weights in want["attention"].items():
        served_weights = got["attention"].get(query, [])
        if len(served_weights) != len(weights):
            problems.append(f"attention {query}: {len(served_weights)} weights served, "
                            f"{len(weights)} in the snapshot")
            continue
        worst = max((abs(a - b) for a, b in zip(weights, served_weights)), default=0.0)
        if worst > a_tol:
            problems.append(f"attention {query}: a weight moved by {worst:.4f} (> {a_tol})")
    return problems
