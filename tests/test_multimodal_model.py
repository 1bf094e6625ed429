"""PIIP-LLaVA model parts: visual-token splicing, the branch projector, and KV-cached greedy generation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from piip.errors import ConfigError
from piip.models.heads.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, BranchProjector, splice_visual_tokens

P = IMAGE_TOKEN_INDEX


def embedding(vocab: int = 10, dim: int = 2) -> nn.Embedding:
    """Token t embeds as (t, t): spliced rows can be read back as token ids."""
    emb = nn.Embedding(vocab, dim)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(vocab).float()[:, None].expand(vocab, dim))
    return emb


def test_splice_puts_each_rows_visual_tokens_at_its_placeholder_and_ignores_their_labels() -> None:
    ids = torch.tensor([[1, 5, P, 6, 7], [1, 8, 9, 0, 0], [1, P, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]).bool()
    labels = torch.tensor(
        [[-100, -100, -100, 6, 7], [-100, -100, 9, -100, -100], [-100, -100, 4, -100, -100]]
    )
    visual = torch.tensor(
        [[[100.0, 100.0], [101.0, 101.0]], [[200.0, 200.0], [201.0, 201.0]]]
    )  # rows 0 and 2
    embeds, out_mask, out_labels = splice_visual_tokens(embedding(), ids, mask, visual, labels)
    assert embeds.shape == (3, 6, 2)  # row 0: 5 tokens - placeholder + 2 visual
    assert embeds[0, :, 0].tolist() == [1, 5, 100, 101, 6, 7]
    assert embeds[1, :3, 0].tolist() == [1, 8, 9] and out_mask[1].tolist() == [1, 1, 1, 0, 0, 0]
    assert embeds[2, :4, 0].tolist() == [1, 200, 201, 4] and out_mask[2].tolist() == [1, 1, 1, 1, 0, 0]
    X = IGNORE_INDEX
    assert out_labels.tolist() == [[X, X, X, X, 6, 7], [X, X, 9, X, X, X], [X, X, X, 4, X, X]]


def test_left_padded_splice_ends_every_row_at_the_last_column() -> None:
    ids = torch.tensor([[0, 0, 1, P], [0, 1, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]).bool()
    visual = torch.tensor([[[50.0, 50.0], [51.0, 51.0], [52.0, 52.0]]])
    embeds, out_mask, labels = splice_visual_tokens(embedding(), ids, mask, visual, left_pad=True)
    assert labels is None
    assert embeds[0, :, 0].tolist() == [1, 50, 51, 52] and out_mask[0].tolist() == [1, 1, 1, 1]
    assert embeds[1, :, 0].tolist() == [0, 1, 3, 4] and out_mask[1].tolist() == [0, 1, 1, 1]


def test_splice_refuses_image_count_mismatch_and_two_placeholders() -> None:
    ids = torch.tensor([[1, P, 2]])
    mask = torch.ones_like(ids).bool()
    with pytest.raises(ValueError, match="1 rows have an image placeholder but 0 images"):
        splice_visual_tokens(embedding(), ids, mask, None)
    with pytest.raises(ValueError, match="several images"):
        splice_visual_tokens(
            embedding(), torch.tensor([[P, P]]), torch.ones(1, 2).bool(), torch.zeros(1, 1, 2)
        )


def test_projector_resizes_low_resolution_maps_and_sums_the_branch_mlps() -> None:
    torch.manual_seed(0)
    projector = BranchProjector([8, 16], out_dim=32, groups=4).eval()
    high, low = torch.randn(2, 8, 4, 6), torch.randn(2, 16, 2, 3)
    tokens = projector([high, low])
    assert tokens.shape == (2, 4 * 6, 32)
    low_up = F.interpolate(low, size=(4, 6), mode="bilinear", align_corners=False)
    expected = projector.mlps[0](high) + projector.mlps[1](low_up)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2))


def test_projector_width_must_fit_groupnorm() -> None:
    with pytest.raises(ConfigError, match="not divisible by 32"):
        BranchProjector([8], out_dim=40)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def test_cached_greedy_generation_from_spliced_embeddings_matches_a_full_recompute() -> None:
    """`generate` (KV cache, left padding, inputs_embeds) gives the tokens that re-running the whole sequence
    and taking the argmax at every step gives."""
    model = tiny_llama()
    ids = torch.tensor([[0, 0, 1, 5, P, 6], [1, 7, 8, P, 9, 10]])
    mask = (ids != 0).clone()
    mask[:, :2] |= torch.tensor([[False, False], [True, True]])
    visual = torch.randn(2, 3, 32)
    embed = model.get_input_embeddings()
    embeds, out_mask, _ = splice_visual_tokens(embed, ids, mask, visual, left_pad=True)
    new = model.generate(
        inputs_embeds=embeds, attention_mask=out_mask, max_new_tokens=5, do_sample=False, min_new_tokens=5
    )
    assert new.shape == (2, 5)  # only the new tokens come back when generation starts from embeddings
    for row in range(2):
        seq, keep = embeds[row : row + 1], out_mask[row : row + 1]
        seq, keep = seq[:, keep[0]], keep[:, keep[0]]
        for step in range(5):
            with torch.no_grad():
                logits = model(inputs_embeds=seq).logits[0, -1]
            logits[2] = -float("inf")  # min_new_tokens masks eos the same way
            token = int(logits.argmax())
            assert token == int(new[row, step]), f"row {row} step {step}"
            seq = torch.cat([seq, embed(torch.tensor([[token]]))], dim=1)
