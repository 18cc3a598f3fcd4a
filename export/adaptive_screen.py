"""Screen builds of an adaptive encoder on a validation split, paired video by video.

    python -m export.adaptive_screen NAME=REPOSITORY [NAME=REPOSITORY ...] [--encoder s3d_sgs|vit_ats]
        [--budgets B ...] [--split val_large] [--out F]

Each REPOSITORY holds the encoder built by `export.train_adaptive --encoders s3d_sgs|vit
--repository REPOSITORY` (same clip_encoder_s3d and tqn_decoder as the served ones). Every clip of
the split runs through the exported graphs in ONNX Runtime and the served decoder answers per
video. `s3d_sgs` is paired against the served s3d; `vit_ats`, at each budget, against the same
build's `vit` (one set of weights), whose own row is paired against the served `vit`. Per query:
accuracy, the paired difference with its bootstrap 95% interval, the mean negative log-likelihood
of the true answer; per row GMACs and B' (or K' per ATS block) by clip phase. Recipes are chosen
here, on "val_large" (3,000 videos, `build.EXTRA_SPLITS`), where 300 videos cannot rank gaps of a
point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from export import MODEL_REPOSITORY, REPO, build, data
from export.build import paired_bootstrap
from export.synth import PHASES
from export.train_adaptive import HEADS, load_served, onnx_clip_outputs

OUT = {"s3d_sgs": REPO / "export" / "sgs_recipe_screen.json", "vit_ats": REPO / "export" / "ats_recipe_screen.json"}
# The plain encoder each adaptive one is judged against.
PLAIN = {"s3d_sgs": "s3d", "vit_ats": "vit"}


@torch.inference_mode()
def answers(decoder, features: np.ndarray, ds: data.ClipDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per video and query: is the decoder's answer right (videos, queries), and the negative
    log-likelihood it gives the true answer."""
    hits, nll, at = [], [], 0
    for v in range(len(ds.records)):
        n = int(ds.num_clips[v])
        feats = torch.from_numpy(features[at : at + n]).unsqueeze(0)
        at += n
        logits = decoder(feats, torch.ones(feats.shape[:2], dtype=torch.bool))
        log_p = [torch.log_softmax(lg[0], dim=-1) for lg in logits[: len(HEADS)]]
        truth = [int(ds.targets[q][v]) for q in HEADS]
        hits.append([int(lp.argmax()) == t for lp, t in zip(log_p, truth)])
        nll.append([-float(lp[t]) for lp, t in zip(log_p, truth)])
    return np.asarray(hits), np.asarray(nll)


def _graph(repository: Path, encoder: str) -> Path:
    return repository / f"clip_encoder_{encoder}" / "1" / "model.onnx"


def _row(decoder, out: dict, ds: data.ClipDataset, phases: np.ndarray, against: np.ndarray) -> tuple[dict, np.ndarray]:
    """One graph's answers on every video, paired against the hits `against`; and its own hits."""
    hits, nll = answers(decoder, out["features"], ds)
    row = {"accuracy": dict(zip(HEADS, hits.mean(0).tolist())),
           "minus_points": {q: 100 * float(hits[:, i].mean() - against[:, i].mean()) for i, q in enumerate(HEADS)},
           "interval95_points": {q: [100 * x for x in paired_bootstrap(hits[:, i].astype(float), against[:, i].astype(float))]
                                 for i, q in enumerate(HEADS)},
           "nll": dict(zip(HEADS, nll.mean(0).tolist()))}
    if "gmacs" in out:
        kept = out["kept"]
        row["gmacs_per_clip"] = float(out["gmacs"].mean())
        row["kept_by_phase"] = {p: kept[phases == i].mean(0).tolist() for i, p in enumerate(PHASES) if (phases == i).any()}
    return row, hits


def _print(name: str, row: dict) -> None:
    cost = f"{row['gmacs_per_clip']:.4f} GMACs, " if "gmacs_per_clip" in row else ""
    mean = 100 * np.mean(list(row["accuracy"].values()))
    print(f"{name}: {cost}mean {mean:.2f}, " + ", ".join(
        f"{q} {100 * row['accuracy'][q]:.1f} ({row['minus_points'][q]:+.2f} "
        f"[{row['interval95_points'][q][0]:+.2f}, {row['interval95_points'][q][1]:+.2f}], nll {row['nll'][q]:.3f})"
        for q in HEADS), flush=True)


def screen(candidates: dict[str, Path], encoder: str, budgets: list[float], split: str, data_dir: Path) -> dict:
    ds = data.load(build.make_split(data_dir, split))
    _, decoder, _ = load_served()
    phases = np.concatenate([ds.clip_phases(v) for v in range(len(ds.records))])
    plain = PLAIN[encoder]
    served = onnx_clip_outputs(_graph(MODEL_REPOSITORY, plain), ds, None)
    served_hits, served_nll = answers(decoder, served["features"], ds)
    report = {"split": split, "videos": len(ds.records), "clips": len(phases), "encoder": encoder,
              f"served {plain}": {"accuracy": dict(zip(HEADS, served_hits.mean(0).tolist())),
                                  "nll": dict(zip(HEADS, served_nll.mean(0).tolist()))}}
    for name, repository in candidates.items():
        entry = report[name] = {"repository": str(repository)}
        against = served_hits
        if encoder == "vit_ats":  # its own vit first: the same weights without ATS
            entry[plain], against = _row(decoder, onnx_clip_outputs(_graph(repository, plain), ds, None), ds, phases,
                                         served_hits)
            _print(f"{name} {plain} (- served {plain})", entry[plain])
        for b in budgets:
            entry[str(b)], _ = _row(decoder, onnx_clip_outputs(_graph(repository, encoder), ds, b), ds, phases, against)
            _print(f"{name} {encoder} at {b:g} (- {'its own' if encoder == 'vit_ats' else 'served'} {plain})",
                   entry[str(b)])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidates", nargs="+", metavar="NAME=REPOSITORY")
    parser.add_argument("--encoder", choices=list(PLAIN), default="s3d_sgs")
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0])
    parser.add_argument("--split", default="val_large", choices=["val", "val_large"])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=None, help="default: export/sgs_recipe_screen.json or "
                                                                "export/ats_recipe_screen.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    candidates = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in args.candidates}
    report = screen(candidates, args.encoder, args.budgets, args.split, args.data_dir)
    (args.out or OUT[args.encoder]).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
