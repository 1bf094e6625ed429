"""Loading branch checkpoints in other files' naming, and per-branch classifier heads from checkpoints."""

import re

import timm
import torch

from piip.models import BranchSpec, PIIPBackbone, PIIPConfig, build_branch

INTERNVIT_LIKE = dict(
    family="vit",
    timm_model="test_vit",
    norm="rmsnorm",
    qk_norm="all",
    window_pad="tokens",
    timm_kwargs={"embed_dim": 64, "depth": 2, "num_heads": 2, "qkv_bias": False, "init_values": 0.1},
)


def _to_internvl_names(state_dict):
    """The InternVL / Hugging Face naming of InternViT-6B, written out by hand (inverse of our converter)."""
    out = {}
    for key, value in state_dict.items():
        key = {"pos_embed": "embeddings.position_embedding", "cls_token": "embeddings.class_embedding"}.get(
            key, key
        )
        key = key.replace("patch_embed.proj.", "embeddings.patch_embedding.")
        key = re.sub(r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layers.\1.ls\2", key)
        key = re.sub(r"^blocks\.(\d+)\.", r"encoder.layers.\1.", key)
        out[key] = value
    return out


def test_internvl_checkpoint_reproduces_the_saved_branch(tmp_path):
    torch.manual_seed(0)
    source = build_branch(BranchSpec(name="src", **INTERNVIT_LIKE))
    with torch.no_grad():  # make the RMSNorm / qk-norm / layer-scale weights non-trivial
        for name, p in source.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight", "gamma", "norm1.weight")):
                p.uniform_(0.5, 1.5)
    path = tmp_path / "intern_vit.pth"
    torch.save({"model": _to_internvl_names(source.state_dict())}, path)

    torch.manual_seed(1)
    target = build_branch(BranchSpec(name="dst", checkpoint_format="internvl", **INTERNVIT_LIKE))
    report = target.load_pretrained(str(path))
    assert report.missing == []
    images = torch.randn(2, 3, 64, 96)
    expected = source.forward_blocks(source.embed(images), 0, 1).x
    actual = target.forward_blocks(target.embed(images), 0, 1).x
    torch.testing.assert_close(actual, expected)
    assert target.blocks[0].attn.q_norm.weight.shape == (64,)  # one norm over all heads


def _tiny(name, dim):
    return BranchSpec(
        name=name,
        family="vit",
        timm_model="test_vit",
        timm_kwargs={"embed_dim": dim, "depth": 2, "num_heads": 2},
    )


def test_per_branch_classifier_starts_from_each_checkpoint_head(tmp_path):
    specs = [_tiny("a", 32), _tiny("b", 64)]
    heads = {}
    for spec in specs:
        dim = spec.timm_kwargs["embed_dim"]
        timm_model = timm.create_model("test_vit", num_classes=10, embed_dim=dim, depth=2, num_heads=2)
        spec.pretrained = str(tmp_path / f"{spec.name}.pth")
        torch.save(timm_model.state_dict(), spec.pretrained)
        heads[spec.name] = timm_model.head.weight.detach().clone()
    config = PIIPConfig(
        branches=specs,
        resolutions=[64, 32],
        num_interactions=1,
        merge="none",
        head="classification",
        classifier="per_branch",
        use_cls_token=True,
        num_classes=10,
    )
    model = PIIPBackbone(config)
    assert not torch.equal(model.classifier.fcs[1].weight, heads["b"])
    reports = model.load_pretrained()
    assert set(reports) == {"a", "b"}
    for k, spec in enumerate(specs):
        torch.testing.assert_close(model.classifier.fcs[k].weight, heads[spec.name])
