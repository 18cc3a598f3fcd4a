import pytest
import torch
from torch import nn

from export.models.pixels import can_embed_patches, embed_patches, normalise

MEAN = torch.tensor([110.0, 100.0, 95.0])
STD = torch.tensor([58.0, 56.0, 55.0])


def _reference(clips: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    x = (clips.permute(0, 4, 1, 2, 3).float() - MEAN.view(1, 3, 1, 1, 1)) / STD.view(1, 3, 1, 1, 1)
    assert torch.equal(normalise(clips, MEAN, STD), x)  # training's input, bit for bit
    return conv(x).permute(0, 2, 3, 4, 1)  # channels last, as embed_patches returns


@pytest.mark.parametrize("kernel, bias", [((2, 16, 16), True), ((1, 8, 8), False)])
def test_equals_the_conv_of_the_normalised_clips(kernel, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 24, kernel, stride=kernel, bias=bias)
    clips = torch.randint(0, 256, (3, 8, 32, 48, 3), dtype=torch.uint8)
    with torch.no_grad():
        got, want = embed_patches(clips, conv, MEAN, STD), _reference(clips, conv)
    assert got.shape == want.shape == (3, 8 // kernel[0], 32 // kernel[1], 48 // kernel[2], 24)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


def test_each_patch_reads_its_own_pixels():
    # One bright pixel moves the output of exactly the patch that holds it.
    conv = nn.Conv3d(3, 4, (2, 16, 16), stride=(2, 16, 16))
    clips = torch.zeros(1, 4, 32, 32, 3, dtype=torch.uint8)
    with torch.no_grad():
        before = embed_patches(clips, conv, MEAN, STD)
        clips[0, 3, 20, 5, 1] = 255  # frame 3 -> tubelet 1; row 20 -> patch row 1; column 5 -> patch column 0
        changed = (embed_patches(clips, conv, MEAN, STD) - before).abs().sum(dim=-1) > 0
    assert changed.nonzero().tolist() == [[0, 1, 1, 0]]


def test_refuses_what_is_not_a_patchify():
    assert can_embed_patches(nn.Conv3d(3, 4, (2, 16, 16), stride=(2, 16, 16)))
    clips = torch.zeros(1, 8, 32, 32, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="kernel is its stride"):
        embed_patches(clips, nn.Conv3d(3, 4, (1, 8, 8), stride=(1, 8, 8), padding=(0, 1, 1)), MEAN, STD)
    with pytest.raises(ValueError, match="kernel is its stride"):
        embed_patches(clips, nn.Conv3d(3, 4, (3, 8, 8), stride=(1, 8, 8)), MEAN, STD)
    with pytest.raises(ValueError, match="do not tile"):
        embed_patches(clips, nn.Conv3d(3, 4, (3, 8, 8), stride=(3, 8, 8)), MEAN, STD)
