"""torch vs ONNX Runtime parity: the committed artifacts and a fresh export."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from export import onnx_export, train
from export.models.tqn import TQNDecoder

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4


def _decoder_inputs(rng, batch=2, clips=11, dim=256):
    features = rng.standard_normal((batch, clips, dim)).astype(np.float32)
    mask = np.ones((batch, clips), bool)
    mask[-1, clips // 2:] = False  # a shorter video padded in the same batch
    return {"features": features, "mask": mask}


def _load_decoder(folder: Path) -> TQNDecoder:
    meta = json.loads((folder / "model.json").read_text())
    model = TQNDecoder(**meta["config"])
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval()


def test_committed_encoder_matches_torch():
    folder = REPO / "model_repository/clip_encoder_s3d/1"
    encoder, _ = train.load_served_encoder(folder.parent)
    clips = np.random.default_rng(0).integers(0, 256, (5, 8, 112, 112, 3), dtype=np.uint8)
    diffs = onnx_export.max_diff(encoder, folder / "model.onnx", {"clips": clips})
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_committed_decoder_matches_torch_on_logits_and_attention():
    folder = REPO / "model_repository/tqn_decoder/1"
    decoder = _load_decoder(folder)
    diffs = onnx_export.max_diff(decoder, folder / "model.onnx", _decoder_inputs(np.random.default_rng(1)))
    assert set(diffs) == set(onnx_export.decoder_graph_outputs())
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_fresh_export_keeps_names_dynamic_axes_and_parity(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    decoder = train.build_tqn().eval()
    path = onnx_export.export_decoder(decoder, train.TQN_CONFIG, tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features", "mask"]
    assert [o.name for o in session.get_outputs()] == list(onnx_export.decoder_graph_outputs())
    rng = np.random.default_rng(2)
    for batch, clips in ((1, 1), (3, 37)):  # other batch sizes and lengths than the export example
        inputs = _decoder_inputs(rng, batch, clips)
        if batch == 1:
            inputs["mask"][:] = True
        diffs = onnx_export.max_diff(decoder, path, inputs)
        assert max(diffs.values()) <= TOLERANCE, diffs
    attention = session.run(["attention"], inputs)[0]
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
    assert np.all(attention[-1, :, clips // 2:] == 0)  # padded clips get no attention


def test_fresh_encoder_export_has_a_dynamic_batch_and_the_served_metadata(tmp_path):
    from export import build

    torch.manual_seed(0)
    encoder = train.build_served_encoder().eval()
    path = onnx_export.export_encoder(encoder, train.served_encoder_config(), tmp_path, "clip_encoder_s3d",
                                      clip_fps=build.FPS)
    clips = np.random.default_rng(3).integers(0, 256, (3, 8, 112, 112, 3), dtype=np.uint8)
    diffs = onnx_export.max_diff(encoder, path, {"clips": clips})  # batch 3: not the example's 2
    assert max(diffs.values()) <= TOLERANCE, diffs
    fresh = json.loads((tmp_path / "model.json").read_text())
    committed = json.loads((REPO / "model_repository/clip_encoder_s3d/1/model.json").read_text())
    # What the gateway and contract tests read is what `make models` writes.
    served = ("clip_frames", "frame_size", "feature_dim", "clip_fps")
    assert {k: fresh[k] for k in served} == {k: committed[k] for k in served}


def test_committed_encoder_config_carries_its_multiply_adds_per_clip():
    from export.models.s3d_sgs import s3d_macs

    encoder, _ = train.load_served_encoder(REPO / "model_repository/clip_encoder_s3d")
    config = (REPO / "model_repository/clip_encoder_s3d/config.pbtxt").read_text()
    want = onnx_export.encoder_parameters(15, s3d_macs(encoder) / 1e9)[onnx_export.GMACS_PER_CLIP_PARAMETER]
    assert f'key: "{onnx_export.GMACS_PER_CLIP_PARAMETER}" value: {{ string_value: "{want}" }}' in config


def test_committed_artifacts_and_evaluation_name_the_data_they_came_from():
    from export import build, synth

    evaluation = json.loads((REPO / "export/evaluation.json").read_text())
    provenance = evaluation["provenance"]
    assert provenance["generator_version"] == synth.GENERATOR_VERSION
    assert set(provenance["splits"]) == set(build.SPLITS)
    seeds = [spec["seed"] for spec in provenance["splits"].values()]
    assert len(set(seeds)) == len(seeds)  # train, validation and test come from distinct seeds
    assert all(len(spec["labels_sha256"]) == 64 for spec in provenance["splits"].values())
    # The thread count splits every reduction, so it is part of what reproduces the run.
    assert provenance["train_threads"] == train.TRAIN_THREADS
    for model in ("clip_encoder_s3d", "tqn_decoder"):
        meta = json.loads((REPO / f"model_repository/{model}/1/model.json").read_text())
        assert meta["provenance"] == provenance, model  # artifacts and table come from one run
    queries = {*train.HEADS}
    for split in ("val", "test"):
        for name in ("tqn", "average_pooling", "short_term"):
            summary = evaluation[split]["results"][name]
            assert set(summary["accuracy"]) == queries and 0 <= summary["per_class_accuracy"] <= 1
        for base in ("average_pooling", "short_term"):
            lo, hi = evaluation[split]["tqn_minus"][base]["class"]["interval95"]
            assert lo <= evaluation[split]["tqn_minus"][base]["class"]["difference"] <= hi
        null = evaluation[split]["results"]["tqn"]["null"]
        assert null["null_videos"] > 0 and 0 <= null["null_videos_all_null"] <= 1


def test_served_decoder_carries_the_calibration_and_in_domain_threshold_of_the_evaluation():
    evaluation = json.loads((REPO / "export/evaluation.json").read_text())
    folder = REPO / "model_repository/tqn_decoder/1"
    meta = json.loads((folder / "model.json").read_text())
    calibration = evaluation["calibration"]
    assert meta["temperature"] == pytest.approx(calibration["temperature"])
    assert set(calibration["temperature"]) == set(train.HEADS)
    for split in ("val", "test"):
        assert set(calibration[split]) == set(train.HEADS)
        assert all({"before", "after"} <= set(ece) for ece in calibration[split].values())
    decoder = _load_decoder(folder)
    assert decoder.temperature.tolist() == pytest.approx(list(calibration["temperature"].values()))
    threshold = evaluation["in_domain"]["threshold"]
    assert meta["in_domain_threshold"] == pytest.approx(threshold)
    config = (REPO / "model_repository/tqn_decoder/config.pbtxt").read_text()
    written = f'key: "{onnx_export.IN_DOMAIN_THRESHOLD_PARAMETER}" value: {{ string_value: "{threshold:.6g}" }}'
    assert written in config


def test_committed_seeds_study_names_its_data_and_seeds_and_has_every_table():
    from export import build, seeds

    study = json.loads((REPO / "export/seeds.json").read_text())
    evaluation = json.loads((REPO / "export/evaluation.json").read_text())
    provenance = study["provenance"]
    # The same splits, budget and thread count as the served models' evaluation.
    same = ("generator_version", "splits", "budget", "train_threads")
    assert {k: provenance[k] for k in same} == {k: evaluation["provenance"][k] for k in same}
    assert provenance["train_seeds"] == study["seeds_done"]
    assert list(study["per_seed"]) == [str(s) for s in study["seeds_done"]]
    assert set(study["seeds_done"]) <= set(study["seeds_asked"]) and len(study["seeds_done"]) >= 3
    if build.TRAIN_SEED in study["seeds_done"]:  # the served run, scored again: the same figures
        assert study["per_seed"][str(build.TRAIN_SEED)]["tqn"]["accuracy"] == \
            pytest.approx(evaluation["test"]["results"]["tqn"]["accuracy"])
    for name in seeds.MODELS:
        model = study["models"][name]
        assert set(model["accuracy"]) == set(train.HEADS)
        assert all(0 <= m["mean"] <= 1 and m["std"] >= 0 for m in model["accuracy"].values())
        assert set(model["by_length"]) == set(evaluation["test"]["results"]["tqn"]["by_length"])
    for base in ("average_pooling", "short_term"):
        for gap in study["tqn_minus"][base].values():
            lo, hi = gap["interval95"]
            assert lo <= gap["difference"] <= hi
