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
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from export import REPO, build, data, train, vocab

FLIGHT = 2  # synth.PHASES index
PROBE_TRAIN_VIDEOS = 1000


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


def main(paths: list[str]) -> None:
    torch.set_num_threads(train.TRAIN_THREADS)
    val = data.load(REPO / "data" / "val")
    fit = data.load(REPO / "data" / "train")
    heads = vocab.head_attributes()
    allowed = pose_allowed()
    print("feature bank, n_online", train.Budget().n_online, online_flight_rate(fit, train.Budget()))
    torch.manual_seed(0)
    print("probe, random-init encoder:", probe_report(train.build_encoder(), fit, val))
    for path in paths:
        saved = torch.load(path, weights_only=False)
        encoder, decoder = train.load_models(saved["models"])["tqn"]
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
    main(sys.argv[1:] or [str(REPO / "data" / "trained_models.pt")])
