"""Frame embedder pieces: the served input size, output contract, rotary positions, windows, the
sequence contrastive loss."""

import numpy as np
import torch

from export import frames as frames_module
from export.models.embedder import (FrameEmbedder, ServedEmbedder, rotate, sequence_contrastive_loss,
                                    sine_cosine_positions)


def test_the_gateways_4x4_mean_matches_the_training_downsample():
    """The served models take 28 px frames; the gateway makes them from its 112 px frames as the
    rounded mean of each 4x4 block (the contract), training from the 56 px cache."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    expected = frames_module.to_model_size(frames_module.downsample(frames)).astype(int)
    gateway = frames_module.served_to_model_size(frames).astype(int)
    assert np.array_equal(gateway, (frames.reshape(3, 28, 4, 28, 4, 3).astype(int).sum((2, 4)) + 8) // 16)
    assert gateway.shape == expected.shape == (3, 28, 28, 3)
    assert np.abs(gateway - expected).max() <= 1  # two roundings to uint8 on the training side


def test_embeddings_are_unit_length_per_frame():
    torch.manual_seed(0)
    model = FrameEmbedder(dim=32, heads=2, out_dim=16).eval()
    z = model(torch.randint(0, 256, (2, 5, 28, 28, 3), dtype=torch.uint8))
    assert z.shape == (2, 5, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 5), atol=1e-5)


def test_frame_features_are_unit_length_and_see_no_neighbours():
    """The served `frame_features` of a frame do not change when the other frames do (a still
    picture's query must not depend on the frames around it), unlike its embedding."""
    torch.manual_seed(0)
    model = ServedEmbedder(FrameEmbedder(dim=32, heads=2, out_dim=16).eval()).eval()
    frames = torch.randint(0, 256, (1, 9, 28, 28, 3), dtype=torch.uint8)
    other = frames.clone()
    other[:, :4] = 255 - other[:, :4]
    with torch.no_grad():
        (z, f), (z2, f2) = model(frames), model(other)
    assert f.shape == (1, 9, 32)
    assert torch.allclose(f.norm(dim=-1), torch.ones(1, 9), atol=1e-5)
    assert torch.allclose(f[:, 4:], f2[:, 4:], atol=1e-6)
    assert not torch.allclose(z[:, 4:], z2[:, 4:], atol=1e-3)
    assert torch.equal(z, model.embedder(frames))


def test_positions_are_distinct_and_bounded():
    pe = sine_cosine_positions(50, 16)
    assert pe.shape == (50, 16) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).add(torch.eye(50)).min() > 0


def test_rotary_attention_scores_depend_on_frame_distance_only():
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)
    pe = sine_cosine_positions(40, 8)
    score = lambda i, j: float(rotate(q.expand(40, 8), pe)[i] @ rotate(k.expand(40, 8), pe)[j])  # noqa: E731
    assert abs(score(3, 7) - score(23, 27)) < 1e-4
    assert abs(score(3, 7) - score(3, 9)) > 1e-3


def test_a_window_with_context_computes_what_the_whole_video_computes():
    """The gateway runs long videos in windows with `context_frames` either side; with relative
    positions a window's centre equals the whole video's (absolute positions would shift it)."""
    torch.manual_seed(0)
    model = FrameEmbedder(dim=32, heads=2, out_dim=16, radius=4).eval()
    c = model.context_frames
    frames = torch.randint(0, 256, (1, 60, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        whole = model(frames)
        window = model(frames[:, 20 - c:40 + c])
    torch.testing.assert_close(window[:, c:c + 20], whole[:, 20:40], atol=1e-5, rtol=0)


def test_idle_content_gives_the_same_embedding_wherever_it_sits():
    """No clock: the same frames placed early or late in a video embed identically (away from
    the video's edges), so time cannot be read from the embeddings of unchanging content."""
    torch.manual_seed(0)
    model = FrameEmbedder(dim=32, heads=2, out_dim=16, radius=4).eval()
    clip = torch.randint(0, 256, (1, 30, 28, 28, 3), dtype=torch.uint8)
    filler = torch.randint(0, 256, (1, 50, 28, 28, 3), dtype=torch.uint8)
    with torch.no_grad():
        early = model(torch.cat([clip, filler], 1))[:, 10:20]
        late = model(torch.cat([filler, clip], 1))[:, 60:70]
    torch.testing.assert_close(early, late, atol=1e-5, rtol=0)


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
