"""Procedural fine-grained diving videos (generator version 2): real encoded files plus `labels.jsonl`.

A stick-figure diver on a cluttered, panning background performs a routine
run-up (idle) -> take-off -> flight -> entry -> idle (figure gone, splash). Only flight pose and
take-off can be read from a single frame; somersaults and twists need the motion.

What each label depends on (and nothing else does):
- take_off: during the 0.6 s take-off only, a lean (backwards for backward/reverse, forwards for
  forward/inward, +-45 deg) and a pencil (backward/forward) or star (reverse/inward) shape, reached
  in the first third and held. Before and after, the figure is drawn identically for every take-off.
- somersaults s: flight lasts FLIGHT_S (x U(0.97, 1.03)), during which the body turns at 360*s deg
  per flight; the rotation starts at a random phase U(0, 360) deg drawn per video, so orientation
  at any instant (including entry) is uniform whatever s is: only the rotation *speed* tells s.
- twists n: the twist angle starts at a random phase U(0, 2 pi) and turns 2 pi n per flight; it is
  drawn continuously: the torso's colour is a blend of a warm front and a cool back by
  (1 + cos angle) / 2 and the body's width follows |cos angle|. A still frame shows a uniformly
  random twist angle whatever n is; only the *rate* of change tells n. (n = 0 holds one random
  appearance for the whole flight.)
- flight_pose: the body shape during flight (tuck, pike, straight, free), settled after 12% of it.
- class: the combination, restricted to vocab.CLASSES (48 valid, every flight with all four
  take-offs). The 12 flights of that table tie the counts to the pose: in 10 of them the twists
  follow from (pose, somersaults), so a model can answer twists without reading the twist.
  `free_flight_share` = p > 0 (training data only) draws, for a share p of the routines, the
  somersaults, twists and pose independently and uniformly instead (a flight off the table:
  `flight_table` false, its class named but in no head, so no class target); the draw comes from
  its own random stream, so p = 0 gives exactly the videos of the table alone.
- null videos (`kind` other than "routine"; `write_dataset(null_every=k)` makes every k-th video
  one, cycling through NULL_KINDS): "idle" (the diver stands on the board, barely moving), "walk_off"
  (the diver walks along the board and out of the picture), "background" (no diver at all), "cut"
  (the run-up, and the video ends before the take-off starts). Every query and the class are
  "null"; there is no splash; phases are all "before" and every boundary is the video's end.

Label-independent nuisances, all drawn from the video's seed: duration U(min, max) s; routine
start anywhere in the slack (U(0.05, 0.95)); background texture and pan; 4-8 clutter shapes moving
at random velocities; a spinning distractor bar at U(-720, 720) deg/s; figure scale U(0.9, 1.1),
board position, forward travel; sensor noise; codec (mixed h264/mpeg4 in datasets).

Generator parameters: TAKEOFF_S, FLIGHT_S, ENTRY_S (phase lengths), the pose table `_POSES`,
colours, NOISE_SCALE, fps (15 in every dataset), width/height (112), min/max seconds per split.
`GENERATOR_VERSION` is written into every labels.jsonl record; bump it whenever pixels or labels
can change for a seed, so data and artifacts from another version are never mixed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import cv2
import numpy as np

from export import vocab

GENERATOR_VERSION = 3
ROUTINE = "routine"
NULL_KINDS = ("idle", "walk_off", "background", "cut")
TAKEOFF_S = 0.6
FLIGHT_S = 1.4
ENTRY_S = 0.3
ACTION_S = TAKEOFF_S + FLIGHT_S + ENTRY_S
PHASES = ("before", "take_off", "flight", "entry", "after")

CODECS = {
    # codec -> (file suffix, encoder name, encoder options)
    "h264": (".mp4", "libx264", {"crf": "20", "preset": "superfast"}),
    "mpeg4": (".avi", "mpeg4", {"qscale": "3"}),
    "vp9": (".webm", "libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
}
# Datasets mix codecs so the serving path sees more than H.264.
MIXED_CODECS = ("h264", "h264", "h264", "h264", "mpeg4")

FRONT_COLOUR = (235, 70, 40)
BACK_COLOUR = (40, 90, 235)
SKIN_COLOUR = (250, 215, 170)
LIMB_COLOUR = (250, 250, 250)
WATER_COLOUR = (20, 110, 170)
NOISE_SCALE = 112


@dataclass(frozen=True)
class Routine:
    """Everything that decides a video's pixels and labels."""

    seed: int
    duration_s: float
    start_s: float
    flight_s: float
    labels: dict[str, str]
    rotation_phase: float = 0.0  # degrees, orientation when flight starts
    twist_phase: float = 0.0  # radians, twist angle when flight starts
    kind: str = ROUTINE  # or one of NULL_KINDS: no routine in the video
    walk_speed: float = 0.0  # "walk_off": figure heights per second towards the left edge
    flight_table: bool = True  # the flight is one of vocab.CLASSES' (False: drawn attribute by attribute)


def sample_routine(rng: np.random.Generator, seed: int, seconds: float | None,
                   min_seconds: float = 2.0, max_seconds: float = 20.0, kind: str = ROUTINE,
                   free_flight_share: float = 0.0) -> Routine:
    if kind != ROUTINE and kind not in NULL_KINDS:
        raise ValueError(f"unknown video kind {kind!r}; choose {ROUTINE!r} or one of {NULL_KINDS}")
    if not 0.0 <= free_flight_share <= 1.0:
        raise ValueError(f"free_flight_share must be in [0, 1], got {free_flight_share}")
    if seconds is None:
        seconds = float(rng.uniform(max(min_seconds, ACTION_S + 0.2), max_seconds))
    combo = vocab.CLASSES[rng.integers(len(vocab.CLASSES))]
    labels = dict(zip(vocab.QUERIES, combo))
    flight_s = FLIGHT_S * float(rng.uniform(0.97, 1.03))
    action_s = TAKEOFF_S + flight_s + ENTRY_S
    slack = max(0.0, seconds - action_s)
    start_s = float(rng.uniform(0.05, 0.95)) * slack
    rotation_phase, twist_phase = float(rng.uniform(0, 360)), float(rng.uniform(0, 2 * math.pi))
    walk_speed = 0.0
    flight_table = True
    free = np.random.default_rng([seed, 3])  # its own stream: the table's videos stay as they were
    if kind == ROUTINE and free.uniform() < free_flight_share:
        flight = {q: vocab.ATTRIBUTES[q][free.integers(len(vocab.ATTRIBUTES[q]))] for q in vocab.QUERIES[1:]}
        labels = {**labels, **flight}
        flight_table = vocab.class_name(labels) in vocab.CLASS_NAMES
    if kind != ROUTINE:  # the same draws as a routine, so only the labels and the figure differ
        labels = {q: vocab.NULL for q in vocab.QUERIES}
        start_s = seconds  # nothing starts inside the video
        walk_speed = float(rng.uniform(2.0, 4.0)) / max(seconds, 1.0) if kind == "walk_off" else 0.0
    return Routine(seed=seed, duration_s=seconds, start_s=start_s, flight_s=flight_s, labels=labels,
                   rotation_phase=rotation_phase, twist_phase=twist_phase, kind=kind, walk_speed=walk_speed,
                   flight_table=flight_table)


def phase_times(routine: Routine) -> list[float]:
    """Start time of take-off, flight, entry and the idle after (all the video's end without a routine)."""
    if routine.kind != ROUTINE:
        return [routine.duration_s] * 4
    t0 = routine.start_s
    t1 = t0 + TAKEOFF_S
    t2 = t1 + routine.flight_s
    t3 = t2 + ENTRY_S
    return [t0, t1, t2, t3]


# ---------------------------------------------------------------- body model
# Joint angles in degrees in the body frame: 0 = along the torso towards the head, positive
# = towards the figure's front. Limbs: (upper angle, lower angle relative to the upper).
_POSES = {
    "stand": dict(arm=(175, 10), leg=(180, 0), spread=12),
    "crouch": dict(arm=(150, 20), leg=(155, -60), spread=12),
    "tuck": dict(arm=(110, 70), leg=(60, -150), spread=6),
    "pike": dict(arm=(95, 0), leg=(95, 0), spread=4),
    "straight": dict(arm=(0, 0), leg=(180, 0), spread=3),
    "free": dict(arm=(90, 0), leg=(180, 0), spread=25),
    "pencil": dict(arm=(0, 0), leg=(180, 0), spread=6),
    "star": dict(arm=(0, 0), leg=(180, 0), spread=100),
}


def _lerp_pose(a: dict, b: dict, w: float) -> dict:
    return {k: (tuple(x + (y - x) * w for x, y in zip(a[k], b[k])) if isinstance(a[k], tuple)
                else a[k] + (b[k] - a[k]) * w) for k in a}


def _skeleton(pose: dict, twist: float) -> tuple[dict[str, np.ndarray], float]:
    """Joint positions (body frame, units of figure height, y up) and the torso's facing."""
    facing = math.cos(twist)
    width = 0.35 + 0.65 * abs(facing)

    def limb(root: np.ndarray, upper: float, lower: float, side: float, length: float):
        a1 = math.radians(upper + side)
        p1 = root + length * np.array([math.sin(a1) * width, math.cos(a1)])
        a2 = a1 + math.radians(lower)
        p2 = p1 + length * np.array([math.sin(a2) * width, math.cos(a2)])
        return p1, p2

    hip = np.array([0.0, 0.0])
    neck = np.array([0.0, 0.36])
    joints = {"hip": hip, "neck": neck, "head": np.array([0.0, 0.47])}
    spread = pose["spread"]
    for side, name in ((-1, "l"), (1, "r")):
        joints[f"elbow_{name}"], joints[f"hand_{name}"] = limb(neck, pose["arm"][0], pose["arm"][1],
                                                               side * spread, 0.19)
        joints[f"knee_{name}"], joints[f"foot_{name}"] = limb(hip, pose["leg"][0], pose["leg"][1],
                                                              side * spread * 0.5, 0.25)
    return joints, facing


def _body_state(routine: Routine, t: float) -> tuple[dict, float, float, float, float, float]:
    """Pose, twist angle, rotation (deg), lean (deg), height offset and forward travel at t."""
    t0, t1, t2, t3 = phase_times(routine)
    labels = routine.labels
    rng_phase = (routine.seed % 997) / 997.0 * 2 * math.pi
    if t < t0:  # run-up: walk in place with swinging arms (an idle diver barely moves)
        swing = (4 if routine.kind == "idle" else 25) * math.sin(2 * math.pi * 1.3 * t + rng_phase)
        pose = dict(_POSES["stand"], arm=(175 + swing, 10))
        return pose, 0.0, 0.0, 0.0, 0.02 * abs(math.sin(2 * math.pi * 1.3 * t)), 0.0
    if t < t1:  # take-off: crouch, then spring with a lean and a pencil or star shape, held
        w = (t - t0) / TAKEOFF_S
        backwards = labels["take_off"] in ("backward", "reverse")
        shape = "pencil" if labels["take_off"] in ("backward", "forward") else "star"
        hold = min(1.0, 3 * w)  # reach the take-off shape in the first third, then hold it
        lean = (-45 if backwards else 45) * hold
        crouch = _lerp_pose(_POSES["stand"], _POSES["crouch"], math.sin(math.pi * min(1.0, 3 * w)))
        pose = _lerp_pose(crouch, _POSES[shape], hold)
        return pose, 0.0, 0.0, lean, 0.08 * w, 0.0
    if t < t2:  # flight: rotate and twist at label-given rates along a parabola
        w = (t - t1) / routine.flight_s
        theta = routine.rotation_phase + 360.0 * float(labels["somersaults"]) * w
        twist = routine.twist_phase + 2 * math.pi * float(labels["twists"]) * w
        settle = min(1.0, w / 0.12)
        pose = _lerp_pose(_POSES["straight"], _POSES[labels["flight_pose"]], settle)
        return pose, twist, theta, 0.0, 0.05 + 0.8 * w * (1 - w) - 0.6 * w * w, w
    # entry: straight line dropping into the water (not drawn once under)
    w = min(1.0, (t - t2) / ENTRY_S)
    theta = routine.rotation_phase + 360.0 * float(labels["somersaults"])
    twist = routine.twist_phase + 2 * math.pi * float(labels["twists"])
    return _POSES["straight"], twist, theta, 0.0, -0.55 - 1.6 * w, 1.0


# ---------------------------------------------------------------- rendering
class _Scene:
    """Per-video constants: background texture, clutter, distractor, geometry."""

    def __init__(self, routine: Routine, width: int, height: int, fps: float):
        rng = np.random.default_rng([routine.seed, 1])
        self.routine, self.width, self.height, self.fps = routine, width, height, fps
        self.unit = min(width, height)
        pad = self.unit // 2
        coarse = rng.uniform(40, 200, size=(6, 9, 3)).astype(np.float32)
        self.texture = cv2.resize(coarse, (width + 2 * pad, height + 2 * pad),
                                  interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)
        self.pad = pad
        self.pan = rng.uniform(-1, 1, size=2) * pad / max(routine.duration_s, 1.0) * 0.9
        self.shapes = [
            dict(kind=rng.choice(["rect", "circle"]), pos=rng.uniform(0, 1, 2) * (width, height),
                 vel=rng.uniform(-0.25, 0.25, 2) * self.unit, size=rng.uniform(0.04, 0.12) * self.unit,
                 colour=tuple(int(c) for c in rng.integers(30, 230, 3)))
            for _ in range(int(rng.integers(4, 9)))
        ]
        self.spinner = dict(pos=rng.uniform((0.1, 0.1), (0.9, 0.5)) * (width, height),
                            speed=rng.uniform(-720, 720), phase=rng.uniform(0, 360),
                            length=rng.uniform(0.08, 0.16) * self.unit,
                            colour=tuple(int(c) for c in rng.integers(60, 256, 3)))
        self.scale = self.unit * 0.38 * rng.uniform(0.9, 1.1)
        self.board_x = width * rng.uniform(0.3, 0.45)
        self.board_y = height * 0.56
        self.travel = width * rng.uniform(0.05, 0.2)
        self.water_y = int(height * 0.78)
        self.water = np.empty((height - self.water_y, width, 3), np.uint8)
        self.water[:] = WATER_COLOUR
        # Sensor noise: a few precomputed non-negative fields, cycled. Its grain is set at the
        # 112-px training scale, so large renders stay as compressible as real camera video.
        grain = min(1.0, NOISE_SCALE / self.unit)
        gh, gw = max(1, round(height * grain)), max(1, round(width * grain))
        noise = rng.integers(0, 9, size=(3, gh, gw, 3), dtype=np.uint8)
        self.noise = noise if (gh, gw) == (height, width) else np.stack(
            [cv2.resize(n, (width, height), interpolation=cv2.INTER_LINEAR) for n in noise])

    def frame(self, index: int) -> np.ndarray:
        t = index / self.fps
        ox, oy = (self.pad + self.pan * t).astype(int).clip(0, 2 * self.pad - 1)
        img = np.ascontiguousarray(self.texture[oy:oy + self.height, ox:ox + self.width])
        self._clutter(img, t)
        lw = max(1, round(self.unit / 56))
        cv2.line(img, (0, int(self.board_y)), (int(self.board_x + 0.05 * self.unit), int(self.board_y)),
                 (200, 200, 190), lw * 2, cv2.LINE_AA)
        self._figure(img, t, lw)
        water = img[self.water_y:]
        cv2.addWeighted(water, 0.45, self.water, 0.55, 0.0, dst=water)
        self._splash(img, t, lw)
        return cv2.add(img, self.noise[index % len(self.noise)])

    def _clutter(self, img: np.ndarray, t: float) -> None:
        for s in self.shapes:
            x, y = (s["pos"] + s["vel"] * t) % (self.width, self.height)
            r = int(s["size"])
            if s["kind"] == "rect":
                cv2.rectangle(img, (int(x - r), int(y - r // 2)), (int(x + r), int(y + r // 2)),
                              s["colour"], -1)
            else:
                cv2.circle(img, (int(x), int(y)), r, s["colour"], -1, cv2.LINE_AA)
        sp = self.spinner
        a = math.radians(sp["phase"] + sp["speed"] * t)
        d = np.array([math.cos(a), math.sin(a)]) * sp["length"]
        p, q = sp["pos"] - d, sp["pos"] + d
        cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), sp["colour"],
                 max(2, round(self.unit / 40)), cv2.LINE_AA)

    def figure_pixels(self, t: float) -> tuple[dict[str, tuple[int, int]], float]:
        """Where the figure's joints are drawn at t (pixel x, y) and the torso's facing (cos of the
        twist angle): the generator's own geometry, for oracles that read the frames."""
        pose, twist, theta, lean, lift, travel = _body_state(self.routine, t)
        joints, facing = _skeleton(pose, twist)
        # Rotate about the body's middle (clockwise on screen), then place on the board/trajectory.
        centre = np.array([0.0, 0.22])
        a = math.radians(-(theta + lean))
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        walked = self.routine.walk_speed * t * self.scale  # "walk_off" only
        origin = np.array([self.board_x + self.travel * travel - walked,
                           self.board_y - self.scale * (0.5 + lift)])

        def px(p: np.ndarray) -> tuple[int, int]:
            q = rot @ (p - centre) + centre
            return int(round(origin[0] + q[0] * self.scale)), int(round(origin[1] - q[1] * self.scale))

        return {name: px(p) for name, p in joints.items()}, facing

    def _figure(self, img: np.ndarray, t: float, lw: int) -> None:
        if t >= phase_times(self.routine)[3] or self.routine.kind == "background":
            return
        at, facing = self.figure_pixels(t)
        thick = max(2, round(self.unit / 28))
        for name in ("l", "r"):
            for a_, b_ in (("hip", f"knee_{name}"), (f"knee_{name}", f"foot_{name}"),
                           ("neck", f"elbow_{name}"), (f"elbow_{name}", f"hand_{name}")):
                cv2.line(img, at[a_], at[b_], LIMB_COLOUR, thick, cv2.LINE_AA)
        front = (1 + facing) / 2  # continuous in the twist angle: no two-state colour
        torso = tuple(f * front + b * (1 - front) for f, b in zip(FRONT_COLOUR, BACK_COLOUR))
        cv2.line(img, at["hip"], at["neck"], torso, int(thick * (1.2 + abs(facing))),
                 cv2.LINE_AA)
        cv2.circle(img, at["head"], max(2, int(0.075 * self.scale)), SKIN_COLOUR, -1,
                   cv2.LINE_AA)

    def _splash(self, img: np.ndarray, t: float, lw: int) -> None:
        t2 = phase_times(self.routine)[2]
        age = t - t2
        if not 0 <= age < 1.5:
            return
        x = int(self.board_x + self.travel)
        rng = np.random.default_rng([self.routine.seed, 2, int(age * self.fps)])
        for k in range(3):
            r = (age * 0.25 + 0.04 * k) * self.unit
            cv2.ellipse(img, (x, self.water_y), (int(r), int(r * 0.25)), 0, 0, 360, (230, 240, 250),
                        lw, cv2.LINE_AA)
        if age < ENTRY_S + 0.2:
            for _ in range(12):
                dx, dy = rng.normal(0, 0.05 * self.unit), -abs(rng.normal(0, 0.08 * self.unit))
                cv2.circle(img, (int(x + dx), int(self.water_y + dy)), lw, (240, 245, 255), -1)


def render_frames(routine: Routine, width: int, height: int, fps: float):
    """Yield the video's RGB frames (uint8, height x width x 3) one at a time."""
    scene = _Scene(routine, width, height, fps)
    for i in range(num_frames(routine, fps)):
        yield scene.frame(i)


def num_frames(routine: Routine, fps: float) -> int:
    return max(1, int(round(routine.duration_s * fps)))


def labels_for(routine: Routine, fps: float) -> dict:
    n = num_frames(routine, fps)
    starts = phase_times(routine)
    times = np.arange(n) / fps
    phases = np.searchsorted(np.asarray(starts), times, side="right")
    return {
        "fps": fps,
        "num_frames": n,
        "duration_s": round(n / fps, 6),
        **routine.labels,
        "class": vocab.class_name(routine.labels) if routine.kind == ROUTINE else vocab.NULL,
        "kind": routine.kind,
        # only off the table, so the records (and fingerprints) of table-only data stay as they were
        **({} if routine.flight_table else {"flight_table": False}),
        "boundaries_s": [round(s, 4) for s in starts],
        "boundaries": [int(math.ceil(s * fps)) for s in starts],
        "phases": phases.tolist(),
        "seed": routine.seed,
        "generator_version": GENERATOR_VERSION,
    }


def encode(frames, target: Path | BinaryIO, width: int, height: int, fps: float, codec: str) -> None:
    """Encode RGB frames into an MP4 file, or into an open binary file (an in-memory round trip)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {width}x{height}")
    _, encoder, options = CODECS[codec]
    is_path = isinstance(target, (str, Path))
    with av.open(str(target) if is_path else target, "w", format=None if is_path else "mp4") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001),
                                      options=dict(options))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render_video(path: Path | str, *, seed: int, seconds: float | None = None, width: int = 112,
                 height: int = 112, fps: float = 15, codec: str = "h264",
                 min_seconds: float = 2.0, max_seconds: float = 20.0, kind: str = ROUTINE,
                 free_flight_share: float = 0.0) -> dict:
    """Render and encode one video; returns its labels (see `labels_for`)."""
    rng = np.random.default_rng([seed, 0])
    routine = sample_routine(rng, seed, seconds, min_seconds, max_seconds, kind, free_flight_share)
    encode(render_frames(routine, width, height, fps), Path(path), width, height, fps, codec)
    return labels_for(routine, fps)


def _dataset_item(args: tuple) -> dict:
    out_dir, index, seed, width, height, fps, codec, min_s, max_s, null_every, free_flight_share = args
    video_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    codec = MIXED_CODECS[index % len(MIXED_CODECS)] if codec == "mix" else codec
    name = f"video_{index:05d}{CODECS[codec][0]}"
    kind = ROUTINE
    if null_every and index % null_every == null_every - 1:
        kind = NULL_KINDS[(index // null_every) % len(NULL_KINDS)]
    labels = render_video(Path(out_dir) / name, seed=video_seed, width=width, height=height, fps=fps,
                          codec=codec, min_seconds=min_s, max_seconds=max_s, kind=kind,
                          free_flight_share=free_flight_share)
    return {"file": name, "codec": codec, "width": width, "height": height, **labels}


def write_dataset(out_dir: Path | str, *, count: int, seed: int, width: int = 112, height: int = 112,
                  fps: float = 15, codec: str = "mix", min_seconds: float = 2.0,
                  max_seconds: float = 20.0, workers: int | None = None, null_every: int = 0,
                  free_flight_share: float = 0.0) -> Path:
    """Write `count` videos and `labels.jsonl` into out_dir; deterministic for a seed. With
    `null_every` = k > 0, every k-th video has no routine (kinds cycling through NULL_KINDS); the
    other videos are the same as without. `free_flight_share`: see the module docstring."""
    if count < 1:
        raise ValueError("count must be at least 1")
    if null_every < 0 or null_every == 1:
        raise ValueError(f"null_every must be 0 (no null videos) or at least 2, got {null_every}")
    if not (ACTION_S + 0.2 <= max_seconds and min_seconds <= max_seconds):
        raise ValueError(f"need min_seconds <= max_seconds and max_seconds >= {ACTION_S + 0.2}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, seed, width, height, fps, codec, min_seconds, max_seconds, null_every, free_flight_share)
            for i in range(count)]
    workers = workers or min(2, multiprocessing.cpu_count())
    records = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for done, record in enumerate(pool.imap(_dataset_item, jobs, chunksize=4), 1):
            records.append(record)
            if done % 50 == 0 or done == count:
                print(f"synth: {done}/{count} videos", file=sys.stderr, flush=True)
    labels_path = out / "labels.jsonl"
    labels_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return labels_path
