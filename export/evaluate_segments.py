"""Issue 11's tables: the action parser against its baselines, the frame embedder against its
controls, on the validation split (where every knob is chosen) and the test split (once).

    python -m export.evaluate_segments --data runs/r11 --parser runs/r11/parser_s2 \
        --ablation runs/r11/sps1_s2 --detector runs/r11/detector --embedder runs/r11/embedder_rope \
        --cnn-only runs/r11/cnn_only --out runs/r11/evaluation.json

Parser protocol. Every method yields sub-action starts (frame indices) for a whole untrimmed
video; the truth is the four starts of take-off, flight, entry and the idle after.
- absolute: F1 (one-to-one matching) averaged over 1..5 frames and over 0.1..0.5 s;
- relative (TAPOS): F1/precision/recall averaged over d = 0.05..0.5 of the ACTION WINDOW's length
  (take-off start to entry end, ~35 frames), all predictions of the video counted;
- MoF and segmental F1@{10,25,50}: the k-th predicted segment is phase k (clipped to the last),
  so a spurious boundary costs what it costs a user reading the timeline.
Every method parses the same input: the stage-1 parser's frozen per-frame features (the parser's
and the ablation's heads, k-means, the detector). Knobs chosen on validation by the mean absolute
F1: the decoding of the parser and the ablation (pattern-change score: change window, minimum
segment length, threshold, at most 4 boundaries or no limit; or TransParser's arg-max pattern
change: minimum length, smoothing), k and minimum length (k-means, fitted on training-split
features), the number of evenly spaced boundaries, the detector's threshold, minimum distance and
limit (decoded like the parser's score). The parser row's choice is what model_repository serves.

Embedder protocol: linear probe (softmax regression, class-balanced, fitted on training-split
embeddings, L2 chosen on validation) -> balanced accuracy over the five phases; Kendall's tau
over all ordered pairs of videos on their action windows; frame retrieval AP@5/10/15 against
all other videos' frames, averaged per phase (idle would dominate a plain mean); the clock check:
ridge regression from embeddings of run-up (idle, before take-off) frames to the time in the video,
R^2 on held-out videos (validation: fitted on one half, scored on the other; test: fitted on
validation). Controls: a randomly initialised embedder, the CNN-only ablation, and for the clock
check the sine-cosine position vectors themselves (a clock the probe must find).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from export import frames as framedata
from export import segments_eval as se
from export.models.embedder import FrameEmbedder, sine_cosine_positions
from export.models.parser import change_scores, decode_segments, parse_responses, suppress_non_maxima
from export.train_embedder import load_embedder
from export.train_parser import frame_features, load_detector, load_parser, parse_features

FPS = framedata.FPS
PHASES = 5
MIN_LENGTHS = (1, 2, 3, 4, 6)
SMOOTHING = (1, 3, 5)
KMEANS_K = (3, 4, 5, 6, 8)
EVEN_COUNTS = (2, 3, 4, 5, 6)
CHANGE_WINDOWS = (1, 2, 3)
MIN_SEGMENTS = (2, 3, 4, 6)
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
MAX_BOUNDARIES = (0, 4)  # 0: no limit; 4: the sub-action changes of one routine
PROBE_VIDEOS = 60  # training-split videos for the probe and k-means


# ---------------------------------------------------------------- parser scoring
def parse_scores(predicted: list[np.ndarray], videos: list[framedata.Video]) -> dict[str, float]:
    truth = [v.boundaries for v in videos]
    frames = se.boundary_scores(zip(predicted, truth, [1.0] * len(videos)), se.ABSOLUTE_FRAMES)
    seconds = se.boundary_scores(zip(predicted, truth, [FPS] * len(videos)), se.ABSOLUTE_SECONDS)
    # a video without a routine has no boundaries and no action window: any prediction there is
    # false at every tolerance, whatever the scale
    window = [float(v.boundaries[-1] - v.boundaries[0]) if len(v.boundaries) else 1.0 for v in videos]
    relative = se.boundary_scores(zip(predicted, truth, window), se.RELATIVE)
    absolute = {**{("f", k): c for k, c in frames.items()}, **{("s", k): c for k, c in seconds.items()}}
    out = {f"abs_{k}": v for k, v in se.average(absolute).items()}
    out.update({f"frames_{k}": v for k, v in se.average(frames).items()})
    out.update({f"seconds_{k}": v for k, v in se.average(seconds).items()})
    out.update({f"rel_{k}": v for k, v in se.average(relative).items()})
    labels = [(se.labels_from_boundaries(p, len(v), order=range(PHASES)), v.phases)
              for p, v in zip(predicted, videos)]
    out["mof"] = float(np.mean(np.concatenate([a == b for a, b in labels])))
    for iou in se.SEGMENTAL_IOU:
        total = se.Counts()
        for a, b in labels:
            total = total + se.segmental_counts(a, b, iou)
        out[f"seg_f1@{int(iou * 100)}"] = total.f1
    out["boundaries_per_video"] = float(np.mean([len(p) for p in predicted]))
    return out


def absolute_f1(predicted: list[np.ndarray], videos: list[framedata.Video]) -> float:
    truth = [v.boundaries for v in videos]
    counts = {**{("f", k): c for k, c in se.boundary_scores(zip(predicted, truth, [1.0] * len(videos)),
                                                             se.ABSOLUTE_FRAMES).items()},
              **{("s", k): c for k, c in se.boundary_scores(zip(predicted, truth, [FPS] * len(videos)),
                                                             se.ABSOLUTE_SECONDS).items()}}
    return se.average(counts)["f1"]


def choose(knobs, predict, val: list[framedata.Video]) -> tuple[object, dict[str, float]]:
    """The knob with the best mean absolute F1 on validation (the first on ties), and its
    validation scores."""
    f1 = {k: absolute_f1([predict(i, k) for i in range(len(val))], val) for k in knobs}
    best = max(f1, key=lambda k: f1[k])
    return best, parse_scores([predict(i, best) for i in range(len(val))], val)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the centres."""
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        centres.append(x[rng.choice(len(x), p=d / d.sum())])
    c = np.stack(centres)
    for _ in range(iters):
        assign = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
        c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    return c


def peak_scores(scores: np.ndarray, min_segment: int) -> np.ndarray:
    """Per-frame scores (T,) -> non-max-suppressed as the served parser does in its graph."""
    return suppress_non_maxima(torch.from_numpy(scores)[None], min_segment - 1)[0].numpy()


def change_decoding(responses: dict[str, list[np.ndarray]], val: list[framedata.Video]):
    """The served decoding of responses, knobs chosen on validation -> (knob, val scores, predict)."""
    peaks = {(w, m): [peak_scores(change_scores(torch.from_numpy(r)[None], w)[0].numpy(), m)
                      for r in responses["val"]] for w in CHANGE_WINDOWS for m in MIN_SEGMENTS}
    grid = [(w, m, th, mb) for w in CHANGE_WINDOWS for m in MIN_SEGMENTS for th in THRESHOLDS for mb in MAX_BOUNDARIES]
    knob, scores = choose(grid, lambda i, k: decode_segments(peaks[k[:2]][i], responses["val"][i], k[2], k[3])[1], val)

    def predict(i: int, split: str, k=knob) -> np.ndarray:
        r = responses[split][i]
        return decode_segments(peak_scores(change_scores(torch.from_numpy(r)[None], k[0])[0].numpy(), k[1]),
                               r, k[2], k[3])[1]
    return dict(change_window=knob[0], min_segment_frames=knob[1], threshold=knob[2], max_boundaries=knob[3]), \
        scores, predict


def argmax_decoding(responses: dict[str, list[np.ndarray]], val: list[framedata.Video]):
    """TransParser's decoding (a boundary where the arg-max pattern changes) -> (knob, scores, predict)."""
    def boundaries(r: np.ndarray, knob: tuple[int, int]) -> np.ndarray:
        return np.asarray([s.start for s in parse_responses(r, *knob)[1:]], int)
    grid = [(m, w) for m in MIN_LENGTHS for w in SMOOTHING]
    knob, scores = choose(grid, lambda i, k: boundaries(responses["val"][i], k), val)
    return dict(min_length=knob[0], smooth=knob[1]), scores, \
        lambda i, split, k=knob: boundaries(responses[split][i], k)


SERVED_ROW = "parser (2 SPS, local + global + boundary loss)"


def _knob_text(knob: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in knob.items())


def evaluate_parsers(args, splits: dict[str, list[framedata.Video]], train: list[framedata.Video]) -> dict:
    val = splits["val"]
    parser = load_parser(args.parser)
    feats = {name: [frame_features(parser, v.frames) for v in vids] for name, vids in splits.items()}
    methods: dict[str, dict] = {}

    def add(name: str, knob: dict, scores: dict, predict) -> None:
        methods[name] = dict(knob=knob, val=scores, predict=predict)

    responses = {split: [parse_features(parser, f) for f in fs] for split, fs in feats.items()}
    add(SERVED_ROW, *change_decoding(responses, val))
    add("parser, arg-max pattern decoding", *argmax_decoding(responses, val))
    if args.paper_losses:
        paper = load_parser(args.paper_losses)
        pr = {split: [parse_features(paper, f) for f in fs] for split, fs in feats.items()}
        add("2 SPS, local + global losses only", *change_decoding(pr, val))
    for folder in args.ablation:
        ablation = load_parser(folder)
        meta = json.loads((Path(folder) / "parser.json").read_text())
        name = "1 SPS, no local loss" + (" (+ boundary loss)" if meta.get("boundary_weight") else " (paper's ablation)")
        ab = {split: [parse_features(ablation, f) for f in fs] for split, fs in feats.items()}
        options = [change_decoding(ab, val), argmax_decoding(ab, val)]
        add(name, *max(options, key=lambda o: o[1]["abs_f1"]))

    if args.parser_only:
        return _scored(methods, splits)

    def even(n: int, count: int) -> np.ndarray:
        return np.round(np.arange(1, count + 1) * n / (count + 1)).astype(int)
    knob, scores = choose(EVEN_COUNTS, lambda i, c: even(len(val[i]), c), val)
    add("evenly spaced", dict(count=knob), scores, lambda i, split, c=knob: even(len(splits[split][i]), c))

    # k-means over the same per-frame features (fitted on training-split frames)
    rng = np.random.default_rng(0)
    train_feats = np.concatenate([frame_features(parser, v.frames) for v in train[:PROBE_VIDEOS]])
    train_feats = train_feats[rng.choice(len(train_feats), min(8000, len(train_feats)), replace=False)]
    centres = {k: kmeans(train_feats, k, rng) for k in KMEANS_K}

    def kmeans_boundaries(feat: np.ndarray, k: int, min_length: int) -> np.ndarray:
        labels = np.argmin(((feat[:, None] - centres[k][None]) ** 2).sum(-1), axis=1)
        return se.boundaries_of(se.drop_short_segments(labels, min_length))
    grid = [(k, m) for k in KMEANS_K for m in MIN_LENGTHS]
    knob, scores = choose(grid, lambda i, km: kmeans_boundaries(feats["val"][i], *km), val)
    add("k-means (same features)", dict(k=knob[0], min_length=knob[1]), scores,
        lambda i, split, km=knob: kmeans_boundaries(feats[split][i], *km))

    # the temporal-conv boundary detector on the same features, decoded like the parser's score
    if args.detector:
        detector = load_detector(args.detector)
        with torch.no_grad():
            prob = {split: [torch.sigmoid(detector(torch.from_numpy(f)[None]))[0].numpy() for f in fs]
                    for split, fs in feats.items()}
        peaks = {m: [peak_scores(p, m) for p in prob["val"]] for m in MIN_SEGMENTS}
        grid = [(m, th, mb) for m in MIN_SEGMENTS for th in THRESHOLDS for mb in MAX_BOUNDARIES]
        knob, scores = choose(grid, lambda i, k: decode_segments(peaks[k[0]][i], np.zeros((len(val[i]), 1)),
                                                                 k[1], k[2])[1], val)
        add("temporal-conv detector", dict(min_segment_frames=knob[0], threshold=knob[1], max_boundaries=knob[2]),
            scores, lambda i, split, k=knob: decode_segments(peak_scores(prob[split][i], k[0]),
                                                             np.zeros((len(prob[split][i]), 1)), k[1], k[2])[1])

    return _scored(methods, splits)


def _scored(methods: dict[str, dict], splits: dict[str, list[framedata.Video]]) -> dict:
    """Each method's knob and validation scores, plus its test scores (and false boundaries on
    videos without a routine) with the knob chosen on validation."""
    out = {}
    for name, m in methods.items():
        out[name] = dict(knob=_knob_text(m["knob"]), knobs=m["knob"], val=m["val"])
        if "test" in splits:
            out[name]["test"] = parse_scores([m["predict"](i, "test") for i in range(len(splits["test"]))],
                                             splits["test"])
        if "null" in splits:
            counts = [len(m["predict"](i, "null")) for i in range(len(splits["null"]))]
            out[name]["null"] = dict(boundaries_per_video=float(np.mean(counts)),
                                     videos_with_a_boundary=float(np.mean(np.asarray(counts) > 0)))
    return out


# ---------------------------------------------------------------- embedder scoring
@torch.no_grad()
def embed(model: FrameEmbedder, video: framedata.Video) -> np.ndarray:
    return model(torch.from_numpy(video.frames)[None])[0].numpy()


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 200) -> torch.nn.Linear:
    """Class-balanced softmax regression (full-batch L-BFGS)."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    counts = torch.bincount(yt, minlength=PHASES).float()
    weight = counts.sum() / (PHASES * counts.clamp_min(1))
    probe = torch.nn.Linear(x.shape[1], PHASES)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(xt), yt, weight=weight) + l2 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    optimizer.step(closure)
    return probe


def ridge_r2(x_fit, y_fit, x_eval, y_eval, l2: float = 1.0) -> float:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    a = np.c_[(x_fit - mu) / sd, np.ones(len(x_fit))]
    b = np.c_[(x_eval - mu) / sd, np.ones(len(x_eval))]
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ y_fit)
    return se.r_squared(b @ w, y_eval)


def runup(embeddings: list[np.ndarray], videos: list[framedata.Video]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([e[v.phases == 0] for e, v in zip(embeddings, videos)])
    t = np.concatenate([np.flatnonzero(v.phases == 0) / FPS for v in videos])
    return x, t


def embedding_scores(emb: dict[str, list[np.ndarray]], splits, probe_xy) -> dict:
    out = {}
    x_tr, y_tr = probe_xy
    val_emb, val = emb["val"], splits["val"]
    x_val, y_val = np.concatenate(val_emb), np.concatenate([v.phases for v in val])
    probes = {l2: fit_probe(x_tr, y_tr, l2) for l2 in (1e-4, 1e-3, 1e-2)}

    def accuracy(probe, x, y):
        with torch.no_grad():
            return se.balanced_accuracy(probe(torch.from_numpy(x).float()).argmax(1).numpy(), y)
    best = max(probes, key=lambda l2: accuracy(probes[l2], x_val, y_val))
    for split, vids in splits.items():
        e = emb[split]
        x, y = np.concatenate(e), np.concatenate([v.phases for v in vids])
        windows = [ev[v.boundaries[0]:v.boundaries[-1]] for ev, v in zip(e, vids)]
        taus = [se.alignment_tau(windows[i], windows[j]) for i in range(len(vids)) for j in range(len(vids))
                if i != j]
        aps = {}
        offsets = np.concatenate([[0], np.cumsum([len(v) for v in vids])])
        for k in (5, 10, 15):
            per_phase: dict[int, list[np.ndarray]] = {p: [] for p in range(PHASES)}
            for i, v in enumerate(vids):
                others = np.r_[0:offsets[i], offsets[i + 1]:len(x)]
                queries = np.arange(0, len(v), 2)
                ap = se.retrieval_ap_per_query(e[i][queries], v.phases[queries], x[others], y[others], k)
                for p in range(PHASES):
                    per_phase[p].append(ap[v.phases[queries] == p])
            aps[f"ap@{k}"] = float(np.mean([np.concatenate(a).mean() for a in per_phase.values()]))
        out[split] = dict(probe_l2=best, balanced_accuracy=accuracy(probes[best], x, y),
                          kendall_tau=float(np.mean(taus)), **aps, clock_r2=clock_r2(emb, splits, split))
    return out


def evaluate_embedders(args, splits, train) -> dict:
    models: dict[str, FrameEmbedder] = {}
    if args.embedder:
        models["embedder (CNN + Transformer, SCL)"] = load_embedder(args.embedder)
    if args.cnn_only:
        models["CNN only, SCL (ablation)"] = load_embedder(args.cnn_only)
    torch.manual_seed(0)
    models["random init"] = FrameEmbedder().eval()
    out = {}
    probe_videos = train[:PROBE_VIDEOS]
    for name, model in models.items():
        emb = {split: [embed(model, v) for v in vids] for split, vids in splits.items()}
        tr = [embed(model, v) for v in probe_videos]
        xy = (np.concatenate(tr), np.concatenate([v.phases for v in probe_videos]))
        out[name] = embedding_scores(emb, splits, xy)
    # clock control: the position vectors themselves carry time, the probe must find it
    pe = {split: [sine_cosine_positions(len(v), 128).numpy() for v in vids] for split, vids in splits.items()}
    out["positions only (clock control)"] = {split: dict(clock_r2=clock_r2(pe, splits, split)) for split in splits}
    return out


def clock_r2(emb: dict[str, list[np.ndarray]], splits, split: str) -> float:
    """R^2 of time from run-up embeddings on held-out videos: on validation fitted on one half and
    scored on the other, on test fitted on validation."""
    val, half = splits["val"], len(splits["val"]) // 2
    if split == "val":
        return ridge_r2(*runup(emb["val"][:half], val[:half]), *runup(emb["val"][half:], val[half:]))
    return ridge_r2(*runup(emb["val"], val), *runup(emb[split], splits[split]))


# ---------------------------------------------------------------- tables
PARSER_COLUMNS = (("abs_f1", "abs F1"), ("frames_f1", "F1 1-5f"), ("seconds_f1", "F1 .1-.5s"),
                  ("abs_precision", "abs P"), ("abs_recall", "abs R"), ("rel_f1", "rel F1"),
                  ("rel_precision", "rel P"), ("rel_recall", "rel R"), ("mof", "MoF"),
                  ("seg_f1@10", "F1@10"), ("seg_f1@25", "F1@25"), ("seg_f1@50", "F1@50"),
                  ("boundaries_per_video", "#b/video"))
NULL_COLUMNS = (("boundaries_per_video", "#b/video"), ("videos_with_a_boundary", "share w/ b"))
EMBEDDER_COLUMNS = (("balanced_accuracy", "probe bal.acc"), ("kendall_tau", "Kendall tau"),
                    ("ap@5", "AP@5"), ("ap@10", "AP@10"), ("ap@15", "AP@15"), ("clock_r2", "clock R2"))


def table(title: str, rows: dict, columns, split: str) -> str:
    width = max(len(n) for n in rows) + 2
    lines = [f"{title} [{split}]", " " * width + " ".join(f"{c:>9}" for _, c in columns)]
    for name, row in rows.items():
        values = row.get(split, {})
        cells = [f"{values[k]:9.3f}" if k in values else f"{'-':>9}" for k, _ in columns]
        knob = f"  ({row['knob']})" if "knob" in row else ""
        lines.append(f"{name:<{width}}" + " ".join(cells) + knob)
    return "\n".join(lines)


def served_parser_scores(repository: Path, splits: dict[str, list[framedata.Video]]) -> dict:
    """The served artifact judged: model_repository/action_parser's ONNX graph on each video, its
    outputs decoded by `decode_segments` with its config's threshold and limit."""
    import onnxruntime as ort

    folder = Path(repository) / "action_parser"
    config = (folder / "config.pbtxt").read_text()

    def parameter(key: str) -> str:
        return config.split(f'key: "{key}" value: {{ string_value: "')[1].split('"')[0]
    threshold, most = float(parameter("boundary_threshold")), int(parameter("max_boundaries"))
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = {}
    for split, videos in splits.items():
        predicted = []
        for v in videos:
            responses, scores = session.run(["responses", "boundary_scores"], {"frames": v.frames[None]})
            predicted.append(decode_segments(scores[0], responses[0], threshold, most)[1])
        out[split] = parse_scores(predicted, videos) if split != "null" else dict(
            boundaries_per_video=float(np.mean([len(p) for p in predicted])))
    return out


def fingerprint(videos: list[framedata.Video]) -> str:
    """Which videos a split held: their seeds, lengths and boundaries."""
    h = hashlib.sha256()
    for v in videos:
        h.update(np.asarray([v.seed, len(v), *v.boundaries], np.int64).tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--parser", type=Path)
    p.add_argument("--ablation", type=Path, nargs="*", default=[],
                   help="parsers with 1 SPS unit and no local loss (the paper's ablation), one row each")
    p.add_argument("--paper-losses", type=Path, help="a parser trained with the paper's losses only, for a row")
    p.add_argument("--detector", type=Path)
    p.add_argument("--embedder", type=Path)
    p.add_argument("--cnn-only", type=Path)
    p.add_argument("--no-test", dest="test", action="store_false", help="validation only")
    p.add_argument("--parser-only", action="store_true", help="the parser's rows only, no baselines")
    p.add_argument("--served", type=Path, help="a model repository: score its action_parser artifact too")
    p.add_argument("--null-videos", type=Path,
                   help="a generator-v3 test split folder (labels.jsonl + frames.u8): false boundaries on its "
                        "videos without a routine")
    p.add_argument("--null-val", type=Path,
                   help="a generator-v3 validation split folder: its videos without a routine join the "
                        "parser's validation videos, so the knobs pay for false boundaries there")
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, help="first N videos of each split")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    splits = {"val": framedata.load_split("val", framedata.VAL_VIDEOS, cache=args.data)}
    if args.test:
        splits["test"] = framedata.load_split("test", framedata.TEST_VIDEOS, cache=args.data)
    needs_train = args.embedder or (args.parser and not args.parser_only)
    train = framedata.load_split("train", framedata.TRAIN_VIDEOS, backgrounds=2,
                                 cache=args.data)[:PROBE_VIDEOS] if needs_train else []
    if args.limit:
        splits = {k: v[:args.limit] for k, v in splits.items()}
    result: dict = dict(splits={name: dict(videos=len(vids), fingerprint=fingerprint(vids))
                                for name, vids in splits.items()})
    print("splits: " + ", ".join(f"{k} {v['videos']} videos ({v['fingerprint']})" for k, v in result["splits"].items()))
    if args.parser:
        parse_splits = dict(splits)
        if args.null_videos:
            parse_splits["null"] = framedata.load_null_videos(args.null_videos)
            result["splits"]["null"] = dict(videos=len(parse_splits["null"]), folder=args.null_videos.name,
                                            fingerprint=fingerprint(parse_splits["null"]))
        if args.null_val:  # the choices also pay for false boundaries where there is no routine
            null_val = framedata.load_null_videos(args.null_val)
            parse_splits["val"] = splits["val"] + null_val
            result["splits"]["val_null"] = dict(videos=len(null_val), folder=args.null_val.name,
                                                fingerprint=fingerprint(null_val))
        result["parser"] = evaluate_parsers(args, parse_splits, train)
        served = result["parser"][SERVED_ROW]
        result["served_knobs"] = served["knobs"]
        result["served_scores"] = {split: {k: round(v, 4) for k, v in served[split].items()}
                                   for split in (*splits, "null") if split in served}
        for split in splits:
            print(table("Action parser: sub-action boundaries", result["parser"], PARSER_COLUMNS, split), "\n")
        if args.null_videos:
            print(table("Action parser on videos without a routine", result["parser"], NULL_COLUMNS, "null"), "\n")
    if args.served:
        served_splits = dict(splits, **({"null": framedata.load_null_videos(args.null_videos)} if args.null_videos else {}))
        result["served"] = served_parser_scores(args.served, served_splits)
        for split, scores in result["served"].items():
            print(f"served action_parser [{split}]: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                                                 if k in ("abs_f1", "rel_f1", "mof", "boundaries_per_video")))
    if args.embedder:
        result["embedder"] = evaluate_embedders(args, splits, train)
        for split in splits:
            print(table("Frame embedder", result["embedder"], EMBEDDER_COLUMNS, split), "\n")
    print(f"evaluated in {time.monotonic() - start:.0f}s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
