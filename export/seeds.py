"""`make seeds` (python -m export.seeds): the seeds study. TQN and both baselines trained with
SEEDS on the same splits as `vqs models`, scored on test (routine videos), written to
export/seeds.json and export/seeds.md: mean ± std over seeds per query, per-class accuracy, accuracy
by video length, and the paired bootstrap 95% interval of TQN − baseline over test videos (each
video's hits averaged over seeds). Torch-side; the served table is `vqs models`' and
`vqs evaluate`'s. Training is seeded and deterministic, so a seed's models are kept beside the
data and taken from there when their provenance matches, not trained again (the seed `vqs models`
trains with, build.TRAIN_SEED, from the models it saved). The files are rewritten after every seed, so a study cut short keeps
the seeds that finished (listed in the JSON). `python -m export.seeds 8 9` runs only those seeds."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from export import build, recipe, train

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
    lengths = list(next(iter(study["models"].values()))["by_length"])
    lines += ["", "By video length (somersaults / twists / class, %, mean ± std):", "",
              "| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, m in study["models"].items():
        cells = [" / ".join(f"{100 * m['by_length'][b][q]['mean']:.1f} ± {100 * m['by_length'][b][q]['std']:.1f}"
                            for q in ("somersaults", "twists", "class")) for b in lengths]
        lines.append(f"| {build.MODEL_NAMES[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _models_path(data_dir: Path, seed: int) -> Path:
    """Where a seed's trained models are kept beside the data (`vqs models` keeps its seed's)."""
    return data_dir / ("trained_models.pt" if seed == build.TRAIN_SEED else f"trained_models_seed{seed}.pt")


def _saved_models(data_dir: Path, budget: train.Budget, seed: int) -> dict | None:
    """The models trained before for this seed, budget and data, if there are any."""
    path = _models_path(data_dir, seed)
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=False)
    return train.load_models(saved["models"]) if saved["provenance"] == build.training_provenance(data_dir, budget, seed) else None


def main(data_dir: Path | None = None, budget: train.Budget | None = None, seeds: tuple[int, ...] = SEEDS) -> dict:
    start = time.monotonic()
    data_dir = Path(data_dir or build.REPO / "data")
    budget = budget or train.Budget()
    datasets = build.make_splits(data_dir)
    flights = build.flight_bank(data_dir)
    test = datasets["test"]
    routine = build.is_routine(test)
    per_seed, hits, seconds, reused = {}, {}, {}, []
    study: dict = {}
    for seed in seeds:
        seed_start = time.monotonic()
        models = _saved_models(data_dir, budget, seed)
        if models is None:
            models, warm = recipe.train_all(datasets["short"], datasets["train"], flights, budget, seed)
            build.save_trained(_models_path(data_dir, seed), build.training_provenance(data_dir, budget, seed),
                               models, warm)
        else:
            models.pop("warm")
            reused.append(seed)
        preds = {name: {q: lg[q].argmax(-1) for q in train.HEADS}
                 for name, lg in recipe.logits(models, [test])[0].items()}
        per_seed[seed] = {name: build.summarise(p, test) for name, p in preds.items()}
        hits[seed] = {name: {q: (p[q] == test.targets[q])[routine] for q in train.HEADS} for name, p in preds.items()}
        seconds[seed] = round(time.monotonic() - seed_start)
        print(f"seeds: seed {seed} done in {seconds[seed]}s ({time.monotonic() - start:.0f}s)", file=sys.stderr,
              flush=True)
        done = tuple(per_seed)
        study = {"provenance": {**build.data_fingerprint(data_dir), "train_seeds": list(done),
                                "train_threads": train.TRAIN_THREADS, "budget": asdict(budget),
                                "torch": torch.__version__},
                 "seeds_asked": list(seeds), "seeds_done": list(done),
                 "reused_saved_models": reused, "seconds_per_seed": {str(s): t for s, t in seconds.items()},
                 "per_seed": {str(s): v for s, v in per_seed.items()}, **aggregate(per_seed, hits),
                 "wall_seconds": round(time.monotonic() - start)}
        OUT_JSON.write_text(json.dumps(study, indent=2) + "\n")
        OUT_MD.write_text(markdown(study, done, int(routine.sum())))
    print(OUT_MD.read_text(), flush=True)
    return study


if __name__ == "__main__":
    main(seeds=tuple(int(a) for a in sys.argv[1:]) or SEEDS)
