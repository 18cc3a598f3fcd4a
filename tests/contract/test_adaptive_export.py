"""The adaptive ops export as one `vqs` node per use with an attached body of standard ONNX ops,
pass the full ONNX checker, and ONNX Runtime (which inlines the body) matches torch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.adaptive import onnx_functions
from export.adaptive.ats import adaptive_token_sampler
from export.adaptive.sgs import SimilarityGuidedSampling, similarity_guided_sampling
from export.models.vit import K_FLOOR

TOLERANCE = 1e-4


class _SgsOnly(torch.nn.Module):
    """The bare op, so the test controls the similarity vectors (and hence B')."""

    def forward(self, features, z, bins):
        return similarity_guided_sampling(features, z, bins)


class _SgsStage(torch.nn.Module):
    """SGS with its similarity net, then a temporal conv over the B' kept bins and masked pooling."""

    def __init__(self, channels=8):
        super().__init__()
        self.sgs = SimilarityGuidedSampling(channels)
        self.conv = torch.nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, features, bins):
        sampled, mask = self.sgs(features, bins)
        pooled = (self.conv(sampled).mean(dim=(3, 4)) * mask[:, None]).sum(dim=2) / mask.sum(dim=1, keepdim=True)
        return pooled, mask


class _AtsBlock(torch.nn.Module):
    """A pre-norm transformer block with ATS in its attention (masked keys for padded tokens)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, mask, k):
        n, t, d = x.shape
        q, key, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ key.transpose(-1, -2)) * (d // self.heads) ** -0.5
        attn = attn.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        attended, residual, kept, index = adaptive_token_sampler(x, attn, v, mask, k)
        y = residual + self.proj(attended)
        return y + self.ffn(self.norm2(y)), kept, index


def _export(model, args, path, input_names, output_names, dynamic_shapes):
    return onnx_functions.export(
        model.eval(), args, path, input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("adaptive")
    batch = torch.export.Dim("batch", min=1, max=64)
    models = {
        "sgs": _SgsOnly(),
        "sgs_stage": _SgsStage(),
        "ats": _AtsBlock(),
        "sgs_per_clip": _SgsOnly(),
        "ats_per_sample": _AtsBlock(),
    }
    specs = {
        "sgs": ((torch.randn(2, 8, 8, 3, 3), torch.randn(2, 8, 4), torch.tensor(8)), ["features", "z", "bins"],
                ["sampled", "mask"], {"features": {0: batch}, "z": {0: batch}, "bins": None}),
        "sgs_stage": ((torch.randn(2, 8, 8, 3, 3), torch.tensor(8)), ["features", "bins"], ["pooled", "mask"],
                      {"features": {0: batch}, "bins": None}),
        "ats": ((torch.randn(2, 17, 32), torch.ones(2, 17, dtype=torch.bool), torch.tensor(8)), ["x", "mask", "k"],
                ["y", "kept", "index"], {"x": {0: batch}, "mask": {0: batch}, "k": None}),
        # One B / K per sample: how a served batch mixes requests with different budgets.
        "sgs_per_clip": ((torch.randn(2, 8, 8, 3, 3), torch.randn(2, 8, 4), torch.tensor([8, 3])),
                         ["features", "z", "bins"], ["sampled", "mask"],
                         {"features": {0: batch}, "z": {0: batch}, "bins": {0: batch}}),
        "ats_per_sample": ((torch.randn(2, 17, 32), torch.ones(2, 17, dtype=torch.bool), torch.tensor([8, 3])),
                           ["x", "mask", "k"], ["y", "kept", "index"],
                           {"x": {0: batch}, "mask": {0: batch}, "k": {0: batch}}),
    }
    result = {}
    for name, model in models.items():
        args, inputs, outputs, dynamic = specs[name]
        path = out / f"{name}.onnx"
        _export(model, args, path, inputs, outputs, dynamic)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        result[name] = (model, onnx.load(str(path)), session)
    return result


@pytest.mark.parametrize(
    ("name", "op_type"),
    [("sgs", "SimilarityGuidedSampling"), ("sgs_stage", "SimilarityGuidedSampling"), ("ats", "AdaptiveTokenSampler")],
)
def test_each_use_is_one_vqs_node_with_a_standard_body(exported, name, op_type):
    _, proto, _ = exported[name]
    custom = [n for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    assert [(n.domain, n.op_type) for n in custom] == [("vqs", op_type)]
    (function,) = [f for f in proto.functions if (f.domain, f.name) == ("vqs", op_type)]
    assert {n.domain for n in function.node} <= {"", "ai.onnx"} and len(function.node) > 10
    assert ("vqs", 1) in {(o.domain, o.version) for o in proto.opset_import}
    onnx.checker.check_model(proto, full_check=True)


def _similarity(batch: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Similarity vectors whose magnitudes spread over a clip-dependent number of levels."""
    z = rng.standard_normal((batch, frames, 4)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    levels = rng.integers(1, frames + 1, size=(batch, 1))
    magnitude = 1 + rng.integers(0, levels, size=(batch, frames)) + 0.05 * rng.random((batch, frames))
    return (z * magnitude[..., None]).astype(np.float32)


@pytest.mark.parametrize("bins", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("batch", [1, 4])
def test_sgs_matches_torch(exported, bins, batch):
    model, _, session = exported["sgs"]
    rng = np.random.default_rng(bins * 10 + batch)
    features = rng.standard_normal((batch, 8, 8, 3, 3)).astype(np.float32)
    z = _similarity(batch, 8, rng)
    sampled, mask = model(torch.from_numpy(features), torch.from_numpy(z), torch.tensor(bins))
    got_sampled, got_mask = session.run(None, {"features": features, "z": z, "bins": np.array(bins)})
    np.testing.assert_array_equal(got_mask, mask.numpy())
    np.testing.assert_allclose(got_sampled, sampled.numpy(), atol=TOLERANCE, rtol=0)
    assert mask.shape[1] <= min(bins, 8)


def test_sgs_keeps_fewer_bins_than_asked_and_varies_per_clip(exported):
    model, _, session = exported["sgs"]
    rng = np.random.default_rng(7)
    z = _similarity(16, 8, rng)
    _, mask = session.run(None, {"features": rng.standard_normal((16, 8, 8, 3, 3)).astype(np.float32), "z": z,
                                 "bins": np.array(8)})
    kept = mask.sum(axis=1)
    assert kept.min() < 8 and len(set(kept.tolist())) > 2 and (~mask).any()


@pytest.mark.parametrize("bins", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 3])
def test_sgs_stage_matches_torch(exported, bins, batch):
    model, _, session = exported["sgs_stage"]
    features = torch.randn(batch, 8, 8, 3, 3, generator=torch.Generator().manual_seed(bins + batch))
    with torch.no_grad():
        pooled, mask = model(features, torch.tensor(bins))
    got_pooled, got_mask = session.run(None, {"features": features.numpy(), "bins": np.array(bins)})
    np.testing.assert_array_equal(got_mask, mask.numpy())
    np.testing.assert_allclose(got_pooled, pooled.numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 8, 15, 16, 40])
@pytest.mark.parametrize("batch", [1, 4])
def test_ats_matches_torch(exported, k, batch):
    model, _, session = exported["ats"]
    generator = torch.Generator().manual_seed(k * 10 + batch)
    x = 3 * torch.randn(batch, 17, 32, generator=generator)
    mask = torch.ones(batch, 17, dtype=torch.bool)
    if batch > 1:
        mask[1, 9:] = False  # padding left by an earlier ATS block
    with torch.no_grad():
        y, kept, index = model(x, mask, torch.tensor(k))
    got_y, got_kept, got_index = session.run(None, {"x": x.numpy(), "mask": mask.numpy(), "k": np.array(k)})
    np.testing.assert_array_equal(got_kept, kept.numpy())
    np.testing.assert_array_equal(got_index, index.numpy())
    np.testing.assert_allclose(got_y, y.numpy(), atol=TOLERANCE, rtol=0)
    if k < 16:
        assert kept.shape[1] <= k + 1
    else:
        assert kept.shape[1] == 17


@pytest.mark.parametrize("bins", [(8, 1, 3, 5), (2, 2, 16, 4), (1, 1, 1, 1)])
def test_sgs_with_one_b_per_clip_matches_torch_and_each_clip_alone(exported, bins):
    model, _, session = exported["sgs_per_clip"]
    rng = np.random.default_rng(sum(bins))
    features = rng.standard_normal((4, 8, 8, 3, 3)).astype(np.float32)
    z = _similarity(4, 8, rng)
    sampled, mask = model(torch.from_numpy(features), torch.from_numpy(z), torch.tensor(bins))
    got_sampled, got_mask = session.run(None, {"features": features, "z": z, "bins": np.array(bins)})
    np.testing.assert_array_equal(got_mask, mask.numpy())
    np.testing.assert_allclose(got_sampled, sampled.numpy(), atol=TOLERANCE, rtol=0)
    for i, b in enumerate(bins):
        alone, alone_mask = model(torch.from_numpy(features[i : i + 1]), torch.from_numpy(z[i : i + 1]),
                                  torch.tensor(b))
        assert int(mask[i].sum()) == int(alone_mask.sum()) <= b
        torch.testing.assert_close(sampled[i : i + 1, :, : alone.shape[2]], alone)


@pytest.mark.parametrize("k", [(8, 1, 3, 40), (16, 16, 2, 5), (2, 2, 2, 2)])
def test_ats_with_one_k_per_sample_matches_torch_and_each_sample_alone(exported, k):
    model, _, session = exported["ats_per_sample"]
    x = 3 * torch.randn(4, 17, 32, generator=torch.Generator().manual_seed(sum(k)))
    mask = torch.ones(4, 17, dtype=torch.bool)
    mask[1, 9:] = False
    with torch.no_grad():
        y, kept, index = model(x, mask, torch.tensor(k))
        got_y, got_kept, got_index = session.run(None, {"x": x.numpy(), "mask": mask.numpy(), "k": np.array(k)})
        np.testing.assert_array_equal(got_kept, kept.numpy())
        np.testing.assert_array_equal(got_index, index.numpy())
        np.testing.assert_allclose(got_y, y.numpy(), atol=TOLERANCE, rtol=0)
        for i, ki in enumerate(k):
            alone_y, alone_kept, _ = model(x[i : i + 1], mask[i : i + 1], torch.tensor(ki))
            m = alone_kept.shape[1]
            assert int(kept[i].sum()) == int(alone_kept.sum()) <= ki + 1
            torch.testing.assert_close(y[i : i + 1, :m][alone_kept], alone_y[alone_kept], atol=1e-5, rtol=0)


def test_ats_keeps_fewer_tokens_than_asked(exported):
    _, _, session = exported["ats"]
    x = 3 * torch.randn(8, 17, 32, generator=torch.Generator().manual_seed(5))
    _, kept, _ = session.run(None, {"x": x.numpy(), "mask": np.ones((8, 17), dtype=bool), "k": np.array(12)})
    per_sample = kept.sum(axis=1) - 1
    assert per_sample.max() <= 12 and per_sample.min() < 12 and (~kept).any()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Small ViT with ATS in 3 blocks and the s3d with SGS after its stem (the thesis's sums, and the
    time-ordered means of a centred similarity net), and the two-stream s3d_zoom with one SGS after
    both stems (time-ordered means; a centred similarity net, and the served motion net), exported
    for serving."""
    from export import train
    from export.models import s3d_zoom_sgs
    from export.models.s3d_sgs import create as create_s3d_sgs
    from export.models.vit import VideoViT

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoders")
    batch = torch.export.Dim("batch", min=1, max=64)
    clips = torch.randint(0, 255, (2, 8, 64, 64, 3), dtype=torch.uint8)
    vit = VideoViT(dim=32, depth=4, heads=2, frame_size=64, ats_blocks=(1, 2, 3)).eval()
    sgs = create_s3d_sgs("s3d_sgs_stem_112", frame_size=64).eval()
    means = create_s3d_sgs("s3d_sgs_patchify_112", frame_size=64, bins="time_means", similarity_centred=True).eval()
    zoom = s3d_zoom_sgs.create(train.SERVED_ENCODER, frame_size=64, window_size=64, bins="time_means",
                               similarity_centred=True).eval()
    motion = s3d_zoom_sgs.create(train.SERVED_ENCODER, frame_size=64, window_size=64, bins="time_means",
                                 similarity="motion").eval()
    with torch.no_grad():  # sharper attention and a similarity net that tells frames apart, as after training
        for block in vit.blocks:
            block.attn.qkv.weight[:32].mul_(8)
        for model in (sgs, means, zoom):
            model.sgs.similarity.conv1.bias.zero_()
            model.sgs.similarity.conv2.bias.zero_()
    # as served: one budget per clip, each ATS block's K relative to the tokens it receives
    _export(vit, (clips, torch.tensor([[1.0], [0.5]])), out / "vit_ats.onnx", ["clips", "budget"],
            ["features", "tokens_kept"], {"clips": {0: batch}, "budget": {0: batch}})
    for name, model in (("s3d_sgs", sgs), ("s3d_sgs_time_means", means), ("s3d_zoom_sgs", zoom),
                        ("s3d_zoom_sgs_motion", motion)):
        _export(model, (clips, torch.tensor(8)), out / f"{name}.onnx", ["clips", "bins"], ["features", "bins_kept"],
                {"clips": {0: batch}, "bins": None})
    return {name: (model, onnx.load(str(out / f"{name}.onnx")),
                   ort.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"]))
            for name, model in (("vit_ats", vit), ("s3d_sgs", sgs), ("s3d_sgs_time_means", means),
                                ("s3d_zoom_sgs", zoom), ("s3d_zoom_sgs_motion", motion))}


def _video(batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (batch, 8, 64, 64, 3))
    return (noise * rng.random((batch, 8, 1, 1, 1))).astype(np.uint8)


def test_encoders_keep_one_node_per_use(encoders):
    for name, op_type, uses in (("vit_ats", "AdaptiveTokenSampler", 3), ("s3d_sgs", "SimilarityGuidedSampling", 1),
                                ("s3d_sgs_time_means", "SimilarityGuidedSampling", 1),
                                ("s3d_zoom_sgs", "SimilarityGuidedSampling", 1),
                                ("s3d_zoom_sgs_motion", "SimilarityGuidedSampling", 1)):
        _, proto, _ = encoders[name]
        custom = [n.op_type for n in proto.graph.node if n.domain == "vqs"]
        assert custom == [op_type] * uses
        onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("budgets", [(1.0,), (0.5,), (0.2,), (1.0, 0.7, 0.35, 0.05)])
def test_vit_ats_matches_torch(encoders, budgets):
    model, _, session = encoders["vit_ats"]
    clips = _video(len(budgets), seed=int(100 * sum(budgets)))
    budget = np.asarray(budgets, np.float32)[:, None]
    with torch.no_grad():
        features, kept = model(torch.from_numpy(clips), torch.from_numpy(budget))
    got_features, got_kept = session.run(None, {"clips": clips, "budget": budget})
    np.testing.assert_array_equal(got_kept, kept.numpy())
    np.testing.assert_allclose(got_features, features.numpy(), atol=TOLERANCE, rtol=0)
    # below budget 1 every ATS block receiving more than K_FLOOR tokens samples (fewer leave it than
    # enter it), not only the first; at 1 none does
    received = np.concatenate([np.full((len(budgets), 1), model.tokens + 1), got_kept[:, :-1]], axis=1)
    below = np.asarray(budgets) < 1
    sampling = below[:, None] & (received - 1 > K_FLOOR)
    assert (got_kept[sampling] < received[sampling]).all() and (got_kept[~below] == model.tokens + 1).all()
    if (np.asarray(budgets) >= 0.5).any() and below.any():
        assert sampling[:, 1:].any()


@pytest.mark.parametrize("name", ["s3d_sgs", "s3d_sgs_time_means", "s3d_zoom_sgs", "s3d_zoom_sgs_motion"])
@pytest.mark.parametrize("bins", [8, 4, 2, 1])
@pytest.mark.parametrize("batch", [1, 4])
def test_s3d_sgs_matches_torch(encoders, bins, batch, name):
    model, _, session = encoders[name]
    clips = _video(batch, seed=bins + batch)
    with torch.no_grad():
        features, kept = model(torch.from_numpy(clips), torch.tensor(bins))
    got_features, got_kept = session.run(None, {"clips": clips, "bins": np.array(bins)})
    np.testing.assert_array_equal(got_kept, kept.numpy())
    assert kept.max() <= bins
    # Features are small at init: compare relative to their spread across clips too.
    np.testing.assert_allclose(got_features, features.numpy(), atol=TOLERANCE * float(features.abs().max()), rtol=0)


def test_served_zoom_sgs_exports_one_node_its_compute_table_and_matches_torch(tmp_path):
    """The served s3d_sgs of an s3d_zoom encoder as `vqs models --part adaptive` exports it (112 px,
    weights from the zoom encoder): one vqs node with its body, the checker, the GMACs table counted
    for both trunks, torch parity in batches that mix budgets, and the model directory loads back."""
    from export import adaptive_export as ae
    from export import train
    from export.models.s3d_sgs import s3d_macs
    from export.train_adaptive import s3d_sgs_from, sgs_config

    torch.manual_seed(0)
    zoom = train.build_served_encoder().eval()
    calibration = torch.from_numpy(_video(8, seed=1).repeat(7, axis=2).repeat(7, axis=3)[:, :, :112, :112])
    model = s3d_sgs_from(zoom, train.served_encoder_config(), "stem", "motion", calibration).eval()
    plain = s3d_macs(zoom)
    model_dir = tmp_path / "clip_encoder_s3d_sgs"
    path = ae.export_served(ae.ServedS3DSGS(model), model, model_dir, adaptive=True, kept_dims=1,
                            parameters=ae.sgs_parameters(model, plain, clip_fps=15, budget_default=0.5),
                            meta={"encoder": "s3d_sgs", "sgs_after": "stem",
                                  "config": sgs_config(train.served_encoder_config(), "stem", "motion")})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node if n.domain == "vqs"] == ["SimilarityGuidedSampling"]
    assert any((f.domain, f.name) == ("vqs", "SimilarityGuidedSampling") for f in proto.functions)
    served = ae.load_served(model_dir)
    assert type(served.model) is type(model)
    table = served.gmacs_by_bins.tolist()
    assert table == pytest.approx([model.macs(b) / 1e9 for b in range(1, 9)])
    assert table == sorted(table) and table[0] < 0.5 * plain / 1e9 < plain / 1e9 < table[-1]
    config = (model_dir / "config.pbtxt").read_text()
    assert f'key: "gmacs_per_clip" value: {{ string_value: "{plain / 1e9:.6g}" }}' in config
    for batch in (1, 3):
        assert ae.parity(served, path, [1.0, 0.5, 0.25, 0.125], batch=batch) <= TOLERANCE


def test_an_encoders_own_gaussian_scores_clips_like_its_fit_near_one_and_others_far():
    """`DomainDistance`: the RMS whitened distance of features drawn like the fit's is ~1, of the
    same features shifted along a direction the fit barely varies in far more."""
    from export import adaptive_export as ae

    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 1e-3, 256)  # a few directions carry the variance, as an encoder's features do
    fit, held_out = (torch.from_numpy(rng.normal(size=(n, 256)) * scales).float() for n in (2000, 500))
    domain = ae.DomainDistance.fit(fit, shrinkage=1e-4)
    near = domain(held_out)[:, 0]
    assert near.shape == (500,) and 0.9 < float(near.mean()) < 1.1
    shifted = held_out.clone()
    shifted[:, -1] += 0.2  # a fifth of the first direction's spread, ~100 of its own (shrunk) spreads
    assert float(domain(shifted)[:, 0].mean()) > 4


def test_an_exported_encoder_gains_its_own_domain_output_and_keeps_everything_else(tmp_path):
    """`export_with_domain`: the directory's graph also outputs `domain_distance` (declared in
    config.pbtxt and model.json, its Gaussian in 1/domain.pt), ONNX Runtime matches torch on every
    output, and it loads back with its Gaussian; features, parameters and weights are unchanged."""
    import json

    from export import adaptive_export as ae
    from export.models.vit import VideoViT

    torch.manual_seed(0)
    config = {"dim": 32, "depth": 2, "heads": 2, "ats_blocks": [1]}
    vit = VideoViT(**config).eval()
    model_dir = tmp_path / "clip_encoder_vit_ats"
    parameters = ae.vit_parameters(vit, ats=True, clip_fps=15, budget_default=0.5)
    path = ae.export_served(ae.ServedViTATS(vit), vit, model_dir, adaptive=True, kept_dims=1, parameters=parameters,
                            meta={"encoder": "vit_ats", "config": config})
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    clips, budget = _video(3, seed=5).repeat(2, axis=2).repeat(2, axis=3)[:, :, :112, :112], np.full((3, 1), 0.5, np.float32)
    want_features = before.run(["features"], {"clips": clips, "budget": budget})[0]
    weights = (model_dir / "1" / "model.pt").read_bytes()

    fit = torch.randn(400, 256)
    ae.export_with_domain(model_dir, ae.DomainDistance.fit(fit, shrinkage=0.1), {"shrinkage": 0.1})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["features", "kept", "gmacs", ae.DOMAIN_OUTPUT]
    features, _, _, distance = session.run(None, {"clips": clips, "budget": budget})
    np.testing.assert_allclose(features, want_features, atol=1e-6)
    assert distance.shape == (3, 1) and (distance > 0).all()
    config_text = (model_dir / "config.pbtxt").read_text()
    assert f'name: "{ae.DOMAIN_OUTPUT}"' in config_text and 'key: "budget_default"' in config_text
    meta = json.loads((model_dir / "1" / "model.json").read_text())
    assert meta["domain"]["shrinkage"] == 0.1 and ae.DOMAIN_OUTPUT in meta["outputs"]
    assert meta["parameters"] == parameters and (model_dir / "1" / "model.pt").read_bytes() == weights
    served = ae.load_served(model_dir)
    assert isinstance(served, ae.WithDomain)
    with torch.inference_mode():
        np.testing.assert_allclose(served(torch.from_numpy(clips), torch.from_numpy(budget))[3].numpy(), distance,
                                   rtol=1e-4)
    assert ae.parity(served, path, [1.0, 0.5]) <= TOLERANCE


def test_served_zoom_vit_exports_its_window_and_matches_torch(tmp_path):
    """The zoom ViT as `vqs models --part adaptive` exports it (112 px, its finder the served
    s3d_zoom's stem and localiser): `vit_ats` keeps one vqs node per ATS block, its GMACs count the
    finder, the directory loads back as the zoom ViT, and ONNX Runtime matches torch: the training
    `forward` where nothing is sampled (budget 1), the served twin in batches that mix budgets (below
    1 a token on the edge of a sampling interval may fall either way under float rounding)."""
    from export import adaptive_export as ae
    from export import train
    from export.models.vit import VideoViTZoom
    from export.models.vit import create as create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_zoom_mini_112", finder=train.build_served_encoder().eval()).eval()
    with torch.no_grad():  # sharper attention, as after training, so ATS drops tokens below budget 1
        for block in vit.blocks:
            block.attn.qkv.weight[:64].mul_(8)
    meta = {"encoder": "vit_ats", "config": {"dim": 64, "depth": 6, "heads": 4, "ats_blocks": [2, 3, 4, 5],
                                             "tubelet": [4, 16]}, "finder": train.served_encoder_config()}
    model_dir = tmp_path / "clip_encoder_vit_ats"
    path = ae.export_served(ae.ServedViTATS(vit), vit, model_dir, adaptive=True, kept_dims=len(vit.ats_blocks),
                            parameters=ae.vit_parameters(vit, ats=True, clip_fps=15, budget_default=0.9), meta=meta)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node if n.domain == "vqs"] == ["AdaptiveTokenSampler"] * 4
    served = ae.load_served(model_dir)
    assert type(served.vit) is VideoViTZoom
    torch.testing.assert_close(served.vit.state_dict(), vit.state_dict())
    clips = torch.from_numpy(_video(3, seed=4).repeat(2, axis=2).repeat(2, axis=3)[:, :, :112, :112])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    budget = np.asarray([[1.0], [0.9], [0.5]], np.float32)
    features, kept, gmacs = session.run(None, {"clips": clips.numpy(), "budget": budget})
    with torch.no_grad():
        want = vit(clips)
    np.testing.assert_allclose(features[0], want[0].numpy(), atol=TOLERANCE * float(want.abs().max()), rtol=0)
    assert (kept[0] == vit.tokens).all() and (kept[1:] < vit.tokens).all()
    assert gmacs[0, 0] == pytest.approx(vit.macs() / 1e9) and vit.finder_macs / 1e9 < gmacs[2, 0] < gmacs[1, 0] < gmacs[0, 0]
    assert ae.parity(served, path, [1.0, 0.9, 0.5]) <= TOLERANCE
