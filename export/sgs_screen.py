"""Screen s3d_sgs builds against the served s3d on a validation split, paired video by video.

    python -m export.sgs_screen NAME=REPOSITORY [NAME=REPOSITORY ...] [--split val_large] [--out F]

Each REPOSITORY holds a `clip_encoder_s3d_sgs` built by `export.train_adaptive --encoders s3d_sgs
--repository REPOSITORY` (same clip_encoder_s3d and tqn_decoder as the served ones). Every clip of
the split runs through each exported graph in ONNX Runtime at budget 1 (and the served s3d's
graph), the served decoder answers per video, and the screen prints per query: accuracy, the
paired difference to s3d with its bootstrap 95% interval, the mean negative log-likelihood of the
true answer, and each build's GMACs and B' by clip phase. Recipes are chosen here, on "val_large"
(3,000 videos, `build.EXTRA_SPLITS`), where 300 videos cannot rank gaps of a point.
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

OUT = REPO / "export" / "sgs_recipe_screen.json"


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


def screen(candidates: dict[str, Path], split: str, data_dir: Path) -> dict:
    ds = data.load(build.make_split(data_dir, split))
    _, decoder, _ = load_served()
    phases = np.concatenate([ds.clip_phases(v) for v in range(len(ds.records))])
    plain = onnx_clip_outputs(MODEL_REPOSITORY / "clip_encoder_s3d" / "1" / "model.onnx", ds, None)
    base_hits, base_nll = answers(decoder, plain["features"], ds)
    report = {"split": split, "videos": len(ds.records), "clips": len(phases),
              "s3d": {"accuracy": dict(zip(HEADS, base_hits.mean(0).tolist())),
                      "nll": dict(zip(HEADS, base_nll.mean(0).tolist()))}}
    for name, repository in candidates.items():
        out = onnx_clip_outputs(repository / "clip_encoder_s3d_sgs" / "1" / "model.onnx", ds, 1.0)
        hits, nll = answers(decoder, out["features"], ds)
        kept = out["kept"][:, 0]
        report[name] = {
            "repository": str(repository),
            "accuracy": dict(zip(HEADS, hits.mean(0).tolist())),
            "minus_s3d_points": {q: 100 * float(hits[:, i].mean() - base_hits[:, i].mean()) for i, q in enumerate(HEADS)},
            "interval95_points": {q: [100 * x for x in paired_bootstrap(hits[:, i].astype(float), base_hits[:, i].astype(float))]
                                  for i, q in enumerate(HEADS)},
            "nll": dict(zip(HEADS, nll.mean(0).tolist())),
            "gmacs_per_clip": float(out["gmacs"].mean()),
            "kept_by_phase": {p: float(kept[phases == i].mean()) for i, p in enumerate(PHASES) if (phases == i).any()}}
        r = report[name]
        print(f"{name}: {r['gmacs_per_clip']:.4f} GMACs, " + ", ".join(
            f"{q} {100 * r['accuracy'][q]:.1f} ({r['minus_s3d_points'][q]:+.2f} "
            f"[{r['interval95_points'][q][0]:+.2f}, {r['interval95_points'][q][1]:+.2f}], nll {r['nll'][q]:.3f})"
            for q in HEADS), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidates", nargs="+", metavar="NAME=REPOSITORY")
    parser.add_argument("--split", default="val_large", choices=["val", "val_large"])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    candidates = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in args.candidates}
    report = screen(candidates, args.split, args.data_dir)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
