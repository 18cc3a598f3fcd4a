"""Time the ONNX function bodies of the adaptive ops in ONNX Runtime against the plain encoder
block they sit in (untrained weights: the op's cost depends on shapes, and K'/B' are set by hand).

    python -m export.adaptive.profile [--batch 1 8] [--threads 1] [--repeats 30]

Each case is exported once (bare op, ATS block, plain block; SGS op and the s3d stage after it;
the whole encoders with and without their module) and the sessions are timed interleaved, so
machine load hits them alike; the best of the repeats is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.adaptive import onnx_functions
from export.adaptive.ats import adaptive_token_sampler
from export.adaptive.sgs import SimilarityGuidedSampling, similarity_guided_sampling
from export.models.s3d import S3D, SepConv3d
from export.models.s3d_sgs import create as create_s3d_sgs
from export.models.s3d_sgs import s3d_macs
from export.models.vit import Block
from export.models.vit import create as create_vit
from export.onnx_export import _Served as Served


class _AtsOp(torch.nn.Module):
    def forward(self, x, attn, v, mask, k):
        return adaptive_token_sampler(x, attn, v, mask, k)


class _AtsBlock(torch.nn.Module):
    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, x, k):
        return self.block(x, None, k)


class _FixedK(torch.nn.Module):
    """The served ViT with K fixed per ATS block, given as an input (`VideoViT.forward`'s `k`)."""

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, clips, k):
        return self.vit.forward_served(clips, k=k)


class _PlainBlock(_AtsBlock):
    def forward(self, x):
        return self.block(x)[0]


class _SgsOp(torch.nn.Module):
    def forward(self, features, z, bins):
        return similarity_guided_sampling(features, z, bins)


class _SgsModule(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.sgs = SimilarityGuidedSampling(channels)

    def forward(self, features, bins):
        return self.sgs(features, bins)


class _Stage(torch.nn.Module):
    def __init__(self, stage: SepConv3d):
        super().__init__()
        self.stage = stage

    def forward(self, features):
        return self.stage(features)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _export(model, args, path, names, dynamic):
    inputs, outputs = names
    onnx_functions.export(model.eval(), args, path, input_names=inputs, output_names=outputs, dynamic_shapes=dynamic)


def _time_interleaved(cases: dict[str, tuple[ort.InferenceSession, dict]], repeats: int) -> dict[str, float]:
    for session, feed in cases.values():
        session.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (session, feed) in cases.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[name].append(time.perf_counter() - start)
    # Best of N: other processes on a shared machine only ever add time.
    return {name: float(np.min(t)) * 1e3 for name, t in times.items()}


def profile_ats(out: Path, *, batches, threads: int, repeats: int, dim: int = 128, heads: int = 4, tokens: int = 197):
    torch.manual_seed(0)
    block = Block(dim, heads=heads).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    x = torch.randn(2, tokens, dim)
    attn = torch.softmax(torch.randn(2, heads, tokens, tokens), dim=-1)
    v = torch.randn(2, heads, tokens, dim // heads)
    mask = torch.ones(2, tokens, dtype=torch.bool)
    _export(_AtsOp(), (x, attn, v, mask, torch.tensor(8)), out / "ats_op.onnx",
            (["x", "attn", "v", "mask", "k"], ["attended", "residual", "kept", "index"]),
            {"x": {0: batch}, "attn": {0: batch}, "v": {0: batch}, "mask": {0: batch}, "k": None})
    _export(_AtsBlock(block), (x, torch.tensor(8)), out / "ats_block.onnx", (["x", "k"], ["y", "kept"]),
            {"x": {0: batch}, "k": None})
    _export(_PlainBlock(block), (x,), out / "plain_block.onnx", (["x"], ["y"]), {"x": {0: batch}})
    op, ats, plain = (_session(out / f"{n}.onnx", threads) for n in ("ats_op", "ats_block", "plain_block"))
    rng = np.random.default_rng(0)
    print(f"ATS, {tokens} tokens, dim {dim}, {heads} heads, {threads} thread(s); ms per call (best of {repeats})")
    print("batch  K    K'+1  ATS op  ATS block  plain block  op/plain  block/plain")
    for n in batches:
        xs = rng.standard_normal((n, tokens, dim)).astype(np.float32)
        # Peaked attention (as in trained later blocks) so K' < K happens.
        logits = 4 * rng.standard_normal((n, heads, tokens, tokens)).astype(np.float32)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        vs = rng.standard_normal((n, heads, tokens, dim // heads)).astype(np.float32)
        ones = np.ones((n, tokens), dtype=bool)
        for k in (tokens - 1, 128, 64, 32, 16):
            kk = np.array(k)
            kept = op.run(None, {"x": xs, "attn": probs, "v": vs, "mask": ones, "k": kk})[2].shape[1]
            t = _time_interleaved({
                "op": (op, {"x": xs, "attn": probs, "v": vs, "mask": ones, "k": kk}),
                "block": (ats, {"x": xs, "k": kk}),
                "plain": (plain, {"x": xs}),
            }, repeats)
            print(f"{n:5d} {k:4d} {kept:5d} {t['op']:7.3f} {t['block']:10.3f} {t['plain']:12.3f}"
                  f" {t['op'] / t['plain']:9.2f} {t['block'] / t['plain']:12.2f}")


def profile_sgs(out: Path, *, batches, threads: int, repeats: int, channels: int = 24, frames: int = 8, size: int = 14,
                next_channels: int = 32):
    """SGS on the s3d's stem output (24 channels, 8 frames, 14×14) against the stage after it."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    bins_kept = torch.export.Dim("kept", min=1, max=frames)
    features = torch.randn(2, channels, frames, size, size)
    _export(_SgsOp(), (features, torch.randn(2, frames, 8), torch.tensor(frames)), out / "sgs_op.onnx",
            (["features", "z", "bins"], ["sampled", "mask"]), {"features": {0: batch}, "z": {0: batch}, "bins": None})
    _export(_SgsModule(channels), (features, torch.tensor(frames)), out / "sgs_module.onnx",
            (["features", "bins"], ["sampled", "mask"]), {"features": {0: batch}, "bins": None})
    _export(_Stage(SepConv3d(channels, next_channels)), (features,), out / "stage.onnx", (["features"], ["y"]),
            {"features": {0: batch, 2: bins_kept}})
    op, module, stage = (_session(out / f"{n}.onnx", threads) for n in ("sgs_op", "sgs_module", "stage"))
    rng = np.random.default_rng(0)
    print(f"SGS on ({channels}, {frames}, {size}, {size}) features, {threads} thread(s);"
          f" ms per call (best of {repeats})")
    print("batch  B   B'  SGS op  SGS+net  stage(T)  stage(B')  op/stage(T)")
    for n in batches:
        feats = rng.standard_normal((n, channels, frames, size, size)).astype(np.float32)
        for bins in (frames, 4, 2):
            z = rng.standard_normal((n, frames, 8)).astype(np.float32)
            feed = {"features": feats, "z": z, "bins": np.array(bins)}
            sampled = op.run(None, feed)[0]
            t = _time_interleaved({
                "op": (op, feed),
                "module": (module, {"features": feats, "bins": np.array(bins)}),
                "stage": (stage, {"features": feats}),
                "stage_kept": (stage, {"features": np.ascontiguousarray(sampled)}),
            }, repeats)
            print(f"{n:5d} {bins:2d} {sampled.shape[2]:3d} {t['op']:7.3f} {t['module']:8.3f} {t['stage']:9.3f}"
                  f" {t['stage_kept']:10.3f} {t['op'] / t['stage']:12.2f}")


def profile_encoders(out: Path, *, batches, threads: int, repeats: int):
    """Whole clip encoders: vit_tiny_112 without / with ATS (same weights), s3d without / with SGS
    after its stem. Untrained weights: K' and B' are whatever they give; the MACs are counted."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=64)
    clips = torch.randint(0, 255, (2, 8, 112, 112, 3), dtype=torch.uint8)
    vit = create_vit("vit_tiny_112").eval()
    s3d_sgs = create_s3d_sgs("s3d_sgs_stem_112").eval()
    with torch.no_grad():  # a similarity net that tells frames apart (at init its biases dominate Δ)
        s3d_sgs.sgs.similarity.conv1.bias.zero_()
        s3d_sgs.sgs.similarity.conv2.bias.zero_()
    s3d = S3D().eval()
    s3d.load_state_dict({k: v for k, v in s3d_sgs.state_dict().items() if not k.startswith("sgs.")})
    dynamic = {"clips": {0: batch}}
    _export(Served(vit), (clips,), out / "vit.onnx", (["clips"], ["features"]), dynamic)
    _export(_FixedK(vit), (clips, torch.tensor([64] * 4)), out / "vit_ats.onnx", (["clips", "k"], ["features", "tokens_kept"]),
            {**dynamic, "k": None})
    _export(Served(s3d), (clips,), out / "s3d.onnx", (["clips"], ["features"]), dynamic)
    _export(Served(s3d_sgs), (clips, torch.tensor(8)), out / "s3d_sgs.onnx", (["clips", "bins"], ["features", "bins_kept"]),
            {**dynamic, "knob": None})
    sessions = {name: _session(out / f"{name}.onnx", threads) for name in ("vit", "vit_ats", "s3d", "s3d_sgs")}
    rng = np.random.default_rng(0)
    print(f"Clip encoders, {threads} thread(s); ms per clip (best of {repeats}), MACs per clip counted from shapes")
    print("batch  encoder        knob  kept              ms/clip  plain ms/clip  speed-up  GMACs  plain GMACs")
    vit_macs, s3d_macs_plain = vit.macs() / 1e9, s3d_macs(s3d) / 1e9
    for n in batches:
        video = (rng.integers(0, 255, (n, 8, 112, 112, 3)) * rng.random((n, 8, 1, 1, 1))).astype(np.uint8)
        for k in (196, 128, 64, 32, 16):
            feed = {"clips": video, "k": np.array([k] * 4)}
            kept = sessions["vit_ats"].run(None, feed)[1]
            t = _time_interleaved({"ats": (sessions["vit_ats"], feed), "plain": (sessions["vit"], {"clips": video})},
                                  repeats)
            macs = np.mean([vit.macs(row.tolist()) for row in kept]) / 1e9
            print(f"{n:5d}  vit_ats   K={k:4d}  {str(kept[0].tolist()):16s} {t['ats'] / n:8.3f} {t['plain'] / n:14.3f}"
                  f" {t['plain'] / t['ats']:9.2f} {macs:6.3f} {vit_macs:12.3f}")
        for bins in (8, 4, 2, 1):
            feed = {"clips": video, "bins": np.array(bins)}
            kept = sessions["s3d_sgs"].run(None, feed)[1]
            t = _time_interleaved({"sgs": (sessions["s3d_sgs"], feed), "plain": (sessions["s3d"], {"clips": video})},
                                  repeats)
            macs = np.mean([s3d_sgs.macs(int(b)) for b in kept]) / 1e9
            print(f"{n:5d}  s3d_sgs   B={bins:4d}  {str(kept.tolist())[:16]:16s} {t['sgs'] / n:8.3f}"
                  f" {t['plain'] / n:14.3f} {t['plain'] / t['sgs']:9.2f} {macs:6.3f} {s3d_macs_plain:12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--only", choices=["ats", "sgs", "encoders"], default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "ats"):
            profile_ats(Path(tmp), batches=args.batch, threads=args.threads, repeats=args.repeats)
        if args.only in (None, "sgs"):
            profile_sgs(Path(tmp), batches=args.batch, threads=args.threads, repeats=args.repeats)
        if args.only in (None, "encoders"):
            profile_encoders(Path(tmp), batches=args.batch, threads=args.threads, repeats=args.repeats)


if __name__ == "__main__":
    main()
