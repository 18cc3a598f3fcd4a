"""Frame embedder pieces: served-frame pooling, output contract, the sequence contrastive loss."""

import numpy as np
import torch

from export import frames as frames_module
from export.models.embedder import (FrameEmbedder, pool_served_frames, sequence_contrastive_loss,
                                    sine_cosine_positions)


def test_pooling_matches_the_training_downsample():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    expected = frames_module.to_model_size(frames_module.downsample(frames))
    pooled = pool_served_frames(torch.from_numpy(frames)[None])[0].numpy()
    assert pooled.shape == expected.shape == (3, 28, 28, 3)
    assert np.abs(pooled - expected).max() <= 1.0  # two roundings to uint8 on the training side


def test_embeddings_are_unit_length_per_frame():
    torch.manual_seed(0)
    model = FrameEmbedder(dim=32, heads=2, out_dim=16).eval()
    z = model(torch.randint(0, 256, (2, 5, 112, 112, 3), dtype=torch.uint8))
    assert z.shape == (2, 5, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 5), atol=1e-5)


def test_positions_are_distinct_and_bounded():
    pe = sine_cosine_positions(50, 16)
    assert pe.shape == (50, 16) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).add(torch.eye(50)).min() > 0


def test_scl_is_lower_when_similarity_follows_time():
    t = torch.arange(12.0)[None]
    angles = t[..., None] * 0.25
    aligned = torch.cat([angles.cos(), angles.sin()], -1)  # neighbours in time are neighbours here
    shuffled = aligned[:, torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    assert sequence_contrastive_loss(aligned, aligned, t, t) < sequence_contrastive_loss(aligned, shuffled, t, t)
    # the loss does not need frame-to-frame correspondence: a view shifted in time still scores
    # better than a shuffled one
    assert sequence_contrastive_loss(aligned[:, 2:], aligned[:, :-2], t[:, 2:], t[:, :-2]) < \
        sequence_contrastive_loss(aligned[:, 2:], shuffled[:, :-2], t[:, 2:], t[:, :-2])
