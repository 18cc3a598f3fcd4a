"""The one module that talks to Triton (tritonclient gRPC, asyncio).

Holds the gateway's view of the model contract (tensor names, dtypes, ranks; the other two views
are `model_repository/*/config.pbtxt` and the exported ONNX graphs), reads what the gateway needs to
know about the served models from their Triton configs (clip size and frame rate of each encoder;
the query decoder's queries, their attributes and its output order), and translates tritonclient
errors into `server.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import mmap
import os
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from server.errors import (
    BackendUnavailable,
    InferenceFailed,
    InternalError,
    InvalidInput,
    Overloaded,
    Timeout,
    VqsError,
    echo,
)

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "clip_encoder_"
QUERY_DECODER_MODEL = "tqn_decoder"

CLIPS = "clips"
FEATURES = "features"
# Adaptive encoders only: the compute budget of each clip (in (0, 1]; the model maps it to its
# B or K), and per clip what it kept (B', or K' per ATS block) and the GMACs it spent, counted in
# the graph from the shapes it processed.
BUDGET = "budget"
KEPT = "kept"
GMACS = "gmacs"
# Optional output of any encoder: per clip, its RMS whitened distance under a Gaussian fit to the
# encoder's own training features (~1 in domain, larger = less alike); see EncoderSpec.domain_scored.
DOMAIN_DISTANCE = "domain_distance"
MASK = "mask"
ATTENTION = "attention"
# Optional last output of the query decoder: how alike a video's clip features are to its training
# data (higher = more alike); its threshold is the config parameter IN_DOMAIN_THRESHOLD.
IN_DOMAIN_SCORE = "in_domain_score"
FEATURE_DIM = 256

# Config parameters (string values) written by export/onnx_export.py:
CLIP_FPS = "clip_fps"  # encoder: the frame rate its clips are sampled at (see pipeline/chunk.py)
# encoder: GMACs of one clip without any adaptive module (the plain encoder's constant cost; the
# denominator of an adaptive encoder's kept ratio)
GMACS_PER_CLIP = "gmacs_per_clip"
ADAPTIVE = "adaptive"  # adaptive encoder: its module, "sgs" or "ats"
# adaptive encoder: its budget knob (B for SGS, K for ATS) at budget 1, and its smallest value:
# knob = max(ceil(budget * budget_units), budget_floor)
BUDGET_UNITS = "budget_units"
BUDGET_FLOOR = "budget_floor"
BUDGET_DEFAULT = "budget_default"  # adaptive encoder, optional: the budget chosen on validation
# adaptive encoder, optional: "still,moving", each clip runs at budget ** p, p from `still` for a
# clip that hardly moves to `moving` for one that moves a lot (the graph measures its motion)
BUDGET_POWERS = "budget_powers"
QUERIES_PARAMETER = "queries"  # query decoder: query names, comma-separated, in output order
ATTRIBUTES_PARAMETER_PREFIX = "attributes."  # + query: its attributes, comma-separated, by logit
IN_DOMAIN_THRESHOLD = "in_domain_threshold"  # query decoder (and an encoder of its own): in domain = score >= this


# Per-frame models (issue 11): frames of one video (sampled at their `fps`, at 28 px) -> per frame
# the parser's pattern responses and boundary score, or the embedder's embeddings.
PARSER_MODEL = "action_parser"
EMBEDDER_MODEL = "frame_embedder"
FRAMES = "frames"
RESPONSES = "responses"
BOUNDARY_SCORES = "boundary_scores"
EMBEDDINGS = "embeddings"
FRAME_FEATURES = "frame_features"  # embedder, optional: context-free per-frame features
FRAME_SIZE = 28
EMBEDDING_DIM = 128
FPS_PARAMETER = "fps"  # both: the frame rate their frames are sampled at
CONTEXT_FRAMES = "context_frames"  # both: receptive radius in frames (windows need this much context)
MIN_FRAMES = "min_frames"  # both, optional: the fewest frames a request may hold (default 1)
PATTERNS = "patterns"  # parser: m, the width of `responses`
BOUNDARY_THRESHOLD = "boundary_threshold"  # parser: a boundary's score passes this (float)
MAX_BOUNDARIES = "max_boundaries"  # parser: keep at most this many, the highest (0 = all)


def logits_name(query: str) -> str:
    return f"logits_{query}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton dtype name: "UINT8", "FP32", "BOOL"
    dims: tuple[int, ...]  # without the batch dimension for batched models; -1 = variable


@dataclass(frozen=True)
class ModelContract:
    max_batch_size: int  # 0 = the model is not batched by Triton
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


ENCODER_CONTRACT = ModelContract(
    max_batch_size=64,
    inputs=(TensorSpec(CLIPS, "UINT8", (8, 112, 112, 3)),),  # T, H, W, C (RGB)
    outputs=(TensorSpec(FEATURES, "FP32", (FEATURE_DIM,)),),
)
ADAPTIVE_ENCODER_CONTRACT = ModelContract(
    max_batch_size=ENCODER_CONTRACT.max_batch_size,
    inputs=ENCODER_CONTRACT.inputs + (TensorSpec(BUDGET, "FP32", (1,)),),
    outputs=ENCODER_CONTRACT.outputs + (
        TensorSpec(KEPT, "INT64", (-1,)),  # SGS: [B'], ATS: [K' per ATS block] (cls not counted); see contract_for
        TensorSpec(GMACS, "FP32", (1,)),
    ),
)
ADAPTIVE_KINDS = {"sgs": "B (similarity bins per clip)", "ats": "K (tokens per ATS block)"}


def query_decoder_contract(queries: Sequence[str], *, in_domain: bool = False) -> ModelContract:
    """The query decoder's contract: one logits output per query, then the attention rows, then
    (when it scores its domain) the in-domain score."""
    return ModelContract(
        max_batch_size=0,
        inputs=(
            TensorSpec(FEATURES, "FP32", (-1, -1, FEATURE_DIM)),  # B, N, D
            TensorSpec(MASK, "BOOL", (-1, -1)),  # B, N; true = real clip
        ),
        outputs=tuple(TensorSpec(logits_name(q), "FP32", (-1, -1)) for q in queries)
        + (TensorSpec(ATTENTION, "FP32", (-1, len(queries), -1)),)  # B, queries, N
        + ((TensorSpec(IN_DOMAIN_SCORE, "FP32", (-1,)),) if in_domain else ()),  # B
    )


def frame_model_contract(model: str, patterns: int = 0, *, features: bool = False) -> ModelContract:
    """The contract of the action parser (`patterns` = m) or the frame embedder (with its optional
    context-free `frame_features` when `features`)."""
    inputs = (TensorSpec(FRAMES, "UINT8", (1, -1, FRAME_SIZE, FRAME_SIZE, 3)),)  # B, T, H, W, C
    if model == PARSER_MODEL:
        outputs = (TensorSpec(RESPONSES, "FP32", (1, -1, patterns)), TensorSpec(BOUNDARY_SCORES, "FP32", (1, -1)))
    elif model == EMBEDDER_MODEL:
        outputs = (TensorSpec(EMBEDDINGS, "FP32", (1, -1, EMBEDDING_DIM)),) + (
            (TensorSpec(FRAME_FEATURES, "FP32", (1, -1, EMBEDDING_DIM)),) if features else ())
    else:
        raise KeyError(f"{model!r} is not a per-frame model")
    return ModelContract(max_batch_size=0, inputs=inputs, outputs=outputs)


def contract_for(model: str, config: dict) -> ModelContract:
    """The gateway's contract for a model of the repository, given its Triton config as a dict
    (an encoder's is the plain or the adaptive one, plus DOMAIN_DISTANCE when its config declares
    it; the query decoder's outputs follow its `queries` parameter)."""
    if model == QUERY_DECODER_MODEL:
        spec = query_decoder_spec(config)
        return query_decoder_contract(
            [q.query for q in spec.queries], in_domain=spec.in_domain_threshold is not None
        )
    if model.startswith(ENCODER_PREFIX):
        contract = _encoder_contract(config)
        if _declares(config, DOMAIN_DISTANCE):
            contract = dataclasses.replace(
                contract, outputs=contract.outputs + (TensorSpec(DOMAIN_DISTANCE, "FP32", (1,)),))
        return contract
    if model in (PARSER_MODEL, EMBEDDER_MODEL):
        features = _declares(config, FRAME_FEATURES)
        return frame_model_contract(model, int(_parameter(config, PATTERNS) or 0), features=features)
    raise KeyError(f"no contract for model {model!r}")


def _encoder_contract(config: dict) -> ModelContract:
    if not _parameter(config, ADAPTIVE):
        return ENCODER_CONTRACT
    # How many counts `kept` holds per clip is the model's (SGS: 1; ATS: one per ATS block).
    kept = next((t for t in config.get("output", []) if t["name"] == KEPT), None)
    dims = tuple(int(d) for d in kept["dims"]) if kept else ()
    if len(dims) != 1:
        return ADAPTIVE_ENCODER_CONTRACT
    return dataclasses.replace(ADAPTIVE_ENCODER_CONTRACT, outputs=tuple(
        dataclasses.replace(t, dims=dims) if t.name == KEPT else t
        for t in ADAPTIVE_ENCODER_CONTRACT.outputs
    ))


@dataclass(frozen=True)
class FrameModelSpec:
    """A per-frame model as its Triton config describes it."""

    model: str
    frame_size: int
    fps: float
    context_frames: int
    outputs: tuple[str, ...]
    min_frames: int = 1  # the fewest frames one request may hold
    boundary_threshold: float = 0.5  # parser only
    max_boundaries: int = 0  # parser only; 0 = no limit


def frame_model_spec(config: dict) -> FrameModelSpec:
    """A per-frame model's spec from its config (a dict of Triton's JSON form); `ValueError` names
    what is missing or malformed."""
    model = config.get("name", "")
    try:
        frames = next(t for t in config.get("input", []) if t["name"] == FRAMES)
        size = int(frames["dims"][2])
        fps = float(_parameter(config, FPS_PARAMETER))
        context = int(_parameter(config, CONTEXT_FRAMES))
        extra = {"min_frames": int(_parameter(config, MIN_FRAMES) or 1)}
        if model == PARSER_MODEL:
            extra |= dict(boundary_threshold=float(_parameter(config, BOUNDARY_THRESHOLD)),
                          max_boundaries=int(_parameter(config, MAX_BOUNDARIES) or 0))
    except (StopIteration, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{model}: its config lacks the frames input or the parameters "
                         f"{FPS_PARAMETER}/{CONTEXT_FRAMES}/{BOUNDARY_THRESHOLD} ({exc}); re-export it") from None
    if not fps > 0 or context < 0:
        raise ValueError(f"{model}: fps {fps} and context_frames {context} must be > 0 and >= 0")
    outputs = tuple(t["name"] for t in config.get("output", []))
    return FrameModelSpec(model=model, frame_size=size, fps=fps, context_frames=context, outputs=outputs, **extra)


@dataclass(frozen=True)
class AdaptiveSpec:
    """How an adaptive encoder turns a compute budget into its knob: B similarity bins per clip
    (SGS) or the first ATS block's K tokens (ATS), max(ceil(budget * units), floor); each later
    ATS block takes its own K = max(ceil(budget * the tokens it receives), floor), in the graph."""

    kind: str  # "sgs" | "ats"
    units: int  # the knob at budget 1 (nothing dropped for lack of room)
    floor: int  # the smallest knob
    default: float | None = None  # the budget chosen on validation; None: none chosen
    # (still, moving): each clip runs at budget ** p by its motion (`BUDGET_POWERS`); None: at budget
    powers: tuple[float, float] | None = None

    @property
    def knob(self) -> str:
        if self.powers is None:
            return ADAPTIVE_KINDS[self.kind]
        still, moving = self.powers
        return (f"{ADAPTIVE_KINDS[self.kind]}, each clip's at budget ** p by its motion "
                f"(p {still:g} still .. {moving:g} moving; the knob is the most any clip takes)")

    def knob_for(self, budget: float) -> int:
        """The knob at `budget`; with `powers`, the most any clip takes (at the smaller power)."""
        # float32, as the model computes it from its FP32 `budget` input
        share = np.float32(budget) if self.powers is None else np.float32(budget) ** np.float32(min(self.powers))
        return max(math.ceil(share * np.float32(self.units)), self.floor)


@dataclass(frozen=True)
class EncoderSpec:
    """What the gateway needs to feed one encoder, read from its Triton model config."""

    encoder: str
    model: str
    clip_frames: int
    frame_size: int
    feature_dim: int
    max_batch_size: int
    clip_fps: float | None = None  # the frame rate it learnt motion at; None: every frame
    # GMACs of one clip without an adaptive module; None: the config does not say (old export)
    gmacs_per_clip: float | None = None
    adaptive: AdaptiveSpec | None = None  # None: a fixed-compute encoder
    # Whether it outputs DOMAIN_DISTANCE per clip: a video's score is then -mean over its clips,
    # judged against `in_domain_threshold` (see assemble.judge_domain).
    domain_scored: bool = False
    # Its own in-domain threshold. The query decoder's score and threshold were fitted to the
    # features of the plain encoder it was trained with; another encoder's features (an adaptive
    # one's, the ViT's) score differently, so it is judged by its own distances or not at all.
    in_domain_threshold: float | None = None

    def check_budget(self, budget: float) -> float:
        """`budget` if this encoder can run at it; `InvalidInput` naming the range otherwise."""
        if not (0.0 < budget <= 1.0):  # NaN fails too
            raise InvalidInput(
                f"budget {budget!r} is outside (0, 1]: the share of {self.encoder}'s full compute "
                "to spend (1 or unset = full)"
            )
        if budget < 1.0 and self.adaptive is None:
            raise InvalidInput(
                f"encoder {self.encoder} has no adaptive module (its compute is fixed): leave budget "
                f"unset or 1, or choose an adaptive encoder (DescribeModels lists them)"
            )
        return budget


@dataclass(frozen=True)
class EncodedClips:
    """An encoder's outputs for a batch of clips."""

    features: np.ndarray  # float32 [n, D]
    kept: np.ndarray | None  # int64 [n, k]: B' (k = 1) or K' per ATS block; None: not adaptive
    gmacs: np.ndarray | None  # float64 [n]: GMACs each clip cost; None: the model does not say
    # float64 [n]: each clip's DOMAIN_DISTANCE; None: the model does not output it
    domain_distance: np.ndarray | None = None

    @staticmethod
    def concatenate(parts: Sequence[EncodedClips]) -> EncodedClips:
        def joined(name: str):
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return EncodedClips(*(joined(f.name) for f in dataclasses.fields(EncodedClips)))


@dataclass(frozen=True)
class QuerySpec:
    query: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class QueryDecoderSpec:
    """The query decoder's vocabulary, read from its Triton model config."""

    model: str
    queries: tuple[QuerySpec, ...]  # in output order: logits outputs and attention rows
    # Set when the decoder also outputs IN_DOMAIN_SCORE; None: it does not score its domain.
    in_domain_threshold: float | None = None


@dataclass(frozen=True)
class DecoderOutputs:
    """The query decoder's answer for one video."""

    logits: dict[str, np.ndarray]  # query -> [A]
    attention: np.ndarray  # queries, N (rows follow the decoder's queries)
    in_domain_score: float | None  # None: the decoder does not score its domain


def _encoder_spec(model: str, config: dict) -> EncoderSpec:
    clips = next(t for t in config["input"] if t["name"] == CLIPS)
    features = next(t for t in config["output"] if t["name"] == FEATURES)
    frames, height, width, channels = (int(d) for d in clips["dims"])
    if height != width or channels != 3:
        raise ValueError(f"clips dims {clips['dims']} are not [T, S, S, 3]")
    gmacs = _parameter(config, GMACS_PER_CLIP)
    return EncoderSpec(
        encoder=model[len(ENCODER_PREFIX):],
        model=model,
        clip_frames=frames,
        frame_size=height,
        feature_dim=int(features["dims"][0]),
        max_batch_size=int(config.get("max_batch_size", 0)),
        clip_fps=float(fps) if (fps := _parameter(config, CLIP_FPS)) else None,
        gmacs_per_clip=float(gmacs) if gmacs else None,
        adaptive=_adaptive_spec(config),
        domain_scored=_declares(config, DOMAIN_DISTANCE),
        in_domain_threshold=float(raw) if (raw := _parameter(config, IN_DOMAIN_THRESHOLD)) else None,
    )


def _adaptive_spec(config: dict) -> AdaptiveSpec | None:
    kind = _parameter(config, ADAPTIVE)
    if not kind:
        return None
    if kind not in ADAPTIVE_KINDS:
        raise ValueError(f"{ADAPTIVE} {kind!r} is none of {sorted(ADAPTIVE_KINDS)}")
    inputs = {t["name"] for t in config["input"]}
    outputs = {t["name"] for t in config["output"]}
    if BUDGET not in inputs or not {KEPT, GMACS} <= outputs:
        raise ValueError(f"an adaptive encoder needs input {BUDGET} and outputs {KEPT}, {GMACS}")
    units, floor = int(_parameter(config, BUDGET_UNITS)), int(_parameter(config, BUDGET_FLOOR))
    if not 1 <= floor <= units:
        raise ValueError(f"{BUDGET_FLOOR} {floor} is outside 1..{BUDGET_UNITS} ({units})")
    default = float(raw) if (raw := _parameter(config, BUDGET_DEFAULT)) else None
    if default is not None and not 0 < default <= 1:
        raise ValueError(f"{BUDGET_DEFAULT} {default} is outside (0, 1]")
    powers = None
    if raw := _parameter(config, BUDGET_POWERS):
        try:
            powers = tuple(float(p) for p in raw.split(","))
        except ValueError:
            powers = ()
        if len(powers) != 2 or not all(p > 0 for p in powers):
            raise ValueError(f"{BUDGET_POWERS} {raw!r} is not two positive powers 'still,moving'")
    return AdaptiveSpec(kind=kind, units=units, floor=floor, default=default, powers=powers)


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def query_decoder_spec(config: dict) -> QueryDecoderSpec:
    """The vocabulary in a query decoder's config (a dict of Triton's JSON form); raises
    `ValueError` when it is missing or does not match the config's outputs."""
    model = config.get("name", QUERY_DECODER_MODEL)
    queries = _names(_parameter(config, QUERIES_PARAMETER))
    if not queries:
        raise ValueError(
            f"{model}: no {QUERIES_PARAMETER!r} parameter in its config; re-export the model"
        )
    specs = []
    for query in queries:
        attributes = _names(_parameter(config, ATTRIBUTES_PARAMETER_PREFIX + query))
        if not attributes:
            key = ATTRIBUTES_PARAMETER_PREFIX + query
            raise ValueError(f"{model}: no {key!r} parameter in its config; re-export the model")
        specs.append(QuerySpec(query, attributes))
    outputs = [t["name"] for t in config.get("output", [])]
    expected = [logits_name(q) for q in queries] + [ATTENTION]
    if outputs not in (expected, expected + [IN_DOMAIN_SCORE]):
        raise ValueError(f"{model}: outputs {outputs} do not follow its queries {list(queries)}")
    threshold = None
    if outputs[-1] == IN_DOMAIN_SCORE:
        raw = _parameter(config, IN_DOMAIN_THRESHOLD)
        try:
            threshold = float(raw)
        except ValueError:
            raise ValueError(
                f"{model}: outputs {IN_DOMAIN_SCORE} but its {IN_DOMAIN_THRESHOLD!r} parameter is "
                f"{raw!r}, not a number; re-export the model"
            ) from None
    return QueryDecoderSpec(model=model, queries=tuple(specs), in_domain_threshold=threshold)


def _parameter(config: dict, key: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", "")


def _declares(config: dict, output: str) -> bool:
    """Whether the config declares the (optional) output `output`."""
    return any(t.get("name") == output for t in config.get("output", []))


@dataclass(frozen=True)
class Readiness:
    """Triton's state as the gateway sees it: ready to serve, and which models failed to load."""

    ready: bool
    failed: dict[str, str]  # model -> its load error (Triton's repository index)


_STATUS_ERRORS: dict[str, type[VqsError]] = {
    "StatusCode.UNAVAILABLE": BackendUnavailable,
    "StatusCode.NOT_FOUND": BackendUnavailable,
    "StatusCode.DEADLINE_EXCEEDED": Timeout,
    "StatusCode.RESOURCE_EXHAUSTED": Overloaded,
}


def _translate(exc: InferenceServerException, what: str) -> VqsError:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    kind = _STATUS_ERRORS.get(status)
    if kind is None and ("is not found" in message or "not ready" in message):
        kind = BackendUnavailable
    if kind is BackendUnavailable:
        # gRPC's own words ("Connection refused", "Stream removed") do not say what is down.
        return kind(f"Triton is not ready (down, restarting or loading models); retry later. "
                    f"{what}: {message}")
    kind = kind or InferenceFailed
    return kind(f"{what}: {message}")


# tritonclient's message limits, plus a short reconnect backoff: once Triton is back (restarted),
# the gateway reaches it within a second instead of after gRPC's growing backoff (up to 2 min).
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class _Region:
    name: str  # Triton's name for it, and its POSIX shared-memory key without the slash
    size: int
    handle: shm.SharedMemoryRegion
    registered: bool = False


async def _register_shared_memory(
    client: grpcclient.InferenceServerClient, name: str, size: int, fallback: str
) -> bool:
    """Register the system shared-memory region `name` with Triton, replacing a registration it
    still has. False when Triton cannot map it (logged, with `fallback`: what happens instead);
    raises when Triton is unreachable."""
    with contextlib.suppress(InferenceServerException):
        await client.unregister_system_shared_memory(name)
    try:
        await client.register_system_shared_memory(name, "/" + name, size)
    except InferenceServerException as exc:
        error = _translate(exc, "registering shared memory")
        if isinstance(error, (BackendUnavailable, Timeout)):
            raise error from None
        logger.warning("%s: Triton cannot map this gateway's shared memory (%s)", fallback, exc.message() or exc)
        return False
    return True


class ClipRegions:
    """System shared-memory regions registered with Triton, for clip batches: a batch is copied
    once into a region and the request names it, instead of carrying the clips (which costs both
    sides a protobuf copy and parse; README, "Speed"). At most `budget_bytes` of regions, each
    sized for the first batch it carries and reused by any batch that fits; a batch that finds
    none free travels inside its request. Regions are registered on first use and again after
    Triton lost them (`forget`: a restart); a Triton that cannot map them (on another host) turns
    them off for this client."""

    def __init__(self, client: grpcclient.InferenceServerClient, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self._client = client
        self.budget_bytes = budget_bytes
        self.enabled = budget_bytes > 0
        self._all: list[_Region] = []
        self._free: list[_Region] = []
        self._prefix = f"vqs_clips_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    @property
    def allocated_bytes(self) -> int:
        return sum(r.size for r in self._all)

    @contextlib.asynccontextmanager
    async def holding(self, array: np.ndarray) -> AsyncIterator[_Region | None]:
        """A registered region holding a copy of `array` while the block runs (None: none free)."""
        region = await self._acquire(array.nbytes)
        try:
            if region is not None:
                shm.set_shared_memory_region(region.handle, [array])
            yield region
        finally:
            if region is not None:
                self._free.append(region)

    async def _acquire(self, nbytes: int) -> _Region | None:
        if not self.enabled:
            return None
        fitting = [r for r in self._free if r.size >= nbytes]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
        else:
            size = math.ceil(nbytes / 2**20) * 2**20
            if self.allocated_bytes + size > self.budget_bytes or not _shm_has_room(size):
                return None
            name = f"{self._prefix}_{len(self._all)}"
            region = _Region(name, size, shm.create_shared_memory_region(name, "/" + name, size, create_only=True))
            self._all.append(region)
        if not region.registered:
            try:
                await self._register(region)
            except BaseException:
                self._free.append(region)
                raise
            if not region.registered:  # Triton cannot map it: regions are off
                self._free.append(region)
                return None
        return region

    async def _register(self, region: _Region) -> None:
        if await _register_shared_memory(self._client, region.name, region.size, "clips go inside requests"):
            region.registered = True
        else:
            self.enabled = False

    def forget(self) -> None:
        """Triton lost its registrations (it restarted): register each region again on use."""
        for region in self._all:
            region.registered = False

    async def close(self) -> None:
        for region in self._all:
            if region.registered:
                with contextlib.suppress(Exception):
                    await self._client.unregister_system_shared_memory(region.name, client_timeout=5.0)
            with contextlib.suppress(Exception):
                shm.destroy_shared_memory_region(region.handle)
        self._all, self._free = [], []
        self.enabled = False


class SharedFrames:
    """System shared memory cut into equal slots, for frames that Triton may read in place: the
    video decoder reads each chunk of frames into a slot (`take`), and a clip batch that lies in one
    (a view of a chunk, or a batch joined into a slot) goes to the encoder by this region's name and
    an offset, without the copy into a `ClipRegions` region (README, "Speed"). A slot is free again
    once the array `take` gave and every view of it are gone, so consumers hand nothing back; when
    no slot is free, `take` gives None and the caller uses ordinary memory. `take` is thread-safe
    (the decoder's reader threads take slots; any thread may drop the last view)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.name = f"vqs_frames_{os.getpid()}_{uuid.uuid4().hex[:8]}"  # also its shared-memory key
        self.size = 0
        self.slot_bytes = 0
        self.address = 0
        self._map: _FramesMap | None = None
        # Free slots; the most recently freed is taken first (its pages are resident already).
        self._free: list[int] = []

    def prepare(self, slot_bytes: int) -> None:
        """Make the region, with slots of `slot_bytes` (the first call decides; off when the
        budget holds no slot or /dev/shm has no room for it)."""
        if self._map is not None or self.budget_bytes <= 0 or slot_bytes <= 0:
            return
        slot_bytes = math.ceil(slot_bytes / mmap.PAGESIZE) * mmap.PAGESIZE
        slots = self.budget_bytes // slot_bytes
        if slots < 1 or not _shm_has_room(slots * slot_bytes):
            self.budget_bytes = 0
            return
        path = f"/dev/shm/{self.name}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            mapped = _FramesMap(fd, slots * slot_bytes)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        mapped.frames = self
        self.address = np.frombuffer(mapped, np.uint8, 1).ctypes.data
        self.size, self.slot_bytes = slots * slot_bytes, slot_bytes
        self._free = list(range(slots))[::-1]
        self._map = mapped  # last: `take` in another thread uses the region once this is set

    def take(self, nbytes: int) -> np.ndarray | None:
        """A uint8 array of `nbytes` in a free slot, or None (no region, none free, too large)."""
        mapped = self._map
        if mapped is None or nbytes > self.slot_bytes:
            return None
        try:
            slot = self._free.pop()
        except IndexError:
            return None
        array = np.frombuffer(mapped, np.uint8, nbytes, slot * self.slot_bytes)
        weakref.finalize(array, self._free.append, slot)
        return array

    @staticmethod
    def holding(array: np.ndarray) -> tuple[SharedFrames, int] | None:
        """(the region, the offset in it) when `array` lies contiguously in a `SharedFrames` slot."""
        owner = array.base
        while isinstance(owner, np.ndarray):
            owner = owner.base
        if isinstance(owner, memoryview):  # np.frombuffer's
            owner = owner.obj
        if not isinstance(owner, _FramesMap) or not array.flags.c_contiguous:
            return None
        return owner.frames, array.ctypes.data - owner.frames.address

    def close(self) -> None:
        """Remove the region's name; the memory goes with the last array in it."""
        if self._map is not None:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{self.name}")
        self._map, self._free, self.budget_bytes = None, [], 0


class _FramesMap(mmap.mmap):
    """The mapping of a `SharedFrames` region: what every array in it has as its base."""

    frames: SharedFrames


def _shm_has_room(size: int) -> bool:
    """Whether half of /dev/shm stays free after a region of `size`, for Triton's own shared memory
    (its python-backend stubs'): a full tmpfs turns a write into a region into SIGBUS, and
    containers often get a small /dev/shm (Docker: 64 MB)."""
    try:
        fs = os.statvfs("/dev/shm")
    except OSError:
        return False
    return (fs.f_bavail * fs.f_frsize - size) * 2 >= fs.f_blocks * fs.f_frsize


def _lost_region(error: VqsError) -> bool:
    """Whether Triton refused a request because it no longer knows its shared-memory region."""
    return "shared memory" in str(error).lower()


class TritonClient:
    """Async access to the vqs models on one Triton server (`host:port`, gRPC). Clip batches
    travel in up to `shared_memory_bytes` of system shared memory (`ClipRegions`; 0: inside the
    requests)."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, shared_memory_bytes: int = 64 * 2**20):
        self.url = url
        self.timeout_s = timeout_s
        self._client = grpcclient.InferenceServerClient(url=url, channel_args=_CHANNEL_ARGS)
        self.clip_regions = ClipRegions(self._client, shared_memory_bytes)
        # `SharedFrames` regions Triton has mapped (by name); None: it cannot map this host's.
        self._frames_registered: set[str] | None = set() if shared_memory_bytes > 0 else None
        self._frames_lock = asyncio.Lock()
        self._encoders: dict[str, EncoderSpec] | None = None
        self._query_decoder: QueryDecoderSpec | None = None
        self._frame_models: dict[str, FrameModelSpec] = {}

    async def close(self) -> None:
        await self.clip_regions.close()
        for name in self._frames_registered or ():
            with contextlib.suppress(Exception):
                await self._client.unregister_system_shared_memory(name, client_timeout=5.0)
        await self._client.close()

    def forget_models(self) -> None:
        """Drop what was read from the model configs: read afresh on next use (after Triton came
        back, its models may have been re-exported, and it lost the shared-memory registrations)."""
        self._encoders = None
        self._query_decoder = None
        self._frame_models = {}
        self.clip_regions.forget()
        if self._frames_registered is not None:
            self._frames_registered.clear()

    async def _call(self, what: str, coro):
        try:
            return await coro
        except InferenceServerException as exc:
            raise _translate(exc, what) from None

    async def model_index(self) -> list[dict]:
        index = await self._call(
            "Triton repository index",
            self._client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s),
        )
        return list(index.get("models", []))

    async def readiness(self) -> Readiness:
        """The one readiness check: server live and ready and every model of the repository
        READY; a model that failed to load is named with its error."""
        try:
            if not await self._client.is_server_live(client_timeout=5.0):
                return Readiness(False, {})
            index = await self.model_index()
            server_ready = await self._client.is_server_ready(client_timeout=5.0)
        except (InferenceServerException, VqsError):
            return Readiness(False, {})
        failed = {
            m.get("name", "?"): m.get("reason", "") for m in index if m.get("state") == "UNAVAILABLE"
        }
        ready = server_ready and bool(index) and all(m.get("state") == "READY" for m in index)
        return Readiness(ready, failed)

    async def is_ready(self) -> bool:
        return (await self.readiness()).ready

    async def wait_ready(self, timeout_s: float, *, check=None, poll_s: float = 0.25) -> None:
        """Until `readiness()` is ready; `check(readiness)` may raise to stop waiting early."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            state = await self.readiness()
            if check is not None:
                check(state)
            if state.ready:
                return
            if loop.time() > deadline:
                raise BackendUnavailable(f"Triton at {self.url} not ready after {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)

    async def model_config(self, model: str) -> dict:
        response = await self._call(
            f"config of {model}",
            self._client.get_model_config(model, as_json=True, client_timeout=self.timeout_s),
        )
        return response["config"]

    async def model_metadata(self, model: str) -> dict:
        return await self._call(
            f"metadata of {model}",
            self._client.get_model_metadata(model, as_json=True, client_timeout=self.timeout_s),
        )

    async def encoders(self, *, refresh: bool = False) -> dict[str, EncoderSpec]:
        """Encoder name ("s3d") -> spec, for every READY `clip_encoder_*` model."""
        if self._encoders is not None and not refresh:
            return self._encoders
        found: dict[str, EncoderSpec] = {}
        for entry in await self.model_index():
            model = entry.get("name", "")
            if not model.startswith(ENCODER_PREFIX) or entry.get("state") != "READY":
                continue
            config = await self.model_config(model)
            try:
                spec = _encoder_spec(model, config)
            except (StopIteration, KeyError, ValueError) as exc:
                logger.warning("ignoring %s: its config does not fit the encoder contract (%s)",
                               model, exc or type(exc).__name__)
                continue
            found[spec.encoder] = spec
        self._encoders = found
        return found

    async def encoder_spec(self, encoder: str) -> EncoderSpec:
        specs = await self.encoders()
        if encoder not in specs:
            specs = await self.encoders(refresh=True)
        if encoder not in specs:
            available = ", ".join(sorted(specs)) or "none"
            raise InvalidInput(f"unknown encoder {echo(encoder)}; available: {available}")
        return specs[encoder]

    async def query_decoder(self, *, refresh: bool = False) -> QueryDecoderSpec:
        """The query decoder's vocabulary, from its Triton config (the one source of it)."""
        if self._query_decoder is not None and not refresh:
            return self._query_decoder
        config = await self.model_config(QUERY_DECODER_MODEL)
        try:
            self._query_decoder = query_decoder_spec(config)
        except ValueError as exc:
            raise InternalError(str(exc)) from None
        return self._query_decoder

    async def frame_model(self, model: str) -> FrameModelSpec | None:
        """The spec of a per-frame model (PARSER_MODEL, EMBEDDER_MODEL), or None when Triton does
        not serve it."""
        if model not in self._frame_models:
            index = {m.get("name"): m.get("state") for m in await self.model_index()}
            if index.get(model) != "READY":
                return None
            try:
                self._frame_models[model] = frame_model_spec(await self.model_config(model))
            except ValueError as exc:
                raise InternalError(str(exc)) from None
        return self._frame_models[model]

    async def run_frame_model(self, spec: FrameModelSpec, frames: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [T, S, S, 3] frames of one video (or window) -> each output without its batch
        dimension ([T, ...])."""
        expected = (spec.frame_size, spec.frame_size, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != expected or not len(frames):
            raise InternalError(f"frames must be uint8 [T>0, {', '.join(map(str, expected))}], "
                                f"got {frames.dtype} {list(frames.shape)}")
        out = await self._infer(spec.model, {FRAMES: (np.ascontiguousarray(frames)[None], "UINT8")},
                                list(spec.outputs))
        return {name: value[0] for name, value in out.items()}

    async def _infer(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], outputs: list[str]):
        infer_inputs = []
        for name, (array, dtype) in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        return await self._request(model, infer_inputs, outputs)

    async def _request(self, model: str, infer_inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        result = await self._call(
            f"inference on {model}",
            self._client.infer(
                model, infer_inputs, outputs=requested, client_timeout=self.timeout_s
            ),
        )
        return {name: result.as_numpy(name) for name in outputs}

    async def encode_clips(self, clips: np.ndarray, *, encoder: str = "s3d") -> np.ndarray:
        """uint8 [n, T, H, W, 3] -> float32 [n, D] at full compute."""
        return (await self.encode(clips, encoder=encoder)).features

    async def encode(self, clips: np.ndarray, *, encoder: str = "s3d", budget: float = 1.0) -> EncodedClips:
        """uint8 [n, T, H, W, 3] -> the encoder's features and, for an adaptive encoder, what each
        clip kept and cost at `budget` (checked by the caller: `EncoderSpec.check_budget`); splits
        above the model's max batch size."""
        spec = await self.encoder_spec(encoder)
        expected = (spec.clip_frames, spec.frame_size, spec.frame_size, 3)
        if clips.dtype != np.uint8 or clips.ndim != 5 or clips.shape[1:] != expected:
            raise InternalError(
                f"clips must be uint8 [n, {', '.join(map(str, expected))}], "
                f"got {clips.dtype} {list(clips.shape)}"
            )
        step = spec.max_batch_size or len(clips)
        parts = [
            await self._encode(spec, np.ascontiguousarray(clips[start:start + step]), budget)
            for start in range(0, len(clips), step)
        ]
        return EncodedClips.concatenate(parts)

    async def _encode(self, spec: EncoderSpec, clips: np.ndarray, budget: float) -> EncodedClips:
        """One batch of clips, in a shared-memory region if one is free, else inside the request."""
        extra: list = []
        outputs = [FEATURES]
        if spec.adaptive is not None:
            budgets = np.full((len(clips), 1), budget, dtype=np.float32)  # n, 1
            tensor = grpcclient.InferInput(BUDGET, list(budgets.shape), "FP32")
            tensor.set_data_from_numpy(budgets)
            extra, outputs = [tensor], [FEATURES, KEPT, GMACS]
        if spec.domain_scored:
            outputs.append(DOMAIN_DISTANCE)
        held = SharedFrames.holding(clips)
        if held is not None and await self._frames_mapped(held[0]):
            frames, offset = held
            encoded = await self._encode_in_region(spec, clips, extra, outputs, frames.name, offset)
            if encoded is not None:
                return encoded
            logger.info("Triton lost the frame region (restarted?): registering it again")
            if self._frames_registered is not None:
                self._frames_registered.discard(frames.name)
        async with self.clip_regions.holding(clips) as region:
            if region is not None:
                encoded = await self._encode_in_region(spec, clips, extra, outputs, region.name)
                if encoded is not None:
                    return encoded
                logger.info("Triton lost the clip regions (restarted?): registering them again")
                self.clip_regions.forget()
        tensor = grpcclient.InferInput(CLIPS, list(clips.shape), "UINT8")
        tensor.set_data_from_numpy(clips)
        return self._encoded(spec, await self._request(spec.model, [tensor, *extra], outputs))

    async def _encode_in_region(
        self, spec: EncoderSpec, clips: np.ndarray, extra: list, outputs: list[str], region: str, offset: int = 0
    ) -> EncodedClips | None:
        """The encoder's features of `clips`, which lie in the registered region `region` at
        `offset`; None when Triton no longer has the region (it restarted)."""
        tensor = grpcclient.InferInput(CLIPS, list(clips.shape), "UINT8")
        tensor.set_shared_memory(region, clips.nbytes, offset)
        try:
            return self._encoded(spec, await self._request(spec.model, [tensor, *extra], outputs))
        except VqsError as exc:
            if not _lost_region(exc):
                raise
            return None

    async def _frames_mapped(self, frames: SharedFrames) -> bool:
        """Whether Triton has `frames` registered (registering it on first use)."""
        if self._frames_registered is None:
            return False
        if frames.name in self._frames_registered:
            return True
        async with self._frames_lock:
            if self._frames_registered is None or frames.name in self._frames_registered:
                return self._frames_registered is not None
            if not await _register_shared_memory(self._client, frames.name, frames.size,
                                                 "frames are copied for Triton"):
                self._frames_registered = None
                return False
            self._frames_registered.add(frames.name)
            return True

    @staticmethod
    def _encoded(spec: EncoderSpec, out: dict[str, np.ndarray]) -> EncodedClips:
        features = out[FEATURES].astype(np.float32, copy=False)
        n = len(features)
        distance = None
        if spec.domain_scored:
            distance = out[DOMAIN_DISTANCE]
            if distance.shape != (n, 1):
                raise InferenceFailed(
                    f"{spec.model} returned {DOMAIN_DISTANCE} {list(distance.shape)} for {n} clips; "
                    f"expected [{n}, 1]"
                )
            distance = distance[:, 0].astype(np.float64)
        if spec.adaptive is None:
            gmacs = None if spec.gmacs_per_clip is None else np.full(n, spec.gmacs_per_clip)
            return EncodedClips(features, None, gmacs, distance)
        kept, gmacs = out[KEPT], out[GMACS]
        if kept.ndim != 2 or len(kept) != n or gmacs.shape != (n, 1):
            raise InferenceFailed(
                f"{spec.model} returned kept {list(kept.shape)} and gmacs {list(gmacs.shape)} "
                f"for {n} clips; expected [{n}, k] and [{n}, 1]"
            )
        return EncodedClips(
            features, kept.astype(np.int64, copy=False), gmacs[:, 0].astype(np.float64), distance)

    async def run_query_decoder(self, features: np.ndarray) -> DecoderOutputs:
        """float32 [N, D] -> the decoder's logits per query, attention [queries, N] and in-domain
        score for one video; the attention rows follow `query_decoder().queries`."""
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != FEATURE_DIM:
            raise InternalError(
                f"features must be float32 [N>0, {FEATURE_DIM}], got {list(features.shape)}"
            )
        decoder = await self.query_decoder()
        queries = [q.query for q in decoder.queries]
        scored = decoder.in_domain_threshold is not None
        batch = np.ascontiguousarray(features, dtype=np.float32)[None]  # 1, N, D
        mask = np.ones(batch.shape[:2], dtype=bool)  # 1, N
        names = [logits_name(q) for q in queries] + [ATTENTION] + ([IN_DOMAIN_SCORE] if scored else [])
        out = await self._infer(
            QUERY_DECODER_MODEL, {FEATURES: (batch, "FP32"), MASK: (mask, "BOOL")}, names
        )
        return DecoderOutputs(
            logits={q: out[logits_name(q)][0] for q in queries},
            attention=out[ATTENTION][0],
            in_domain_score=float(out[IN_DOMAIN_SCORE].reshape(-1)[0]) if scored else None,
        )
