"""`vqs metrics`: latency percentiles, throughput and error rates from the gateway's and Triton's
Prometheus endpoints, as a table (refreshed with `--watch S`) or JSON.

Gateway: p50/p95/p99 per RPC and per pipeline stage from its histograms, computed as PromQL's
`histogram_quantile` does (linear inside the bucket that holds the rank; the largest finite bound
when it falls in +Inf), so the numbers agree with a Prometheus server scraping the same endpoint.
Triton exports cumulative counters, not histograms: per model the mean request, queue and
compute time, requests/s, inferences/s, average batch and failures come from their growth over
the interval. One-shot numbers cover the time since each series was created (since start);
with `--watch` each table covers the last interval.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

QUANTILES = (0.5, 0.95, 0.99)
DEFAULT_GATEWAY = "http://127.0.0.1:9090/metrics"
SCRAPE_TIMEOUT_S = 10.0

stdout = Console()
stderr = Console(stderr=True)

# --- the text exposition format ----------------------------------------------------------------

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    at: float  # unix time of the scrape
    samples: dict[str, dict[Labels, float]]  # metric name -> labels -> value

    def series(self, name: str) -> dict[Labels, float]:
        return self.samples.get(name, {})


def _unescape(value: str) -> str:
    return value.replace(r"\\", "\x00").replace(r"\"", '"').replace(r"\n", "\n").replace("\x00", "\\")


def parse(text: str, at: float) -> Scrape:
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line.strip())
        if not m:
            continue
        name, labels, value = m.groups()
        pairs = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(labels or "")))
        try:
            samples[name][pairs] = float(value)
        except ValueError:
            continue
    return Scrape(at, dict(samples))


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode("utf-8", errors="replace")
    return parse(text, time.time())


def normalise_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    if url.rstrip("/").count("/") == 2:  # no path: the usual one
        url = url.rstrip("/") + "/metrics"
    return url


# --- histograms ---------------------------------------------------------------------------------

def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL's histogram_quantile over cumulative (upper bound, count) pairs; None when empty."""
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for i, (bound, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(bound):
                return buckets[-2][0] if len(buckets) > 1 else None
            if i == 0 and bound <= 0:
                return bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 0.0)
        prev_bound, prev_count = bound, count
    return None


def grouped_buckets(scrape: Scrape, name: str, by: str, where: dict[str, str] | None = None
                    ) -> dict[str, dict[float, float]]:
    """`sum by (by, le)` of a histogram's buckets: group -> upper bound -> cumulative count."""
    out: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in scrape.series(f"{name}_bucket").items():
        d = dict(labels)
        if where and any(d.get(k) != v for k, v in where.items()):
            continue
        out[d.get(by, "")][float(d["le"])] += value
    return out


def grouped_sum(scrape: Scrape, name: str, by: str, where: dict[str, str] | None = None) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, value in scrape.series(name).items():
        d = dict(labels)
        if where and any(d.get(k) != v for k, v in where.items()):
            continue
        out[d.get(by, "")] += value
    return out


def created(scrape: Scrape, name: str) -> float | None:
    """The earliest `_created` time of a prometheus_client metric (when counting started)."""
    times = list(scrape.series(f"{name}_created").values())
    return min(times) if times else None


def _delta(now: dict, before: dict | None) -> dict:
    if before is None:
        return dict(now)
    # A series that went down was reset (a restart): count it from zero, as PromQL's increase does.
    return {k: (v - before.get(k, 0.0)) if v >= before.get(k, 0.0) else v for k, v in now.items()}


def latency_rows(now: Scrape, before: Scrape | None, name: str, by: str, extra_by: str | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Per group: count, rate, p50/p95/p99 in seconds (and error rate when `extra_by` is status)."""
    cur = grouped_buckets(now, name, by)
    old = grouped_buckets(before, name, by) if before else {}
    counts = grouped_sum(now, f"{name}_count", by)
    old_counts = grouped_sum(before, f"{name}_count", by) if before else {}
    ok_counts = grouped_sum(now, f"{name}_count", by, {"status": "OK"}) if extra_by else {}
    old_ok = grouped_sum(before, f"{name}_count", by, {"status": "OK"}) if extra_by and before else {}
    since = before.at if before else created(now, name)
    span = max(now.at - since, 1e-9) if since else None
    rows: dict[str, dict[str, Any]] = {}
    for group, buckets in sorted(cur.items()):
        d = _delta(buckets, old.get(group) if before else None)
        n = counts.get(group, 0.0) - (old_counts.get(group, 0.0) if before else 0.0)
        row: dict[str, Any] = {"count": n, "per_s": (n / span) if span else None}
        for q in QUANTILES:
            row[f"p{round(q * 100)}_s"] = histogram_quantile(q, list(d.items()))
        if extra_by:
            ok = ok_counts.get(group, 0.0) - (old_ok.get(group, 0.0) if before else 0.0)
            row["errors"] = n - ok
            row["error_rate"] = (n - ok) / n if n else 0.0
        rows[group] = row
    return rows


# --- the two servers ----------------------------------------------------------------------------

def gateway_view(now: Scrape, before: Scrape | None) -> dict[str, Any]:
    since = before.at if before else created(now, "vqs_request_duration_seconds")
    span = max(now.at - since, 1e-9) if since else None

    def counter(name: str) -> float:
        total = sum(now.series(f"{name}_total").values())
        return total - (sum(before.series(f"{name}_total").values()) if before else 0.0)

    errors = _delta(grouped_sum(now, "vqs_errors_total", "code"),
                    grouped_sum(before, "vqs_errors_total", "code") if before else None)
    return {
        "rpcs": latency_rows(now, before, "vqs_request_duration_seconds", "rpc", extra_by="status"),
        "stages": latency_rows(now, before, "vqs_stage_duration_seconds", "stage"),
        "video_seconds_per_s": counter("vqs_video_seconds") / span if span else None,
        "clips_per_s": counter("vqs_clips") / span if span else None,
        "errors_by_code": {k: v for k, v in errors.items() if v},
        "inflight": sum(now.series("vqs_inflight_requests").values()),
        "encoders": encoder_rows(now, before, span),
        "interval_s": span,
    }


def encoder_rows(now: Scrape, before: Scrape | None, span: float | None) -> dict[str, dict[str, Any]]:
    """Per clip encoder: the GMACs it spent (and per second), and for adaptive ones the clips
    observed and their mean kept ratio (GMACs spent / without the adaptive module)."""
    def delta(name: str) -> dict[str, float]:
        return _delta(grouped_sum(now, name, "encoder"), grouped_sum(before, name, "encoder") if before else None)

    gmacs = delta("vqs_encoder_gmacs_total")
    clips, ratio_sum = delta("vqs_adaptive_kept_ratio_count"), delta("vqs_adaptive_kept_ratio_sum")
    return {
        encoder: {
            "gmacs": gmacs.get(encoder, 0.0),
            "gmacs_per_s": gmacs.get(encoder, 0.0) / span if span else None,
            "adaptive_clips": clips.get(encoder, 0.0),
            "mean_kept_ratio": ratio_sum[encoder] / clips[encoder] if clips.get(encoder) else None,
        }
        for encoder in sorted(set(gmacs) | set(clips))
    }


TRITON_COUNTERS = {
    "success": "nv_inference_request_success",
    "failure": "nv_inference_request_failure",
    "inferences": "nv_inference_count",
    "executions": "nv_inference_exec_count",
    "request_us": "nv_inference_request_duration_us",
    "queue_us": "nv_inference_queue_duration_us",
    "compute_us": "nv_inference_compute_infer_duration_us",
}


def triton_view(now: Scrape, before: Scrape | None) -> dict[str, Any]:
    """Per model, from the growth of Triton's cumulative counters (since start when one-shot:
    Triton gives no start time, so rates are then left out)."""
    span = (now.at - before.at) if before else None
    d = {key: _delta(grouped_sum(now, name, "model"),
                     grouped_sum(before, name, "model") if before else None)
         for key, name in TRITON_COUNTERS.items()}
    models: dict[str, dict[str, Any]] = {}
    for model in sorted(grouped_sum(now, TRITON_COUNTERS["success"], "model")):
        ok, failed = d["success"].get(model, 0.0), d["failure"].get(model, 0.0)
        requests = ok + failed
        execs = d["executions"].get(model, 0.0)
        row: dict[str, Any] = {
            "requests": requests,
            "failures": failed,
            "error_rate": failed / requests if requests else 0.0,
            "requests_per_s": requests / span if span else None,
            "inferences_per_s": d["inferences"].get(model, 0.0) / span if span else None,
            "avg_batch": d["inferences"].get(model, 0.0) / execs if execs else None,
        }
        for key in ("request_us", "queue_us", "compute_us"):
            row[f"mean_{key[:-3]}_ms"] = d[key].get(model, 0.0) / ok / 1000 if ok else None
        # Only when Triton runs with --metrics-config summary_latencies=true: its own quantiles of
        # request time over its sliding window (not over our interval).
        for labels, value in now.series("nv_inference_request_summary_us").items():
            lab = dict(labels)
            if lab.get("model") == model and "quantile" in lab and float(lab["quantile"]) in QUANTILES:
                row[f"p{round(float(lab['quantile']) * 100)}_ms"] = value / 1000
        models[model] = row
    return {"models": models, "interval_s": span}


# --- output ---------------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:,.0f}" if seconds >= 1 else f"{seconds * 1000:.1f}"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def tables(view: dict[str, Any]) -> Group:
    parts = []
    g = view.get("gateway")
    span = lambda s: "since start" if s is None or view.get("one_shot") else f"last {s:.0f} s"  # noqa: E731
    if g is not None:
        t = Table(title=f"gateway RPCs ({span(g['interval_s'])}; ms)", title_justify="left")
        for col in ("rpc", "count", "per s", "p50", "p95", "p99", "errors", "error rate"):
            t.add_column(col, justify="left" if col == "rpc" else "right")
        for rpc, r in g["rpcs"].items():
            t.add_row(rpc, f"{r['count']:.0f}", _num(r["per_s"]), _ms(r["p50_s"]), _ms(r["p95_s"]),
                      _ms(r["p99_s"]), f"{r['errors']:.0f}", f"{r['error_rate']:.1%}")
        parts.append(t)
        s = Table(title="pipeline stages (ms per request)", title_justify="left")
        for col in ("stage", "count", "p50", "p95", "p99"):
            s.add_column(col, justify="left" if col == "stage" else "right")
        for stage, r in g["stages"].items():
            s.add_row(stage, f"{r['count']:.0f}", _ms(r["p50_s"]), _ms(r["p95_s"]), _ms(r["p99_s"]))
        parts.append(s)
        if g["encoders"]:
            e = Table(title="encoder compute", title_justify="left")
            for col in ("encoder", "GMACs", "GMACs/s", "adaptive clips", "mean kept ratio"):
                e.add_column(col, justify="left" if col == "encoder" else "right")
            for encoder, r in g["encoders"].items():
                e.add_row(encoder, _num(r["gmacs"], "{:,.1f}"), _num(r["gmacs_per_s"]),
                          f"{r['adaptive_clips']:.0f}", _num(r["mean_kept_ratio"], "{:.3f}"))
            parts.append(e)
        errs = ", ".join(f"{k} {v:.0f}" for k, v in sorted(g["errors_by_code"].items())) or "none"
        parts.append(f"throughput: {_num(g['video_seconds_per_s'])} video-s/s, "
                     f"{_num(g['clips_per_s'])} clips/s; in flight {g['inflight']:.0f}; errors: {errs}")
    tv = view.get("triton")
    if tv is not None:
        t = Table(title=f"Triton models ({span(tv['interval_s'])}; mean ms from counters)",
                  title_justify="left")
        summaries = any("p50_ms" in r for r in tv["models"].values())
        quantile_cols = ("p50*", "p95*", "p99*") if summaries else ()
        for col in ("model", "requests", "req/s", "infer/s", "avg batch", "request", "queue",
                    "compute", *quantile_cols, "failures"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for model, r in tv["models"].items():
            quantiles = [_num(r.get(f"p{q}_ms"), "{:.1f}") for q in (50, 95, 99)] if summaries else []
            t.add_row(model, f"{r['requests']:.0f}", _num(r["requests_per_s"]),
                      _num(r["inferences_per_s"]), _num(r["avg_batch"], "{:.1f}"),
                      _num(r["mean_request_ms"], "{:.1f}"), _num(r["mean_queue_ms"], "{:.1f}"),
                      _num(r["mean_compute_ms"], "{:.1f}"), *quantiles, f"{r['failures']:.0f}")
        if summaries:
            t.caption = "* Triton's own request-time quantiles over its sliding window"
        parts.append(t)
    for name, message in view.get("unreachable", {}).items():
        parts.append(f"[red]{name} unreachable[/red]: {message}")
    return Group(*parts)


def collect(urls: dict[str, str]) -> tuple[dict[str, Scrape], dict[str, str]]:
    got, failed = {}, {}
    for name, url in urls.items():
        try:
            got[name] = scrape(url)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            failed[name] = f"{url}: {getattr(exc, 'reason', exc)}"
    return got, failed


def build_view(now: dict[str, Scrape], before: dict[str, Scrape] | None, failed: dict[str, str]
               ) -> dict[str, Any]:
    view: dict[str, Any] = {"at": time.time(), "one_shot": before is None}
    if "gateway" in now:
        view["gateway"] = gateway_view(now["gateway"], (before or {}).get("gateway"))
    if "triton" in now:
        view["triton"] = triton_view(now["triton"], (before or {}).get("triton"))
    if failed:
        view["unreachable"] = failed
    return view


def metrics(
    gateway: Annotated[str, typer.Option(
        envvar="VQS_METRICS_URL", help="The gateway's metrics endpoint (URL or HOST:PORT).")] = DEFAULT_GATEWAY,
    triton: Annotated[str | None, typer.Option(
        envvar="VQS_TRITON_METRICS_URL",
        help="Triton's metrics endpoint (URL or HOST:PORT; its --metrics-port). Omitted: gateway only.")] = None,
    watch: Annotated[float | None, typer.Option(
        min=0.5, help="Refresh every S seconds, each table covering the last S seconds.")] = None,
    count: Annotated[int | None, typer.Option(
        min=1, help="With --watch: stop after this many refreshes.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON instead of tables; with --watch one line since start, then one per interval.")] = False,
) -> None:
    """Latency percentiles per RPC, stage and Triton model, throughput and error rates."""
    urls = {"gateway": normalise_url(gateway)}
    if triton:
        urls["triton"] = normalise_url(triton)
    now, failed = collect(urls)
    if not now:
        for message in failed.values():
            stderr.print(f"[red]error[/red] cannot scrape {message}", highlight=False)
        stderr.print("is the gateway running with metrics on (`vqs serve`, VQS_METRICS_PORT)? "
                     "pass --gateway / --triton", highlight=False)
        raise typer.Exit(4)

    def emit(view: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(view) + "\n")
        sys.stdout.flush()

    if watch is None:
        view = build_view(now, None, failed)
        emit(view) if as_json else stdout.print(tables(view))
        raise typer.Exit(1 if failed else 0)

    done = 0
    first = build_view(now, None, failed)  # since start, until the first interval is over
    if as_json:
        emit(first)
    live = None if as_json else Live(tables(first), console=stdout, auto_refresh=False, transient=False)
    try:
        if live:
            live.start(refresh=True)
        while count is None or done < count:
            time.sleep(watch)
            before = now
            current, failed = collect(urls)
            now = {**before, **current}  # an endpoint that failed keeps its last scrape
            view = build_view(current, {k: v for k, v in before.items() if k in current}, failed)
            if as_json:
                emit(view)
            else:
                live.update(tables(view), refresh=True)
            done += 1
    except KeyboardInterrupt:
        pass
    finally:
        if live:
            live.stop()
