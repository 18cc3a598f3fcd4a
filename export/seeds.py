"""`make seeds` (python -m export.seeds): the seeds study. TQN and both baselines trained with
SEEDS on the same splits as `vqs models`, scored on test (routine videos), written to
export/seeds.json and export/seeds.md: mean ± std over seeds per query, per-class accuracy, accuracy
by video length, and the paired bootstrap 95% interval of TQN − baseline over test videos (each
video's hits averaged over seeds). Torch-side; the served table is `vqs models`' and
`vqs evaluate`'s. About 25-30 min per seed on 2 idle cores."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from export import build, train

SEEDS = (7, 8, 9)
MODELS = ("tqn", "average_pooling", "short_term")
OUT_JSON = build.REPO / "export" / "seeds.json"
OUT_MD = build.REPO / "export" / "seeds.md"


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def aggregate(per_seed: dict[int, dict[str, dict]], hits: dict[int, dict[str, dict[str, np.ndarray]]]) -> dict:
    """Mean ± std over seeds of every summary number; paired bootstrap of TQN − baseline on
    per-video hits averaged over seeds."""
    seeds = list(per_seed)
    out: dict = {"models": {}, "tqn_minus": {}}
    for name in MODELS:
        summaries = [per_seed[s][name] for s in seeds]
        out["models"][name] = {
            "accuracy": {q: _mean_std([m["accuracy"][q] for m in summaries]) for q in train.HEADS},
            "per_class_accuracy": _mean_std([m["per_class_accuracy"] for m in summaries]),
            "by_length": {b: {q: _mean_std([m["by_length"][b][q] for m in summaries
                                            if m["by_length"][b][q] is not None] or [float("nan")])
                              for q in ("somersaults", "twists", "class")}
                          for b in summaries[0]["by_length"]},
        }
    for base in ("average_pooling", "short_term"):
        out["tqn_minus"][base] = {}
        for q in train.HEADS:
            a = np.mean([hits[s]["tqn"][q] for s in seeds], axis=0)
            b = np.mean([hits[s][base][q] for s in seeds], axis=0)
            out["tqn_minus"][base][q] = {"difference": float(a.mean() - b.mean()),
                                         "interval95": build.paired_bootstrap(a, b)}
    return out


def markdown(study: dict, seeds: tuple[int, ...], videos: int) -> str:
    queries = list(train.HEADS)
    lines = [f"Test accuracy (%), mean ± std over {len(seeds)} training seeds {list(seeds)}, {videos} routine videos",
             "", "| model | " + " | ".join(queries) + " | class, mean per class |",
             "|---|" + "---|" * (len(queries) + 1)]
    for name, m in study["models"].items():
        cells = [f"{100 * m['accuracy'][q]['mean']:.1f} ± {100 * m['accuracy'][q]['std']:.1f}" for q in queries]
        pc = m["per_class_accuracy"]
        lines.append(f"| {build.MODEL_NAMES[name]} | " + " | ".join(cells) + f" | {100 * pc['mean']:.1f} ± {100 * pc['std']:.1f} |")
    lines += ["", "TQN − baseline (points), paired bootstrap 95% interval over test videos:", "",
              "| baseline | " + " | ".join(queries) + " |", "|---|" + "---|" * len(queries)]
    for base, diffs in study["tqn_minus"].items():
        cells = [f"{100 * d['difference']:+.1f} [{100 * d['interval95'][0]:+.1f}, {100 * d['interval95'][1]:+.1f}]"
                 for d in diffs.values()]
        lines.append(f"| {build.MODEL_NAMES[base]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(data_dir: Path | None = None, budget: train.Budget | None = None, seeds: tuple[int, ...] = SEEDS) -> dict:
    start = time.monotonic()
    data_dir = Path(data_dir or build.REPO / "data")
    budget = budget or train.Budget()
    datasets = build.make_splits(data_dir)
    test = datasets["test"]
    routine = build.is_routine(test)
    per_seed, hits = {}, {}
    for seed in seeds:
        models, _ = train.train_all(datasets["short"], datasets["train"], budget, seed)
        preds = {name: train.predict(enc, head, test) for name, (enc, head) in models.items()}
        per_seed[seed] = {name: build.summarise(p, test) for name, p in preds.items()}
        hits[seed] = {name: {q: (p[q] == test.targets[q])[routine] for q in train.HEADS} for name, p in preds.items()}
        print(f"seeds: seed {seed} done ({time.monotonic() - start:.0f}s)", file=sys.stderr, flush=True)
    study = {"provenance": {**build.data_fingerprint(data_dir), "train_seeds": list(seeds), "budget": asdict(budget),
                            "torch": torch.__version__},
             "per_seed": {str(s): v for s, v in per_seed.items()}, **aggregate(per_seed, hits),
             "wall_seconds": round(time.monotonic() - start)}
    OUT_JSON.write_text(json.dumps(study, indent=2) + "\n")
    OUT_MD.write_text(markdown(study, seeds, int(routine.sum())))
    print(OUT_MD.read_text(), flush=True)
    return study


if __name__ == "__main__":
    main()
