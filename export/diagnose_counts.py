"""Why are the counts at ~70%? A diagnosis on the VALIDATION split (never test) of trained models.

`python -m export.diagnose_counts [saved models .pt ...]` (default: the `vqs models` run saved in
data/trained_models.pt) prints, per saved TQN:
- the somersault and twist confusion matrices on validation routine videos, and how many errors
  are adjacent counts or stay inside the counts the video's flight pose allows (the 12 flight
  combinations of `vocab.CLASSES` tie the counts to the pose);
- where the somersault query looks: its attention mass on flight clips;
- linear probes of the encoder's per-clip features to the counts and to the rotation rate, fitted
  on training-split flight clips and scored on validation flight clips, against the same probe on
  a randomly initialised encoder (what the architecture gives for free);
- how often flight clips are recomputed with gradient in the feature-bank stage (`n_online`).

`--grid` prints instead, per model, its answers on counterfactual videos (`render_grid`: routines of each
table flight re-rendered with every somersault x twist value, nothing else changed): does the
twist answer follow the drawn twist, or the pose and somersaults the class table ties it to?
`--oracle` prints (instead) how well the validation flight clips determine the counts from the generator's
own geometry (`oracle_report`): no model, just what the 8 frames of a clip hold.
Models are `vqs models` saves (data/trained_models.pt) or `export.count_study` saves.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import REPO, build, data, synth, train, vocab
from export.models import s3d_zoom

FLIGHT = 2  # synth.PHASES index
PROBE_TRAIN_VIDEOS = 1000
ZOOM_VARIANT = "s3d_zoom_32x56_112"  # the s3d_zoom variant count_study --zoom and count_specialist train


def confusion(pred: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.int64)
    np.add.at(m, (target, pred), 1)
    return m


def pose_allowed() -> dict[str, dict[int, set[int]]]:
    """Per count query, per flight-pose index: the count indices some valid class allows."""
    heads = vocab.head_attributes()
    out = {q: {} for q in ("somersaults", "twists")}
    for take_off, s, t, pose in vocab.CLASSES:
        p = heads["flight_pose"].index(pose)
        out["somersaults"].setdefault(p, set()).add(heads["somersaults"].index(s))
        out["twists"].setdefault(p, set()).add(heads["twists"].index(t))
    return out


def by_flight(preds: dict[str, np.ndarray], ds: data.ClipDataset) -> dict[str, dict]:
    """Count accuracy per flight combination (somersaults/twists/pose) over routine videos."""
    out = {}
    for v in np.flatnonzero(build.is_routine(ds)):
        rec = ds.records[v]
        key = "/".join(rec[q] for q in ("somersaults", "twists", "flight_pose"))
        row = out.setdefault(key, {"videos": 0, "somersaults": 0, "twists": 0})
        row["videos"] += 1
        for q in ("somersaults", "twists"):
            row[q] += int(preds[q][v] == ds.targets[q][v])
    return {k: {"videos": r["videos"], **{q: round(r[q] / r["videos"], 3) for q in ("somersaults", "twists")}}
            for k, r in sorted(out.items())}


def flight_clips(ds: data.ClipDataset, video: int, min_frames: int = data.CLIP_FRAMES) -> np.ndarray:
    """Indices of a video's clips with at least `min_frames` of their 8 frames in flight."""
    phases = np.asarray(ds.records[video].get("phases", []))
    n = int(ds.num_clips[video])
    padded = np.full(n * data.CLIP_FRAMES, -1)
    padded[: len(phases)] = phases
    return np.flatnonzero((padded.reshape(n, data.CLIP_FRAMES) == FLIGHT).sum(1) >= min_frames)


@torch.inference_mode()
def flight_features(encoder, ds: data.ClipDataset, videos) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Features of every all-flight clip of `videos`, with the video index and its degrees of
    somersault rotation per frame."""
    encoder.eval()
    feats, owner, rate = [], [], []
    for v in videos:
        clips = flight_clips(ds, int(v))
        if len(clips) == 0:
            continue
        rec = ds.records[int(v)]
        flight_frames = rec["boundaries_s"][2] - rec["boundaries_s"][1]
        per_frame = 360 * float(rec["somersaults"]) / (flight_frames * rec["fps"])
        feats.append(encoder(torch.from_numpy(np.concatenate([ds.clips(int(v), int(c), 1) for c in clips]))))
        owner += [int(v)] * len(clips)
        rate += [per_frame] * len(clips)
    return torch.cat(feats), np.asarray(owner), np.asarray(rate)


def logistic_probe(x_fit: torch.Tensor, y_fit: np.ndarray, x_val: torch.Tensor, classes: int,
                   l2: float = 1e-3) -> np.ndarray:
    """Multinomial logistic regression (standardised inputs, L-BFGS); returns validation predictions."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf, xv = (x_fit - mu) / sd, (x_val - mu) / sd
    w = torch.zeros(xf.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")
    y = torch.as_tensor(y_fit)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xf @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xv @ w + b).argmax(1).numpy()


def ridge_r2(x_fit: torch.Tensor, y_fit: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray, l2: float = 1.0) -> float:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    xf = torch.cat([(x_fit - mu) / sd, torch.ones(len(x_fit), 1)], 1).double()
    xv = torch.cat([(x_val - mu) / sd, torch.ones(len(x_val), 1)], 1).double()
    w = torch.linalg.solve(xf.T @ xf + l2 * torch.eye(xf.shape[1], dtype=xf.dtype), xf.T @ torch.as_tensor(y_fit))
    pred = (xv @ w).numpy()
    return float(1 - ((pred - y_val) ** 2).sum() / ((y_val - y_val.mean()) ** 2).sum())


def probe_report(encoder, fit: data.ClipDataset, val: data.ClipDataset) -> dict:
    rng = np.random.default_rng(0)
    fit_videos = rng.choice(np.flatnonzero(build.is_routine(fit)), PROBE_TRAIN_VIDEOS, replace=False)
    val_videos = np.flatnonzero(build.is_routine(val))
    xf, of, rate_f = flight_features(encoder, fit, fit_videos)
    xv, ov, rate_v = flight_features(encoder, val, val_videos)
    out = {"fit_clips": len(xf), "val_clips": len(xv),
           "rate_r2": ridge_r2(xf, rate_f, xv, rate_v)}
    for q in ("somersaults", "twists", "flight_pose"):
        size = len(train.HEADS[q])
        pred = logistic_probe(xf, fit.targets[q][of], xv, size)
        hit = pred == val.targets[q][ov]
        # per video: majority vote of its flight clips
        votes = {v: np.bincount(pred[ov == v], minlength=size).argmax() for v in np.unique(ov)}
        video_hit = np.mean([votes[v] == val.targets[q][v] for v in votes])
        out[q] = {"clip": float(hit.mean()), "video_vote": float(video_hit)}
    return out


@torch.inference_mode()
def attention_on_flight(encoder, decoder, ds: data.ClipDataset) -> dict[str, float]:
    """Mean last-layer attention mass of each query on the clips with >= 3 flight frames."""
    encoder.eval()
    decoder.eval()
    mass = {q: [] for q in train.HEADS}
    for v in np.flatnonzero(build.is_routine(ds)):
        feats = train.clip_features(encoder, ds, int(v)).unsqueeze(0)
        attention = decoder(feats, torch.ones(feats.shape[:2], dtype=torch.bool))[len(train.HEADS)][0]
        clips = flight_clips(ds, int(v), train.EVENT_MIN_FRAMES)
        for i, q in enumerate(train.HEADS):
            mass[q].append(float(attention[i, clips].sum()))
    return {q: float(np.mean(m)) for q, m in mass.items()}


def online_flight_rate(ds: data.ClipDataset, budget: train.Budget, draws: int = 20000) -> dict:
    """Feature-bank stage: per online clip, the chance it is a flight clip (>= 3 flight frames),
    and the flight clips recomputed per step, under the stage's sampling."""
    rng = np.random.default_rng(0)
    flight_counts, online = [], []
    for _ in range(draws):
        v = int(rng.integers(len(ds.records)))
        n = int(ds.num_clips[v])
        k = min(budget.n_online, n)
        first = int(rng.integers(0, n - k + 1))
        fc = flight_clips(ds, v, train.EVENT_MIN_FRAMES)
        flight_counts.append(int(((fc >= first) & (fc < first + k)).sum()))
        online.append(k)
    total_flight = sum(len(flight_clips(ds, v, train.EVENT_MIN_FRAMES)) for v in range(len(ds.records)))
    return {"flight_share_of_online": float(np.sum(flight_counts) / np.sum(online)),
            "flight_share_of_all_clips": total_flight / ds.total_clips,
            "flight_clips_per_step": float(np.mean(flight_counts) * budget.bank_videos_per_step),
            "visits_with_any_flight": float(np.mean(np.asarray(flight_counts) > 0))}


def study_encoder(args: dict):
    """The encoder an `export.count_study` run trains, from its arguments (as saved with it)."""
    if args.get("zoom"):
        return s3d_zoom.create(args.get("zoom_variant", ZOOM_VARIANT))
    fine = dict(stem_patch=4, stem_pool=2) if args.get("fine_stem") else {}
    return train.build_encoder(stem_difference=args.get("stem_difference", False), **fine)


def load_tqn(path: Path | str) -> tuple:
    """(encoder, decoder) of a `vqs models` save or an `export.count_study` save."""
    saved = torch.load(path, weights_only=False)
    if "models" in saved:
        return train.load_models(saved["models"])["tqn"]
    encoder = study_encoder(saved["args"])
    encoder.load_state_dict(saved["encoder"])
    decoder = train.build_tqn()
    decoder.load_state_dict(saved["tqn"])
    return encoder, decoder


# ---------------------------------------------------------------- counterfactual grid
GRID_SEED = 900_000  # far from every split's video seeds


def grid_routines(per_flight: int = 2, seconds: float = 3.2) -> list[synth.Routine]:
    """`per_flight` routines of each of the table's 12 flights (own seeds; take-off, pose,
    nuisances and rotation phases kept), each with all 5 x 5 somersault and twist values:
    routines that differ only in the counts."""
    routines = []
    for i, flight in enumerate(sorted({c[1:] for c in vocab.CLASSES})):
        for k in range(per_flight):
            seed = GRID_SEED + 100 * i + k
            base = synth.sample_routine(np.random.default_rng([seed, 0]), seed, seconds)
            base = replace(base, labels={**base.labels, "flight_pose": flight[2]})
            for s in vocab.ATTRIBUTES["somersaults"]:
                for t in vocab.ATTRIBUTES["twists"]:
                    labels = {**base.labels, "somersaults": s, "twists": t}
                    routines.append(replace(base, labels=labels,
                                            flight_table=vocab.class_name(labels) in vocab.CLASS_NAMES))
    return routines


def render_grid(out: Path, per_flight: int = 2, seconds: float = 3.2) -> Path:
    """The videos of `grid_routines`, written as a dataset folder. Reused when present."""
    out = Path(out)
    if (out / "labels.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for routine in grid_routines(per_flight, seconds):
        name = f"grid_{routine.seed}_{routine.labels['somersaults']}_{routine.labels['twists']}.mp4"
        synth.encode(synth.render_frames(routine, data.FRAME_SIZE, data.FRAME_SIZE, build.FPS),
                     out / name, data.FRAME_SIZE, data.FRAME_SIZE, build.FPS, "h264")
        records.append({"file": name, "codec": "h264", "width": data.FRAME_SIZE,
                        "height": data.FRAME_SIZE, **synth.labels_for(routine, build.FPS),
                        "grid_base": routine.seed})
    (out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def grid_report(encoder, decoder, grid: data.ClipDataset) -> dict:
    """Accuracy on the grid against the drawn counts (chance 0.2 each), and how often an answer
    stays the same whatever the count it should read is (1.0: that count is not read at all)."""
    preds = train.predict(encoder, decoder, grid)
    heads = vocab.head_attributes()
    rows = [{q: r[q] for q in ("somersaults", "twists", "flight_pose")} | {"base": r["grid_base"]}
            | {f"answer_{q}": heads[q][preds[q][i]] for q in ("somersaults", "twists")}
            for i, r in enumerate(grid.records)]

    def unchanged(answer: str, held: str) -> float:  # answer constant over the 5 values of the other count
        groups: dict[tuple, set] = {}
        for r in rows:
            groups.setdefault((r["base"], r[held]), set()).add(r[f"answer_{answer}"])
        return round(float(np.mean([len(g) == 1 for g in groups.values()])), 3)

    def acc(q: str, subset) -> float:
        return round(float(np.mean([r[f"answer_{q}"] == r[q] for r in subset])), 3)

    return {"videos": len(rows), "somersaults": acc("somersaults", rows), "twists": acc("twists", rows),
            "twist_answer_unchanged_over_drawn_twists": unchanged("twists", "somersaults"),
            "somersault_answer_unchanged_over_drawn_somersaults": unchanged("somersaults", "twists"),
            "by_pose": {p: {q: acc(q, [r for r in rows if r["flight_pose"] == p]) for q in ("somersaults", "twists")}
                        for p in vocab.ATTRIBUTES["flight_pose"]}}


# ---------------------------------------------------------------- oracle
ORACLE_RATE = {"somersaults": [float(s) for s in vocab.ATTRIBUTES["somersaults"]],
               "twists": [float(t) for t in vocab.ATTRIBUTES["twists"]]}


def _nearest(value: float, query: str) -> str:
    return vocab.ATTRIBUTES[query][int(np.argmin([abs(value - r) for r in ORACLE_RATE[query]]))]


def _fit_rate(series: np.ndarray, curve, flight_frames: float) -> str:
    """The twist count whose curve(phase + rate * frame) fits the series best (least squares, phase on a 5-deg grid)."""
    k = np.arange(len(series))
    errors = [min(float(((curve(ph + 2 * math.pi * r / flight_frames * k) - series) ** 2).sum())
                  for ph in np.radians(np.arange(0, 360, 5)))
              for r in ORACLE_RATE["twists"]]
    return vocab.ATTRIBUTES["twists"][int(np.argmin(errors))]


def rebuild_routine(record: dict, split: str, free_flight_share: float | None = None) -> synth.Routine:
    """A video's routine from its seed and its split's spec (`build.SPLITS`; the split's own
    `build.FREE_FLIGHT_SHARE` unless another share is given), checked against its record: the
    generator's own geometry for that video, without re-rendering it."""
    _, _, _, lo, hi = build.SPLITS[split]
    if free_flight_share is None:
        free_flight_share = build.FREE_FLIGHT_SHARE.get(split, 0.0)
    routine = synth.sample_routine(np.random.default_rng([record["seed"], 0]), record["seed"], None, lo, hi,
                                   kind=record["kind"], free_flight_share=free_flight_share)
    if [round(x, 4) for x in synth.phase_times(routine)] != record["boundaries_s"] or any(
            routine.labels[q] != record[q] for q in vocab.QUERIES):
        raise ValueError(f"video {record['file']}: cannot rebuild its routine from the {split} spec")
    return routine


def figure_track(ds: data.ClipDataset, split: str, free_flight_share: float | None = None) -> np.ndarray:
    """Per frame of `ds.frames`, the torso's middle (x, y) px where the figure is drawn
    (`synth._Scene.figure_pixels`), NaN where it is not: after the entry, in background videos,
    and where it lies outside the frame (a diver walking off). The localiser's training target."""
    track = np.full((int(ds.num_frames.sum()), 2), np.nan, np.float32)
    for v, record in enumerate(ds.records):
        routine = rebuild_routine(record, split, free_flight_share)
        if routine.kind == "background":
            continue
        scene, fps, end = synth._Scene(routine, data.FRAME_SIZE, data.FRAME_SIZE, record["fps"]), record["fps"], \
            synth.phase_times(routine)[3]
        for i in range(int(ds.num_frames[v])):
            if i / fps >= end:  # as synth draws it: no figure from the end of the entry on
                break
            at, _ = scene.figure_pixels(i / fps)
            middle = (np.asarray(at["hip"], np.float32) + at["neck"]) / 2
            if ((middle >= 0) & (middle < data.FRAME_SIZE)).all():
                track[ds.frame_offset[v] + i] = middle
    return track


@torch.inference_mode()
def localiser_error(encoder, ds: data.ClipDataset, track: np.ndarray) -> dict:
    """An `s3d_zoom`'s window centres against the torso's mean position over each all-flight clip of
    the routine videos (`figure_track`): mean and 90th percentile distance, px."""
    encoder.eval()
    errors = []
    for v in np.flatnonzero(build.is_routine(ds)):
        for c in flight_clips(ds, int(v)):
            centre = encoder.forward_with_heatmap(torch.from_numpy(ds.clips(int(v), int(c), 1)))[2][0].numpy()
            errors.append(float(np.linalg.norm(centre - np.nanmean(track[ds.frame_index(int(v), int(c), 1)], 0))))
    return {"clips": len(errors), "mean": round(float(np.mean(errors)), 2),
            "p90": round(float(np.percentile(errors, 90)), 2)}


def oracle_report(ds: data.ClipDataset, split: str = "val") -> dict:
    """Per table flight: the share of all-flight clips whose counts a simple reader gets right from
    the clip's 8 frames, locating the figure with the generator's geometry (`synth._Scene.figure_pixels`).
    - `somersaults_drawn_angle`: mean per-frame change of the drawn body angle, wrapped to +-180 deg
      (`..._2fold`: +-90, as if the figure looked the same after half a turn);
    - `somersaults_decoded_head`: the head found in the DECODED frame (skin-coloured pixels within
      13 px of the torso's middle) and its angle about that middle, per-frame change averaged;
    - `twists_decoded_colour`: the DECODED torso colour at its middle, placed between the back and
      front colours, fitted with (1 + cos)/2 of the twist angle;
    - `twists_drawn_width`: the drawn width |cos| of the twist angle (period 180 deg), fitted likewise."""
    front, back = np.asarray(synth.FRONT_COLOUR, float), np.asarray(synth.BACK_COLOUR, float)
    skin = np.asarray(synth.SKIN_COLOUR, float)
    yy, xx = np.mgrid[0:data.FRAME_SIZE, 0:data.FRAME_SIZE]
    tally: dict[str, dict[str, int]] = {}
    for v in np.flatnonzero(build.is_routine(ds)):
        rec = ds.records[v]
        routine = rebuild_routine(rec, split)
        scene = synth._Scene(routine, data.FRAME_SIZE, data.FRAME_SIZE, rec["fps"])
        flight_frames = routine.flight_s * rec["fps"]
        row = tally.setdefault("/".join(rec[q] for q in ("somersaults", "twists", "flight_pose")), {})
        for c in flight_clips(ds, int(v)):
            idx = np.arange(c * data.CLIP_FRAMES, (c + 1) * data.CLIP_FRAMES)
            theta = np.asarray([synth._body_state(routine, i / rec["fps"])[2] for i in idx])
            twist = np.asarray([synth._body_state(routine, i / rec["fps"])[1] for i in idx])
            frames = ds.frames[ds.frame_offset[v] + idx].astype(float)
            mids, colour, head = [], [], []
            for i, frame in zip(idx, frames):
                at, _ = scene.figure_pixels(i / rec["fps"])
                x, y = ((np.asarray(at["hip"]) + at["neck"]) / 2).round().astype(int).clip(1, data.FRAME_SIZE - 2)
                patch = frame[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
                colour.append(float(np.clip((patch - back) @ (front - back) / ((front - back) @ (front - back)), 0, 1)))
                found = (np.abs(frame - skin).max(-1) < 45) & ((xx - x) ** 2 + (yy - y) ** 2 <= 13 ** 2)
                head.append(math.atan2(y - yy[found].mean(), xx[found].mean() - x) if found.any() else np.nan)
            hits = {}
            for name, period in (("somersaults_drawn_angle", 360.0), ("somersaults_drawn_angle_2fold", 180.0)):
                step = (np.diff(theta) + period / 2) % period - period / 2
                hits[name] = _nearest(float(step.mean()) * flight_frames / 360, "somersaults") == rec["somersaults"]
            step = -((np.degrees(np.diff(head)) + 180) % 360 - 180)  # screen angles turn against theta
            rate = float(np.nanmean(step)) * flight_frames / 360 if np.isfinite(step).any() else -1.0
            hits["somersaults_decoded_head"] = _nearest(rate, "somersaults") == rec["somersaults"]
            hits["twists_decoded_colour"] = _fit_rate(np.asarray(colour), lambda a: (1 + np.cos(a)) / 2,
                                                      flight_frames) == rec["twists"]
            hits["twists_drawn_width"] = _fit_rate(np.abs(np.cos(twist)), lambda a: np.abs(np.cos(a)),
                                                   flight_frames) == rec["twists"]
            row["clips"] = row.get("clips", 0) + 1
            for name, hit in hits.items():
                row[name] = row.get(name, 0) + int(hit)
    total = {k: sum(r.get(k, 0) for r in tally.values()) for k in next(iter(tally.values()))}
    share = lambda r: {k: (n if k == "clips" else round(n / r["clips"], 3)) for k, n in r.items()}  # noqa: E731
    return {"all": share(total), "by_flight": {k: share(r) for k, r in sorted(tally.items())}}


def main(paths: list[str], grid: bool, oracle: bool) -> None:
    torch.set_num_threads(train.TRAIN_THREADS)
    val = data.load(REPO / "data" / "val")
    if oracle:
        print("oracle, validation flight clips:", json.dumps(oracle_report(val)))
    if grid:
        grid_ds = data.load(render_grid(REPO / "runs" / "count_grid"))
        for path in paths:
            print(f"counterfactual grid, {path}:", json.dumps(grid_report(*load_tqn(path), grid_ds)))
    if grid or oracle:
        return
    fit = data.load(REPO / "data" / "train")
    heads = vocab.head_attributes()
    allowed = pose_allowed()
    print("feature bank, n_online", train.Budget().n_online, online_flight_rate(fit, train.Budget()))
    torch.manual_seed(0)
    print("probe, random-init encoder:", probe_report(train.build_encoder(), fit, val))
    for path in paths:
        encoder, decoder = load_tqn(path)
        preds = train.predict(encoder, decoder, val)
        routine = build.is_routine(val)
        print(f"== {path}")
        pose = val.targets["flight_pose"][routine]
        for q in ("somersaults", "twists"):
            p, t = preds[q][routine], val.targets[q][routine]
            print(f"{q}: accuracy {np.mean(p == t):.3f}; rows true {heads[q]}, columns predicted")
            print(confusion(p, t, len(heads[q])))
            wrong = p != t
            adjacent = np.abs(p - t) == 1
            inside = np.asarray([pi in allowed[q].get(po, set()) for pi, po in zip(p, pose)])
            print(f"  errors {wrong.sum()}: adjacent {np.sum(wrong & adjacent)}, a count the video's pose allows "
                  f"{np.sum(wrong & inside)}; chance given the true pose "
                  f"{np.mean([1 / len(allowed[q][po]) for po in pose]):.3f}")
        for combo, row in by_flight(preds, val).items():
            print(f"  {combo}: {row}")
        print("attention mass on flight clips:", attention_on_flight(encoder, decoder, val))
        print("probe, trained encoder:", probe_report(encoder, fit, val))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*", default=[str(REPO / "data" / "trained_models.pt")])
    parser.add_argument("--grid", action="store_true", help="answers on counterfactual count grids")
    parser.add_argument("--oracle", action="store_true", help="what validation flight clips hold, no model")
    args = parser.parse_args()
    main(args.models, args.grid, args.oracle)
