"""The adaptive encoders as served from model_repository/ (clip_encoder_s3d_sgs, and the ViT pair
clip_encoder_vit / clip_encoder_vit_ats, one set of weights): the agreed Triton contract, one vqs
node per use with its body, and ONNX Runtime equal to the torch module they were exported from at
several budgets, in batches that mix budgets."""

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import adaptive_export as ae
from server import triton
from tests.vocabulary import model_config

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = {"clip_encoder_vit": (None, 0), "clip_encoder_vit_ats": ("AdaptiveTokenSampler", 4),
          "clip_encoder_s3d_sgs": ("SimilarityGuidedSampling", 1)}
TOLERANCE = 1e-4
MAX_ARTIFACT_BYTES = 8_000_000


def _model_dir(name: str) -> Path:
    path = REPOSITORY / name
    if not (path / "1" / "model.onnx").is_file():
        pytest.fail(f"{path} has no model.onnx: run `vqs models --part adaptive`", pytrace=False)
    return path


def _parameters(config: str) -> dict[str, str]:
    found = {}
    for line in config.splitlines():
        if line.startswith("parameters: { key: "):
            key = line.split('"')[1]
            found[key] = line.split('string_value: "')[1].split('"')[0]
    return found


@pytest.fixture(scope="module")
def loaded():
    out = {}
    for name in MODELS:
        model_dir = _model_dir(name)
        path = model_dir / "1" / "model.onnx"
        out[name] = (ae.load_served(model_dir), onnx.load(str(path)),
                     ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                     (model_dir / "config.pbtxt").read_text(), json.loads((model_dir / "1" / "model.json").read_text()))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_config_and_provenance(loaded, name):
    _, proto, session, config, meta = loaded[name]
    onnx.checker.check_model(proto, full_check=True)
    # the exporter's source stack traces (absolute paths of the exporting machine) are dropped
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in proto.graph.node for p in n.metadata_props)
    op_type, uses = MODELS[name]
    assert [n.op_type for n in proto.graph.node if n.domain == "vqs"] == [op_type] * uses
    if op_type:
        assert any((f.domain, f.name) == ("vqs", op_type) for f in proto.functions)
    adaptive = op_type is not None
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    assert inputs == (["clips", "budget"] if adaptive else ["clips"])
    # each scores its own domain: the decoder's Gaussian fits s3d's features only
    assert outputs == (["features", "kept", "gmacs"] if adaptive else ["features"]) + [ae.DOMAIN_OUTPUT]
    for tensor in [*inputs, *outputs]:
        assert f'name: "{tensor}"' in config
    assert "dynamic_batching" in config and "max_batch_size: 64" in config
    parameters = _parameters(config)
    assert float(parameters["gmacs_per_clip"]) > 0 and float(parameters["clip_fps"]) > 0
    if adaptive:
        assert parameters["adaptive"] == ("ats" if "vit" in name else "sgs")
        assert parameters["budget_units"] == ("196" if "vit" in name else "8")
        assert parameters["budget_floor"] == ("8" if "vit" in name else "1")
        assert 0 < float(parameters.get("budget_default", "1")) <= 1
    # Judged in or out of domain by its own Gaussian, fit to its own training features, and a
    # threshold chosen on its own validation scores (~1 in domain, as s3d's under the decoder's).
    assert -3 < float(parameters["in_domain_threshold"]) < 0
    gaussian = REPOSITORY / name / "1" / ae.DOMAIN_FILE
    assert meta["domain"]["sha256"] == hashlib.sha256(gaussian.read_bytes()).hexdigest()
    assert meta["domain"]["fit_clips"] > 256 and 0 < meta["domain"]["shrinkage"] <= 1
    assert (REPOSITORY / name / "1" / "model.py").resolve() == (REPOSITORY / "onnx_runner.py").resolve()
    # Trained to the served s3d's features and through the served decoder: a re-exported s3d needs
    # `python -m export.train_adaptive` again.
    served_s3d = REPOSITORY / "clip_encoder_s3d" / "1" / "model.onnx"
    assert meta["provenance"]["teacher_onnx_sha256"] == hashlib.sha256(served_s3d.read_bytes()).hexdigest()
    for artifact in (REPOSITORY / name / "1").iterdir():
        assert artifact.stat().st_size < MAX_ARTIFACT_BYTES, artifact
    if name == "clip_encoder_vit_ats":  # the plain ViT's weights, not a copy
        assert meta["weights"] == "clip_encoder_vit/1/model.pt"
        from export.train_adaptive import AdaptiveBudget

        # each clip's budget moved by its motion as the build's defaults say (`MotionBudget`), or not
        budget, motion = AdaptiveBudget(), meta.get("budget_by_motion")
        if budget.ats_still_power == budget.ats_moving_power == 1.0:
            assert motion is None and "budget_powers" not in parameters
        else:
            assert (motion["still_power"], motion["moving_power"]) == (budget.ats_still_power, budget.ats_moving_power)
            assert 0 < motion["low"] < motion["high"]
            assert parameters["budget_powers"] == f"{budget.ats_still_power:g},{budget.ats_moving_power:g}"
    if name == "clip_encoder_vit":  # what a fresh clone's build distils: the default steps from scratch, then on
        from export.train_adaptive import TEACHER_KEY, AdaptiveBudget

        s3d_weights = hashlib.sha256((REPOSITORY / "clip_encoder_s3d" / "1" / "model.pt").read_bytes()).hexdigest()
        budget = AdaptiveBudget()
        with_ats = {"ats_distill_share": budget.ats_distill_share} if budget.ats_distill_share else {}
        assert meta["student_history"] == [
            {"steps": budget.vit_steps, "from": "scratch", TEACHER_KEY: s3d_weights, **with_ats},
            *([{"steps": budget.vit_more_steps, "from": "the student above, distilled on", TEACHER_KEY: s3d_weights,
                **with_ats}] if budget.vit_more_steps else []),
            *([{"steps": budget.vit_ats_steps, "from": "the student above, distilled on with ATS",
                TEACHER_KEY: s3d_weights, "ats_distill_share": budget.vit_ats_share}] if budget.vit_ats_steps else [])]
        assert meta["provenance"]["budget"]["vit_steps"] == AdaptiveBudget().vit_steps
    if name in ("clip_encoder_vit", "clip_encoder_vit_ats"):  # built with the defaults a fresh clone's build uses
        from dataclasses import asdict

        from export.train_adaptive import ADDED_FIELDS, SGS_ONLY, AdaptiveBudget

        def vit_part(budget: dict) -> dict:
            return {k: v for k, v in {**ADDED_FIELDS, **budget}.items() if k not in SGS_ONLY}

        assert vit_part(meta["provenance"]["budget"]) == vit_part(asdict(AdaptiveBudget()))
    if name == "clip_encoder_s3d_sgs":
        from dataclasses import asdict

        from export.train_adaptive import ADDED_FIELDS, VIT_ONLY, AdaptiveBudget

        def sgs_part(budget: dict) -> dict:
            return {k: v for k, v in {**ADDED_FIELDS, **budget}.items() if k not in VIT_ONLY}

        assert sgs_part(meta["provenance"]["budget"]) == sgs_part(asdict(AdaptiveBudget()))


def _clips(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (batch, 8, 112, 112, 3)) * rng.random((batch, 8, 1, 1, 1))).astype(np.uint8)


@pytest.mark.parametrize("budgets", [(1.0,), (0.5, 0.5, 0.5), (1.0, 0.25, 0.6, 0.05), (0.15, 0.35)])
@pytest.mark.parametrize("name", ["clip_encoder_vit_ats", "clip_encoder_s3d_sgs"])
def test_adaptive_encoders_match_torch_in_mixed_batches(loaded, name, budgets):
    served, _, session, _, _ = loaded[name]
    clips = _clips(len(budgets), seed=len(budgets))
    budget = np.asarray(budgets, np.float32)[:, None]
    features, kept, gmacs, distance = session.run(None, {"clips": clips, "budget": budget})
    with torch.inference_mode():
        want = served(torch.from_numpy(clips), torch.from_numpy(budget))
    np.testing.assert_array_equal(kept, want[1].numpy())
    np.testing.assert_allclose(features, want[0].numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(gmacs, want[2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(distance, want[3].numpy(), rtol=1e-3)  # whitening magnifies the features' 1e-5
    # every clip keeps at most the knob the gateway reports for its budget (with a budget spread by
    # motion, a moving clip's)
    spec = triton._encoder_spec(name, model_config(REPOSITORY, name)).adaptive
    limit = np.asarray([spec.knob_for(b) for b in budgets])
    assert (kept <= limit[:, None]).all() and (kept >= 1).all()
    for i in range(len(budgets)):  # each clip as if alone: its batch does not change it
        alone = session.run(None, {"clips": clips[i : i + 1], "budget": budget[i : i + 1]})
        np.testing.assert_array_equal(alone[1], kept[i : i + 1])
        np.testing.assert_allclose(alone[0], features[i : i + 1], atol=TOLERANCE, rtol=0)


def test_vit_ats_at_budget_one_is_the_plain_vit_and_costs_less_below(loaded):
    _, _, plain, _, _ = loaded["clip_encoder_vit"]
    _, _, ats, config, _ = loaded["clip_encoder_vit_ats"]
    clips = _clips(3, seed=11)
    (want,) = plain.run(["features"], {"clips": clips})
    features, kept, gmacs = ats.run(["features", "kept", "gmacs"], {"clips": clips, "budget": np.ones((3, 1), np.float32)})
    np.testing.assert_allclose(features, want, atol=TOLERANCE, rtol=0)
    assert (kept == 196).all()
    full = float(_parameters(config)["gmacs_per_clip"])
    np.testing.assert_allclose(gmacs[:, 0], full, rtol=1e-5)
    (low,) = ats.run(["gmacs"], {"clips": clips, "budget": np.full((3, 1), 0.25, np.float32)})
    assert (low[:, 0] < 0.8 * full).all()
    # every ATS block samples: each one given more than the floor of 8 tokens passes on fewer
    (kept,) = ats.run(["kept"], {"clips": clips, "budget": np.full((3, 1), 0.5, np.float32)})
    received = np.concatenate([np.full((3, 1), 196), kept[:, :-1]], axis=1)
    assert (kept[received > 8] < received[received > 8]).all() and (received[:, 1:] > 8).any()
