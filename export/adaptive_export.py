"""The adaptive encoders as served: graphs that take a compute budget per clip, and their Triton
model directories (`clip_encoder_vit`, `clip_encoder_vit_ats`, `clip_encoder_s3d_sgs`).

Contract (agreed with the gateway, issue 9), batched with dynamic batching:
- input `clips` UINT8 [8, 112, 112, 3] (as every clip encoder); adaptive encoders also `budget`
  FP32 [1] per clip, so one batch may mix requests with different budgets: the graph maps each
  clip's budget (clamped to [0, 1]) to its own B (SGS) as max(⌈budget·budget_units⌉, budget_floor),
  or to each ATS block's K as max(⌈budget·the tokens the block receives⌉, budget_floor): the
  first ATS block receives all `budget_units` tokens, each later one what the one before kept;
- output `features` FP32 [256]; adaptive encoders also `kept` INT64 (SGS [1]: the bins B' the clip
  kept; ATS [blocks]: K' non-cls tokens per ATS block) and `gmacs` FP32 [1]: the clip's
  multiply-adds counted in the graph from the shapes it processed (its own B' / K'; the padding
  of a mixed batch is not counted); every one of them also `domain_distance` FP32 [1]: the
  clip's RMS whitened distance under a Gaussian fit to this encoder's own training features
  (`DomainDistance`; the decoder's Gaussian fits s3d's features only), and the config parameter
  `in_domain_threshold`: a video is in domain when minus its clips' mean distance reaches it.
- config parameters the gateway reads from Triton: `clip_fps`, `gmacs_per_clip` (the same encoder
  without its adaptive module: the constant cost of a plain encoder, the denominator of an
  adaptive one's kept ratio), and for adaptive ones `adaptive` ("sgs" | "ats"), `budget_units`,
  `budget_floor` and `budget_default` (the budget chosen on validation); `clip_encoder_vit_ats`
  also `budget_powers` "still,moving" when it spreads a request's budget over its clips by their
  motion (`MotionBudget`): each clip's budget is first raised to its own power.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export import onnx_export, train
from export.adaptive import onnx_functions
from export.models import s3d_zoom_sgs, tqn
from export.models.s3d_sgs import S3DSGS
from export.models.s3d_zoom_sgs import S3DZoomSGS
from export.models.vit import K_FLOOR, MotionBudget, VideoViT, VideoViTZoom

ENCODER_INPUT = "clips"
BUDGET_INPUT = "budget"
FEATURES_OUTPUT = "features"
KEPT_OUTPUT = "kept"
GMACS_OUTPUT = "gmacs"
DOMAIN_OUTPUT = "domain_distance"
DOMAIN_FILE = "domain.pt"

CLIP_FPS_PARAMETER = "clip_fps"
GMACS_PER_CLIP_PARAMETER = "gmacs_per_clip"
ADAPTIVE_PARAMETER = "adaptive"
BUDGET_UNITS_PARAMETER = "budget_units"
BUDGET_FLOOR_PARAMETER = "budget_floor"
BUDGET_DEFAULT_PARAMETER = "budget_default"
BUDGET_POWERS_PARAMETER = "budget_powers"

MAX_BATCH = 64


def budget_to_units(budget: torch.Tensor, full: int, floor: int) -> torch.Tensor:
    """(N, 1) budgets -> (N, 1) int64 units max(⌈budget·full⌉, floor), at most `full`."""
    return torch.ceil(budget.clamp(0.0, 1.0) * full).clamp(min=floor, max=full).to(torch.int64)


class ServedViT(nn.Module):
    """The plain ViT: clips -> features."""

    def __init__(self, vit: VideoViT):
        super().__init__()
        self.vit = vit

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_served(clips)


class ServedViTATS(nn.Module):
    """The same ViT with ATS in its ATS blocks, each block's K from each clip's budget: the request's,
    or with `motion` the request's spread over the clips by how much each moves."""

    def __init__(self, vit: VideoViT, motion: MotionBudget | None = None):
        super().__init__()
        self.vit, self.motion = vit, motion

    def forward(self, clips: torch.Tensor, budget: torch.Tensor):
        budget = budget.clamp(0.0, 1.0).reshape(-1)
        if self.motion is not None:
            budget = self.motion(clips, budget)
        features, kept = self.vit.forward_served(clips, budget)  # kept: per ATS block, cls included
        gmacs = (self.vit.macs(kept).to(torch.float32) / 1e9).unsqueeze(1)
        return features, kept - 1, gmacs


class ServedS3DSGS(nn.Module):
    """The s3d (plain or s3d_zoom) with SGS, B from each clip's budget; GMACs looked up by the B' the
    clip kept from a table counted on the shapes each B' processes (`S3DSGS.macs`, `S3DZoomSGS.macs`:
    both streams)."""

    def __init__(self, model: S3DSGS | S3DZoomSGS):
        super().__init__()
        self.model = model
        table = [model.macs(b) / 1e9 for b in range(1, model.clip_frames + 1)]
        self.register_buffer("gmacs_by_bins", torch.tensor(table, dtype=torch.float32))

    def forward(self, clips: torch.Tensor, budget: torch.Tensor):
        bins = budget_to_units(budget, self.model.clip_frames, 1).reshape(-1)
        features, kept = self.model.forward_served(clips, bins)
        return features, kept.unsqueeze(1), self.gmacs_by_bins[kept - 1].unsqueeze(1)


class DomainDistance(nn.Module):
    """An encoder's own in-domain Gaussian: (N, D) features -> (N, 1) `tqn.domain_distance`."""

    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("whiten", whiten.float())

    @classmethod
    def fit(cls, features: torch.Tensor, shrinkage: float) -> DomainDistance:
        return cls(*tqn.whitening(features, shrinkage))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return tqn.domain_distance(features, self.mean, self.whiten).unsqueeze(1)


class WithDomain(nn.Module):
    """A served encoder whose outputs end with each clip's `DomainDistance`."""

    def __init__(self, served: nn.Module, domain: DomainDistance):
        super().__init__()
        self.served = served
        self.domain = domain

    def forward(self, clips: torch.Tensor, budget: torch.Tensor | None = None):
        out = self.served(clips) if budget is None else self.served(clips, budget)
        out = out if isinstance(out, tuple) else (out,)
        return (*out, self.domain(out[0]))


def vit_parameters(vit: VideoViT, *, ats: bool, clip_fps: float, budget_default: float | None,
                   motion: MotionBudget | None = None) -> dict[str, str]:
    parameters = {CLIP_FPS_PARAMETER: f"{clip_fps:g}", GMACS_PER_CLIP_PARAMETER: f"{vit.macs() / 1e9:.6g}"}
    if ats:
        parameters |= {ADAPTIVE_PARAMETER: "ats", BUDGET_UNITS_PARAMETER: str(vit.tokens),
                       BUDGET_FLOOR_PARAMETER: str(K_FLOOR)}
        if motion is not None:
            parameters[BUDGET_POWERS_PARAMETER] = f"{motion.still_power:g},{motion.moving_power:g}"
        if budget_default is not None:
            parameters[BUDGET_DEFAULT_PARAMETER] = f"{budget_default:g}"
    return parameters


def sgs_parameters(model: S3DSGS | S3DZoomSGS, plain_macs: int, *, clip_fps: float, budget_default: float | None) -> dict[str, str]:
    parameters = {CLIP_FPS_PARAMETER: f"{clip_fps:g}", GMACS_PER_CLIP_PARAMETER: f"{plain_macs / 1e9:.6g}",
                  ADAPTIVE_PARAMETER: "sgs", BUDGET_UNITS_PARAMETER: str(model.clip_frames),
                  BUDGET_FLOOR_PARAMETER: "1"}
    if budget_default is not None:
        parameters[BUDGET_DEFAULT_PARAMETER] = f"{budget_default:g}"
    return parameters


def _dims(shape) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def config_text(name: str, *, kept_dims: int | None, domain: bool, parameters: Mapping[str, str], frames: int,
                size: int) -> str:
    """config.pbtxt of a served clip encoder (kept_dims None: a plain encoder without budget;
    `domain`: it outputs `domain_distance`), without the `clip_fps` / `gmacs_per_clip` parameters
    (`write_metadata` adds them)."""
    clip_dims = _dims([frames, size, size, 3])
    inputs = [f'  {{\n    name: "{ENCODER_INPUT}"\n    data_type: TYPE_UINT8\n    dims: {clip_dims}\n  }}']
    outputs = [f'  {{\n    name: "{FEATURES_OUTPUT}"\n    data_type: TYPE_FP32\n    dims: [ 256 ]\n  }}']
    warmup_inputs = [f'      key: "{ENCODER_INPUT}"\n      value {{ data_type: TYPE_UINT8 dims: {clip_dims} zero_data: true }}']
    if kept_dims is not None:
        inputs.append(f'  {{\n    name: "{BUDGET_INPUT}"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n  }}')
        outputs.append(f'  {{\n    name: "{KEPT_OUTPUT}"\n    data_type: TYPE_INT64\n    dims: [ {kept_dims} ]\n  }}')
        outputs.append(f'  {{\n    name: "{GMACS_OUTPUT}"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n  }}')
        warmup_inputs.append(f'      key: "{BUDGET_INPUT}"\n      value {{ data_type: TYPE_FP32 dims: [ 1 ] zero_data: true }}')
    if domain:
        outputs.append(f'  {{\n    name: "{DOMAIN_OUTPUT}"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n  }}')
    lines = [
        "# Written by export/adaptive_export.py; re-export to change (see its docstring for the contract).",
        "# Runs model.onnx with ONNX Runtime inside the python backend (see onnx_runner.py); the vqs ops'",
        "# function bodies are inlined by ONNX Runtime.",
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {MAX_BATCH}",
        "",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
        "",
        "dynamic_batching {\n  preferred_batch_size: [ 16, 32, 64 ]\n  max_queue_delay_microseconds: 2000\n}",
        "",
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]",
        "",
        # One intra-op thread, as clip_encoder_s3d (README "Speed"): the encoders' speeds compare like-for-like.
        'parameters: { key: "intra_op_threads" value: { string_value: "1" } }',
        # clip_fps and gmacs_per_clip: written after, by export/onnx_export.py's writer (one format).
        *[f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items()
          if k not in (CLIP_FPS_PARAMETER, GMACS_PER_CLIP_PARAMETER)],
        "",
        "# Pay ONNX Runtime's first-run cost at load time, not on the first request.",
        "model_warmup [\n  {\n    name: \"zeros_16\"\n    batch_size: 16\n"
        + "".join(f"    inputs {{\n{w}\n    }}\n" for w in warmup_inputs)
        + "  }\n]",
    ]
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_served(
    served: nn.Module,
    encoder: nn.Module,
    model_dir: Path,
    *,
    adaptive: bool,
    kept_dims: int | None,
    parameters: Mapping[str, str],
    meta: Mapping,
    weights: Path | None = None,
    domain: DomainDistance | None = None,
) -> Path:
    """Write `model_dir`/{config.pbtxt, 1/model.onnx, 1/model.json, 1/model.py -> onnx_runner.py};
    the torch weights go to `1/model.pt` unless `weights` names the file that already holds them;
    with `domain`, the graph also outputs `domain_distance` and the Gaussian goes to `1/domain.pt`."""
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    served = served if domain is None else WithDomain(served, domain)
    served.eval()
    frames, size = encoder.clip_frames, encoder.frame_size
    clips = torch.randint(0, 256, (2, frames, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1024)
    path = version / "model.onnx"
    if adaptive:
        args = (clips, torch.tensor([[1.0], [0.5]]))
        names_in, names_out = [ENCODER_INPUT, BUDGET_INPUT], [FEATURES_OUTPUT, KEPT_OUTPUT, GMACS_OUTPUT]
        dynamic = {"clips": {0: batch}, "budget": {0: batch}}
    else:
        args = (clips,)
        names_in, names_out = [ENCODER_INPUT], [FEATURES_OUTPUT]
        dynamic = {"clips": {0: batch}}
    if domain is not None:
        names_out.append(DOMAIN_OUTPUT)
    proto = onnx_functions.export(served, args, path, input_names=names_in, output_names=names_out,
                                  dynamic_shapes=dynamic)
    onnx.checker.check_model(proto, full_check=True)
    if weights is None:
        weights = version / "model.pt"
        torch.save(encoder.state_dict(), weights)
    (version / DOMAIN_FILE).unlink(missing_ok=True)
    if domain is not None:
        torch.save(domain.state_dict(), version / DOMAIN_FILE)
    runner = version / "model.py"
    if not runner.is_symlink():
        runner.unlink(missing_ok=True)
        os.symlink("../../onnx_runner.py", runner)
    info = {
        "name": model_dir.name,
        **meta,
        "kept_dims": kept_dims,
        "clip_frames": frames,
        "frame_size": size,
        "feature_dim": encoder.feature_dim,
        "parameters": dict(parameters),
        "weights": os.path.relpath(weights, model_dir.parent),
        "weights_sha256": _sha256(weights),
        "onnx_sha256": _sha256(path),
        "domain": None if domain is None else {**meta.get("domain", {}), "sha256": _sha256(version / DOMAIN_FILE)},
    }
    write_metadata(model_dir, info)
    return path


def export_with_domain(model_dir: Path, domain: DomainDistance, about: Mapping) -> Path:
    """Re-export an exported encoder's model directory in place, its graph now also outputting
    `domain_distance` under `domain` (`about`: how it was fit, kept in model.json)."""
    info = json.loads((model_dir / "1" / "model.json").read_text())
    served = load_served(model_dir, domain=False)
    encoder = served.vit if isinstance(served, (ServedViT, ServedViTATS)) else served.model
    return export_served(served, encoder, model_dir, adaptive=info["kept_dims"] is not None,
                         kept_dims=info["kept_dims"], parameters=info["parameters"], meta={**info, "domain": dict(about)},
                         weights=model_dir.parent / info["weights"], domain=domain)


def _tensor_tables(kept_dims: int | None, domain: bool, frames: int, size: int, feature_dim: int) -> tuple[dict, dict]:
    inputs = {ENCODER_INPUT: {"dtype": "uint8", "shape": ["batch", frames, size, size, 3]}}
    outputs = {FEATURES_OUTPUT: {"dtype": "float32", "shape": ["batch", feature_dim]}}
    if kept_dims is not None:
        inputs[BUDGET_INPUT] = {"dtype": "float32", "shape": ["batch", 1]}
        outputs[KEPT_OUTPUT] = {"dtype": "int64", "shape": ["batch", kept_dims]}
        outputs[GMACS_OUTPUT] = {"dtype": "float32", "shape": ["batch", 1]}
    if domain:
        outputs[DOMAIN_OUTPUT] = {"dtype": "float32", "shape": ["batch", 1]}
    return inputs, outputs


def write_metadata(model_dir: Path, info: dict) -> None:
    """config.pbtxt and 1/model.json of an exported model directory from its `info` (model.json's
    content): the tensor tables as export/onnx_export.py writes them for every encoder, and
    `clip_fps` / `gmacs_per_clip` written by its writer."""
    info = dict(info)
    info["clip_fps"] = float(info["parameters"][CLIP_FPS_PARAMETER])
    info.setdefault("feature_dim", 256)
    domain = bool(info.get("domain"))
    info["inputs"], info["outputs"] = _tensor_tables(info["kept_dims"], domain, info["clip_frames"],
                                                     info["frame_size"], info["feature_dim"])
    config = model_dir / "config.pbtxt"
    config.write_text(config_text(model_dir.name, kept_dims=info["kept_dims"], domain=domain,
                                  parameters=info["parameters"], frames=info["clip_frames"], size=info["frame_size"]))
    onnx_export.write_config_parameters(config, onnx_export.encoder_parameters(
        info["clip_fps"], float(info["parameters"][GMACS_PER_CLIP_PARAMETER])))
    (model_dir / "1" / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def set_parameters(model_dir: Path, parameters: Mapping[str, str]) -> None:
    """Add or change config parameters of an exported model directory (config.pbtxt and model.json)."""
    info = json.loads((model_dir / "1" / "model.json").read_text())
    info["parameters"] = {**info["parameters"], **parameters}
    write_metadata(model_dir, info)


def install(staged: Path, repository: Path) -> list[str]:
    """Move every model directory of `staged` into `repository`, each replacing its namesake whole
    (a running Triton or test never sees a half-written model directory)."""
    moved = []
    for model_dir in sorted(p for p in staged.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        target = repository / model_dir.name
        old = staged / f".old-{model_dir.name}"
        if target.exists():
            os.replace(target, old)
        os.replace(model_dir, target)
        shutil.rmtree(old, ignore_errors=True)
        moved.append(model_dir.name)
    return moved


def load_served(model_dir: Path, *, domain: bool = True) -> nn.Module:
    """The torch module a model directory was exported from (its model.json's `encoder`, `config`
    and `weights`, and with `domain` its Gaussian when it has one: `WithDomain`), in eval mode."""
    meta = json.loads((model_dir / "1" / "model.json").read_text())
    state = torch.load(model_dir.parent / meta["weights"], weights_only=True)
    if meta["encoder"] in ("vit", "vit_ats"):
        if meta.get("finder") is not None:  # a zoom ViT: its finder's layers are in its own weights
            vit = VideoViTZoom(train.encoder_from_config(meta["finder"]), **meta["config"])
        else:
            vit = VideoViT(**meta["config"])
        vit.load_state_dict(state)
        if meta["encoder"] == "vit":
            served = ServedViT(vit)
        else:
            motion = meta.get("budget_by_motion")
            served = ServedViTATS(vit, MotionBudget(**motion) if motion else None)
    elif meta["encoder"] == "s3d_sgs":
        model = s3d_zoom_sgs.from_config(meta["config"])
        model.load_state_dict(state)
        served = ServedS3DSGS(model.eval())
    else:
        raise ValueError(f"{model_dir}: unknown encoder {meta['encoder']!r}")
    if domain and meta.get("domain"):
        gaussian = torch.load(model_dir / "1" / DOMAIN_FILE, weights_only=True)
        served = WithDomain(served, DomainDistance(gaussian["mean"], gaussian["whiten"]))
    return served.eval()


def parity(served: nn.Module, path: Path, budgets: list[float], *, seed: int = 0, batch: int = 4) -> float:
    """Largest |torch − ONNX Runtime| over features (and equal kept counts) at `budgets`, each
    batch mixing the budgets' neighbours; raises if the kept counts differ."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    rng = np.random.default_rng(seed)
    worst = 0.0
    for b in budgets:
        clips = rng.integers(0, 256, (batch, 8, 112, 112, 3), dtype=np.uint8)
        feed = {ENCODER_INPUT: clips}
        if BUDGET_INPUT in names:
            feed[BUDGET_INPUT] = np.asarray([[b]] + [[rng.uniform(0.05, 1.0)] for _ in range(batch - 1)], np.float32)
        got = session.run(None, feed)
        with torch.inference_mode():
            want = served.eval()(*(torch.from_numpy(v) for v in feed.values()))
        want = want if isinstance(want, tuple) else (want,)
        worst = max(worst, float(np.abs(got[0] - want[0].numpy()).max()))
        for g, w in zip(got[1:], want[1:]):
            if g.dtype == np.int64 and not np.array_equal(g, w.numpy()):
                raise AssertionError(f"{path}: kept counts differ from torch at budget {b}")
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5)
    return worst
