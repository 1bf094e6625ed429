"""GridAttention: windows vs global attention, window padding modes, window partition round trip."""

from __future__ import annotations

import pytest
import torch

from piip.models.backbone.attention import GridAttention, window_partition, window_unpartition


def attention_pair(window_size: int, window_pad: str = "qkv", dim: int = 32, heads: int = 2):
    """A global and a windowed GridAttention with identical weights."""
    glob = GridAttention(dim, heads).eval()
    windowed = GridAttention(dim, heads, window_size=window_size, window_pad=window_pad).eval()
    windowed.load_state_dict(glob.state_dict())
    return glob, windowed


@pytest.mark.parametrize("window_pad", ["qkv", "tokens"])
@pytest.mark.parametrize("size", [4, 6])
def test_window_equal_to_grid_is_global_attention(window_pad, size):
    glob, windowed = attention_pair(size, window_pad)
    x = torch.randn(2, size, size, 32)
    with torch.no_grad():
        out, ref = windowed(x), glob(x)
    assert tuple(out.shape) == (2, size, size, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window_pad", ["qkv", "tokens"])
def test_windows_attend_only_within_themselves(window_pad):
    """On an 8x8 grid with 4x4 windows every window equals global attention over that window alone."""
    glob, windowed = attention_pair(4, window_pad)
    x = torch.randn(2, 8, 8, 32)
    with torch.no_grad():
        out = windowed(x)
        for i in (0, 4):
            for j in (0, 4):
                ref = glob(x[:, i : i + 4, j : j + 4])
                torch.testing.assert_close(out[:, i : i + 4, j : j + 4], ref, atol=1e-5, rtol=0)
        # and it differs from full global attention
        assert (out - glob(x)).abs().max() > 1e-4


def test_window_padding_modes_crop_back_to_the_grid():
    x = torch.randn(2, 5, 7, 32)  # padded to 8x8 for 4x4 windows
    glob, by_qkv = attention_pair(4, "qkv")
    by_tokens = GridAttention(32, 2, window_size=4, window_pad="tokens").eval()
    by_tokens.load_state_dict(glob.state_dict())
    with torch.no_grad():
        out_qkv, out_tokens = by_qkv(x), by_tokens(x)
    assert tuple(out_qkv.shape) == tuple(out_tokens.shape) == (2, 5, 7, 32)

    with torch.no_grad():
        # the top-left window holds real tokens only: both modes agree with global attention there
        ref = glob(x[:, :4, :4])
        torch.testing.assert_close(out_qkv[:, :4, :4], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_tokens[:, :4, :4], ref, atol=1e-5, rtol=0)
        # padded windows: 'tokens' projects the zero tokens (keys/values = qkv bias), 'qkv' pads with zeros
        assert (out_qkv - out_tokens).abs().max() > 1e-4
        # ... so with a zero qkv bias the two paddings coincide
        by_qkv.qkv.bias.zero_()
        by_tokens.qkv.bias.zero_()
        torch.testing.assert_close(by_qkv(x), by_tokens(x), atol=1e-5, rtol=0)


def test_qkv_padding_adds_zero_keys():
    """'qkv' padding: a padded window attends over its real keys plus zero keys (score 0, value 0)."""
    attn = GridAttention(8, 1, window_size=4, window_pad="qkv").eval()
    x = torch.randn(1, 1, 3, 8)  # one window, 3 real tokens, 13 padded ones
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x.reshape(3, 8)).chunk(3, -1)
        scores = q @ k.T / 8**0.5
        pad = torch.zeros(3, 13)
        probs = torch.cat([scores, pad], -1).softmax(-1)[:, :3]
        expected = attn.proj(probs @ v)
    torch.testing.assert_close(out.reshape(3, 8), expected, atol=1e-5, rtol=0)


def test_window_attention_rejects_sequences():
    attn = GridAttention(32, 2, window_size=4)
    with pytest.raises(ValueError, match="window"):
        attn(torch.randn(1, 17, 32))


@pytest.mark.parametrize("shape, window", [((2, 8, 12, 3), 4), ((1, 6, 6, 5), 3), ((3, 4, 4, 2), 4)])
def test_window_partition_round_trip(shape, window):
    B, H, W, C = shape
    x = torch.randn(shape)
    windows = window_partition(x, window)
    assert tuple(windows.shape) == (B * (H // window) * (W // window), window * window, C)
    # row-major windows within each image; row-major tokens within each window
    torch.testing.assert_close(windows[0], x[0, :window, :window].reshape(-1, C))
    if window < W:
        torch.testing.assert_close(windows[1], x[0, :window, window : 2 * window].reshape(-1, C))
    per_image = (H // window) * (W // window)
    torch.testing.assert_close(windows[per_image * (B - 1)], x[B - 1, :window, :window].reshape(-1, C))
    torch.testing.assert_close(window_unpartition(windows, window, H, W), x, atol=0, rtol=0)
