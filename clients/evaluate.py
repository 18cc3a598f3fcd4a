"""`vqs evaluate SPLIT_DIR --out results.json`: score what the server answers against the labels.

SPLIT_DIR holds videos and a `labels.jsonl` (one record per video: `file`, `duration_s` and one
attribute per query, as `vqs synth` and the model build write them; "null" where the video shows
no routine). Every labelled video is sent to the gateway exactly as `vqs score` sends it (a path
when it lies under `--uri-root`, the bytes otherwise); the served answers go to a JSONL beside the
output (`--resume` continues it, so a finished file is scored again without a server), and the
metrics to `--out`. Per query, over the videos that show a routine (as the paper reports them;
`all_videos` repeats accuracy and ECE over every video):

- accuracy per query (with a percentile-bootstrap 95% interval over videos) and the majority
  answer's rate on the split (what a constant answer scores);
- mean per-class accuracy (the mean over true attributes of the accuracy within each; for the
  global "class" query this is the paper's per-class accuracy);
- accuracy by video length (bins cut at `--length-bins` seconds, from the labels' durations);
- expected calibration error of each head's top answer (`--ece-bins` equal-width bins; bin m holds
  confidences in ((m-1)/M, m/M]);
Then over the whole split: videos without a routine (every label "null") and how many got "null"
on every query, the same and accuracy per label `kind` where the labels have one, and how many
videos the server flagged as unlike its training data (only where the served decoder says).

`--against OTHER.json` (another results file on the same videos: a baseline served by another
model repository, or the torch models' predictions as `{"videos": [{"id", "labels", "answers"}]}`)
adds, per query over the shared videos with a routine, the paired bootstrap 95% interval of
(this - other) accuracy and how often the two answer the same.

A failed video counts as a wrong answer (and is listed); exit 3 when any failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clients import analyze, scoring
from clients.archive import Item, Listing
from clients.channel import (
    DEFAULT_SERVER, ServerOption, TlsCaOption, TlsCertOption, TlsKeyOption, TokenOption, config_from_options,
)

NULL = "null"
DEFAULT_LENGTH_BINS = (8.0, 14.0)
DEFAULT_ECE_BINS = 15
DEFAULT_ROUNDS = 2000
RESULTS_FORMAT = 1

stdout = Console()
stderr = Console(stderr=True)


# --- metrics (pure) -------------------------------------------------------------------------

def accuracy(correct: Sequence[bool]) -> float | None:
    return sum(correct) / len(correct) if correct else None


def mean_class_accuracy(truth: Sequence[str], correct: Sequence[bool]) -> float | None:
    """The mean over true attributes of the accuracy among the videos that have it."""
    if len(truth) != len(correct):
        raise ValueError(f"{len(truth)} labels for {len(correct)} outcomes")
    by_class: dict[str, list[bool]] = defaultdict(list)
    for t, c in zip(truth, correct):
        by_class[t].append(c)
    if not by_class:
        return None
    return sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)


def majority_rate(truth: Sequence[str]) -> float | None:
    """The rate of the most frequent true attribute: what always giving that answer scores."""
    return max(Counter(truth).values()) / len(truth) if truth else None


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[bool], bins: int = DEFAULT_ECE_BINS
) -> float | None:
    """sum over bins of (videos in bin / videos) * |accuracy in bin - mean confidence in bin|,
    with M equal-width bins, bin m holding confidences in ((m-1)/M, m/M] (0 in the first)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    if not confidence:
        return None
    totals = [[0, 0.0, 0] for _ in range(bins)]  # videos, confidence sum, correct
    for p, c in zip(confidence, correct):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"confidence {p} is not a probability")
        b = min(max(math.ceil(p * bins) - 1, 0), bins - 1)
        totals[b][0] += 1
        totals[b][1] += p
        totals[b][2] += int(c)
    n = len(confidence)
    return sum(abs(hits / k - conf / k) * k / n for k, conf, hits in totals if k)


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default `percentile` method)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_interval(
    values: Sequence[float], *, rounds: int = DEFAULT_ROUNDS, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile-bootstrap interval of it
    (resampling the values with replacement `rounds` times). For a paired comparison pass the
    per-video differences a_i - b_i: the mean of a resample of them is the difference of the
    two accuracies on that resample of videos."""
    if not values:
        raise ValueError("no values to resample")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(rounds))
    tail = (1.0 - level) / 2
    return sum(values) / n, quantile(means, tail), quantile(means, 1.0 - tail)


def length_bin_names(cuts: Sequence[float]) -> list[str]:
    edges = [0.0, *cuts]
    names = [f"{a:g}-{b:g} s" for a, b in zip(edges, edges[1:])]
    return [*names, f">={edges[-1]:g} s"]


def length_bin(seconds: float, cuts: Sequence[float]) -> int:
    return sum(seconds >= c for c in cuts)


# --- one video's outcome --------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One labelled video and what the server answered (answers None when it failed)."""

    id: str
    duration_s: float
    labels: dict[str, str]
    answers: dict[str, str] | None
    confidence: dict[str, float]
    in_domain: bool | None = None
    in_domain_score: float | None = None
    error: dict[str, Any] | None = None
    kind: str | None = None  # the label's "kind" where the split has one ("routine", "idle", ...)

    def correct(self, query: str) -> bool:
        return self.answers is not None and self.answers.get(query) == self.labels[query]

    def to_json(self) -> dict[str, Any]:
        row = {"id": self.id, "kind": self.kind, "duration_s": self.duration_s, "labels": self.labels,
               "answers": self.answers, "confidence": self.confidence,
               "in_domain": self.in_domain, "in_domain_score": self.in_domain_score}
        return row | ({"error": self.error} if self.error else {})


def outcome_of(label: Mapping[str, Any], row: Mapping[str, Any] | None, queries: Sequence[str]) -> Outcome:
    """The outcome of the labelled video `label` from its `vqs score` line (None: never sent)."""
    labels = {q: str(label[q]) for q in queries}
    duration = float(label.get("duration_s") or 0.0)
    kind = label.get("kind")
    if row is None or "result" not in row:
        error = (row or {}).get("error") or {"code": "MISSING", "message": "no answer recorded"}
        return Outcome(label["file"], duration, labels, None, {}, error=error, kind=kind)
    result = row["result"]
    served = {a["query"]: a for a in result["answers"]}
    domain = result.get("domain") or {}
    return Outcome(
        id=label["file"],
        duration_s=duration or float(result["video"]["duration_s"]),
        labels=labels,
        answers={q: served[q]["attribute"] for q in queries if q in served},
        confidence={q: float(served[q]["probability"]) for q in queries if q in served},
        in_domain=domain.get("in_domain"),
        in_domain_score=domain.get("score"),
        kind=kind,
    )


def evaluated_queries(labels: Sequence[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The served queries (in the server's order) that every label record has."""
    served: list[str] = []
    for row in rows.values():
        if "result" in row:
            served = [a["query"] for a in row["result"]["answers"]]
            break
    return [q for q in served if all(q in rec for rec in labels)]


# --- the metrics of a split -----------------------------------------------------------------

def answered_null(o: Outcome, queries: Sequence[str]) -> bool:
    """The server said "not in this video" on every query."""
    return o.answers is not None and all(o.answers.get(q) == NULL for q in queries)


def has_routine(o: Outcome) -> bool:
    """Labelled with something other than "null" on some query: a video that shows a routine."""
    return any(v != NULL for v in o.labels.values())


def query_metrics(
    outcomes: Sequence[Outcome], q: str, *, ece_bins: int, rounds: int, seed: int
) -> dict[str, Any]:
    """Accuracy (with its bootstrap interval), per-class accuracy, majority rate and ECE of one
    query over `outcomes` (None where there is nothing to measure)."""
    if not outcomes:
        return {"accuracy": None, "accuracy_95": None, "mean_class_accuracy": None,
                "majority_rate": None, "ece": None, "mean_confidence": None}
    correct = [o.correct(q) for o in outcomes]
    truth = [o.labels[q] for o in outcomes]
    acc, lo, hi = bootstrap_interval([float(c) for c in correct], rounds=rounds, seed=seed)
    scored = [o for o in outcomes if q in o.confidence]
    return {
        "accuracy": acc,
        "accuracy_95": [lo, hi],
        "mean_class_accuracy": mean_class_accuracy(truth, correct),
        "majority_rate": majority_rate(truth),
        "ece": expected_calibration_error(
            [o.confidence[q] for o in scored], [o.correct(q) for o in scored], ece_bins),
        "mean_confidence": accuracy([o.confidence[q] for o in scored]),
    }


def summarise(
    outcomes: Sequence[Outcome], queries: Sequence[str], *, length_cuts: Sequence[float],
    ece_bins: int, rounds: int, seed: int,
) -> dict[str, Any]:
    """The split's metrics. Per query (and by length) they are over the videos with a routine, as
    the paper reports them; videos labelled null everywhere are measured by how many were answered
    null everywhere; `all_videos` has accuracy and ECE over both kinds together."""
    answered = [o for o in outcomes if o.answers is not None]
    routine = [o for o in outcomes if has_routine(o)]
    options = {"ece_bins": ece_bins, "rounds": rounds, "seed": seed}
    by_length = []
    for b, name in enumerate(length_bin_names(length_cuts)):
        inside = [o for o in routine if length_bin(o.duration_s, length_cuts) == b]
        by_length.append({"bin": name, "videos": len(inside),
                          "accuracy": {q: accuracy([o.correct(q) for o in inside]) for q in queries}})
    no_routine = [o for o in outcomes if not has_routine(o)]
    flagged = [o for o in answered if o.in_domain is not None]
    kinds: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if o.kind is not None:
            kinds[o.kind].append(o)
    return {
        "videos": len(outcomes),
        "answered": len(answered),
        "routine_videos": len(routine),
        "errors": dict(Counter(o.error["code"] for o in outcomes if o.error)),
        "queries": {q: query_metrics(routine, q, **options) for q in queries},
        "by_length": by_length,
        "all_videos": {q: {k: v for k, v in query_metrics(outcomes, q, **options).items()
                           if k in ("accuracy", "ece")} for q in queries},
        "no_routine": {"videos": len(no_routine),
                       "all_null_rate": accuracy([answered_null(o, queries) for o in no_routine])},
        "in_domain": {
            "known": len(flagged),
            "out_of_domain_rate": (sum(not o.in_domain for o in flagged) / len(flagged)) if flagged else None,
        },
        "by_kind": {
            kind: {"videos": len(group),
                   "accuracy": {q: accuracy([o.correct(q) for o in group]) for q in queries},
                   "all_null_rate": accuracy([answered_null(o, queries) for o in group])}
            for kind, group in sorted(kinds.items())
        },
    }


def compare(
    ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]], queries: Sequence[str],
    *, rounds: int, seed: int,
) -> dict[str, Any]:
    """Paired comparison of two results files' `videos` on the videos with a routine both hold:
    per query, both accuracies, the bootstrap 95% interval of (ours - theirs), and the rate of
    equal answers."""
    other = {v["id"]: v for v in theirs}
    common = [v for v in ours if v["id"] in other and any(x != NULL for x in v["labels"].values())]
    if not common:
        raise ValueError("the two results share no video id (with a routine)")
    for v in common:
        w = other[v["id"]]
        clash = {q for q in queries if q in w["labels"] and w["labels"][q] != v["labels"][q]}
        if clash:
            raise ValueError(f"{v['id']}: the two results have different labels for {sorted(clash)}: "
                             "not the same split")

    def hit(video: Mapping[str, Any], q: str) -> float:
        answers = video.get("answers") or {}
        return float(answers.get(q) is not None and answers.get(q) == video["labels"][q])

    out: dict[str, Any] = {"videos": len(common), "queries": {}}
    for q in queries:
        if not all(q in other[v["id"]]["labels"] for v in common):
            continue
        a = [hit(v, q) for v in common]
        b = [hit(other[v["id"]], q) for v in common]
        diff, lo, hi = bootstrap_interval([x - y for x, y in zip(a, b)], rounds=rounds, seed=seed)
        same = [((v.get("answers") or {}).get(q) is not None
                 and (v.get("answers") or {}).get(q) == (other[v["id"]].get("answers") or {}).get(q))
                for v in common]
        out["queries"][q] = {"accuracy": sum(a) / len(a), "other_accuracy": sum(b) / len(b),
                             "difference": diff, "difference_95": [lo, hi],
                             "agreement": sum(same) / len(same)}
    return out


# --- reading the split ----------------------------------------------------------------------

def read_labels(split_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """The label records of SPLIT_DIR/labels.jsonl and the file's sha256; ValueError saying what
    is wrong with it."""
    path = split_dir / "labels.jsonl"
    if not path.is_file():
        raise ValueError(f"{split_dir} has no labels.jsonl: give a split folder (as `vqs synth` writes)")
    data = path.read_bytes()
    records = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{n} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            raise ValueError(f"{path}:{n} has no \"file\"")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no labelled video")
    ids = Counter(r["file"] for r in records)
    if (twice := [k for k, c in ids.items() if c > 1]):
        raise ValueError(f"{path} lists {twice[0]!r} more than once")
    return records, hashlib.sha256(data).hexdigest()


class LabelledListing(Listing):
    """The videos a labels.jsonl names, in its order (ids are its `file` values)."""

    kind = "split"

    def __init__(self, path: Path, records: Sequence[Mapping[str, Any]]):
        super().__init__(path)
        self.records = records

    def items(self) -> list[Item]:
        out = []
        for r in self.records:
            p = self.path / r["file"]
            out.append(Item(r["file"], str(p), p, p.stat().st_size if p.exists() else None))
        return out


def provenance(split_dir: Path, records: Sequence[Mapping[str, Any]], labels_sha256: str) -> dict[str, Any]:
    spec_path = split_dir / "split.json"
    try:
        spec = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    except ValueError:
        spec = None
    return {
        "dir": str(split_dir),
        "labels_sha256": labels_sha256,
        "videos": len(records),
        "generator_versions": sorted({str(r.get("generator_version", "unknown")) for r in records}),
        "split_spec": spec,
    }


# --- output ---------------------------------------------------------------------------------

def served_compute(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """What the encoder spent over the answered videos (from each answer's `compute`): the
    budgets asked for, GMACs per clip and kept ratio, both averaged over all their clips."""
    clips = gmacs = ratio = 0.0
    budgets = set()
    for result in results:
        compute, n = result.get("compute"), result["video"]["clips"]
        if compute is None:
            return {}
        budgets.add(compute["budget"])
        clips, gmacs, ratio = clips + n, gmacs + n * compute["gmacs_per_clip"], ratio + n * compute["kept_ratio"]
    if not clips:
        return {}
    return {"budget": sorted(budgets), "gmacs_per_clip": gmacs / clips, "kept_ratio": ratio / clips}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _compute_note(served: Mapping[str, Any]) -> str:
    if "gmacs_per_clip" not in served:
        return ""
    budgets = ",".join(f"{b:g}" for b in served["budget"])
    return f" at budget {budgets}: {served['gmacs_per_clip']:.4g} GMACs/clip, kept ratio {served['kept_ratio']:.3f}"


def results_table(results: Mapping[str, Any]) -> Table:
    m = results["metrics"]
    comparison = results.get("comparison")
    table = Table(title=f"vqs evaluate: {results['split']['dir']} ({m['videos']} videos, "
                        f"{m['answered']} answered; encoder {results['served'].get('encoder') or '?'}"
                        f"{_compute_note(results['served'])}); "
                        f"per query over the {m['routine_videos']} with a routine",
                  title_justify="left")
    table.add_column("query", style="bold")
    table.add_column("accuracy % [95%]", justify="right")
    table.add_column("majority %", justify="right", style="dim")
    table.add_column("per-class %", justify="right")
    for b in m["by_length"]:
        table.add_column(f"{b['bin']} (n={b['videos']})", justify="right")
    table.add_column("ECE %", justify="right")
    if comparison:
        table.add_column("other %", justify="right")
        table.add_column("diff [95%]", justify="right")
        table.add_column("agree %", justify="right")
    for q, s in m["queries"].items():
        lo, hi = s["accuracy_95"] or (None, None)
        row = [q, f"{_pct(s['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", _pct(s["majority_rate"]),
               _pct(s["mean_class_accuracy"]),
               *(_pct(b["accuracy"][q]) for b in m["by_length"]), _pct(s["ece"])]
        if comparison:
            c = comparison["queries"].get(q)
            if c is None:
                row += ["–", "–", "–"]
            else:
                dlo, dhi = c["difference_95"]
                row += [_pct(c["other_accuracy"]),
                        f"{100 * c['difference']:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]",
                        _pct(c["agreement"])]
        table.add_row(*row)
    return table


def notes(results: Mapping[str, Any]) -> list[str]:
    m = results["metrics"]
    lines = []
    if m["no_routine"]["videos"]:
        lines.append(f"videos without a routine: {m['no_routine']['videos']}, null on every query: "
                     f"{_pct(m['no_routine']['all_null_rate'])}%")
    for kind, k in m.get("by_kind", {}).items():
        lines.append(f"  kind {kind}: {k['videos']} videos, null on every query {_pct(k['all_null_rate'])}%, "
                     "accuracy " + ", ".join(f"{q} {_pct(a)}" for q, a in k["accuracy"].items()))
    d = m["in_domain"]
    if d["known"]:
        lines.append(f"flagged out of domain: {_pct(d['out_of_domain_rate'])}% of {d['known']} videos")
    else:
        lines.append("in-domain flag: not reported by the served decoder")
    if m["errors"]:
        lines.append("failed (counted wrong): " + ", ".join(f"{k} {v}" for k, v in sorted(m["errors"].items())))
    if "comparison" in results:
        lines.append(f"paired with {results['comparison']['against']} on {results['comparison']['videos']} videos")
    return lines


def answers_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".answers.jsonl")


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The `vqs score` lines of `path` by id (a later line for an id wins: a retried video)."""
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                rows[row["id"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return rows


def evaluate(
    split_dir: Annotated[Path, typer.Argument(
        exists=True, file_okay=False, readable=True, metavar="SPLIT_DIR",
        help="A folder of videos with labels.jsonl (a split from `vqs models`, or `vqs synth`).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", dir_okay=False, help="Results JSON (metrics and every video's outcome).")] = Path("results.json"),
    server: ServerOption = DEFAULT_SERVER,
    answers: Annotated[Path | None, typer.Option(
        dir_okay=False, help="JSONL of the served answers (default: beside --out, *.answers.jsonl).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Keep the answers already in the answers file; send only the missing videos.")] = False,
    force: Annotated[bool, typer.Option(help="Start the answers file over.")] = False,
    against: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True, metavar="OTHER.json",
        help="Another results file on the same videos: add the paired difference and agreement.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Requests in flight at once.")] = 4,
    uri_root: Annotated[Path | None, typer.Option(
        envvar="VQS_URI_ROOT", file_okay=False,
        help="The gateway's allowed root as seen from here: videos under it are sent as paths.")] = None,
    encoder: Annotated[str, typer.Option(help="Clip encoder; empty = the server's default.")] = "",
    budget: Annotated[float | None, typer.Option(
        callback=analyze.check_budget,
        help="Share of an adaptive encoder's full compute to spend, in (0, 1] (default 1 = full).")] = None,
    length_bins: Annotated[str, typer.Option(
        help="Video length cut points in seconds, comma-separated.")] = ",".join(f"{c:g}" for c in DEFAULT_LENGTH_BINS),
    ece_bins: Annotated[int, typer.Option(min=1, help="Equal-width confidence bins of the ECE.")] = DEFAULT_ECE_BINS,
    rounds: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = DEFAULT_ROUNDS,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    timeout: Annotated[float | None, typer.Option(min=0.1, help="Deadline per video, in seconds.")] = 600.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a video when the gateway is busy.")] = 3,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    token: TokenOption = None,
) -> None:
    """Send every video of a labelled split to the gateway and score its answers."""
    config = config_from_options(server, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
    try:
        cuts = sorted(float(c) for c in length_bins.split(",") if c.strip())
    except ValueError:
        raise typer.BadParameter("give numbers of seconds, e.g. 8,14", param_hint="--length-bins") from None
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other", param_hint="--resume")
    try:
        records, sha = read_labels(split_dir)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="SPLIT_DIR") from None
    answers_path = answers or answers_path_for(out)
    if answers_path.exists() and answers_path.stat().st_size and not (resume or force):
        raise typer.BadParameter(
            f"{answers_path} exists: pass --resume to continue (or reuse) it or --force to start over",
            param_hint="--answers")
    if force and answers_path.exists():
        answers_path.unlink()
    other = None
    if against is not None:
        try:
            other = json.loads(against.read_text())["videos"]
        except (ValueError, KeyError, TypeError):
            raise typer.BadParameter(f"{against} is not a `vqs evaluate` results file", param_hint="--against") from None

    listing = LabelledListing(split_dir, records)
    done = scoring.load_done(answers_path) if answers_path.exists() else {}
    todo = [i for i in listing.items() if not done.get(i.id)]  # a failed video is sent again
    code = analyze.EXIT_OK
    if todo:
        stderr.print(f"{len(records)} labelled videos in {split_dir}; {len(todo)} to send to {server}",
                     highlight=False)
        tally = scoring.Tally()
        answers_path.parent.mkdir(parents=True, exist_ok=True)
        writer = scoring.LineWriter(answers_path)
        try:
            asyncio.run(scoring.run_batch(
                listing, todo, writer, tally, server=config, workers=workers,
                uri_root=uri_root.resolve() if uri_root else None, encoder=encoder, budget=budget or 0.0,
                timeout=timeout, retries=retries))
        except scoring.GatewayRefused as exc:
            stderr.print(f"[red]error[/red] the gateway at {server} refused the call ({exc}); "
                         "check --token / VQS_TOKEN and the TLS options", highlight=False)
            raise typer.Exit(analyze.EXIT_ERROR) from None
        except scoring.GatewayUnreachable as exc:
            stderr.print(f"[red]error[/red] the gateway at {server} is unreachable ({exc}); "
                         "start it (`vqs serve`) and rerun with --resume", highlight=False)
            raise typer.Exit(analyze.EXIT_UNAVAILABLE) from None
        except KeyboardInterrupt:
            stderr.print("interrupted; rerun with --resume to finish")
            raise typer.Exit(scoring.EXIT_INTERRUPTED) from None
        finally:
            writer.close()

    rows = read_rows(answers_path)
    queries = evaluated_queries(records, rows)
    if not queries:
        stderr.print("[red]error[/red] no video was answered (or no served query is labelled): "
                     f"see {answers_path}", highlight=False)
        raise typer.Exit(analyze.EXIT_ERROR)
    outcomes = [outcome_of(r, rows.get(r["file"]), queries) for r in records]
    encoders = sorted({rows[o.id]["result"]["encoder"] for o in outcomes if o.answers is not None})
    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "split": provenance(split_dir, records, sha),
        "served": {"server": server, "encoder": ",".join(encoders), "answers_file": str(answers_path),
                   **served_compute(rows[o.id]["result"] for o in outcomes if o.answers is not None)},
        "settings": {"length_cuts_s": cuts, "ece_bins": ece_bins, "bootstrap_rounds": rounds, "seed": seed},
        "metrics": summarise(outcomes, queries, length_cuts=cuts, ece_bins=ece_bins, rounds=rounds, seed=seed),
        "videos": [o.to_json() for o in outcomes],
    }
    if other is not None:
        try:
            results["comparison"] = {"against": str(against), **compare(
                results["videos"], other, queries, rounds=rounds, seed=seed)}
        except (ValueError, KeyError, TypeError) as exc:
            raise typer.BadParameter(f"cannot pair with {against}: {exc}", param_hint="--against") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    stdout.print(results_table(results))
    for line in notes(results):
        stdout.print(line, highlight=False)
    stderr.print(f"results: {out}", highlight=False)
    if results["metrics"]["errors"]:
        code = scoring.EXIT_SOME_FAILED
    raise typer.Exit(code)
