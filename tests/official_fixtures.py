"""Reading the golden fixtures of `benchmarks/official/make_fixtures.py`, and the piip model that matches
each tiny official model (what its kwargs mean in piip's config; PAPER.md §1-3)."""

from __future__ import annotations

from pathlib import Path

import torch

from piip.models.backbone.config import BranchSpec, InteractionConfig, PIIPConfig, WindowConfig

FIXTURES = Path(__file__).parent / "fixtures" / "official"
# a baseline has no interactions; these only fill the config (PIIPConfig needs them, nothing uses them)
INTERACTION_DEFAULTS = dict(
    deform_num_heads=4, n_points=4, deform_ratio=0.5, with_cffn=True, cffn_ratio=0.25, interaction_proj=True
)


def unpack(packed: dict) -> dict[str, torch.Tensor]:
    """The state dict `make_fixtures.pack` stored as one fp16 buffer, back in float32."""
    out, offset = dict(packed["other"]), 0
    for key, shape in zip(packed["keys"], packed["shapes"], strict=True):
        size = int(torch.Size(shape).numel())
        out[key] = packed["values"][offset : offset + size].float().reshape(shape)
        offset += size
    return out


def read(case: str) -> dict:
    return torch.load(FIXTURES / f"{case}.pt", map_location="cpu", weights_only=True)


def branch_spec(name: str, kwargs: dict, record: dict) -> BranchSpec:
    """An official branch's kwargs as a piip branch: upstream's class is chosen by its `pretrained` name."""
    pretrained = kwargs.get("pretrained") or ""
    if "convnext" in pretrained:
        config = record["convnext_config"]
        return BranchSpec(
            name=name,
            family="convnext",
            timm_model="convnext_tiny",
            timm_kwargs=dict(dims=config["hidden_sizes"], depths=config["depths"], ls_init_value=0.5),
            interaction_indexes=kwargs["interaction_indexes"],
        )
    internvit = kwargs.get("model_type") == "augreg" or "internvit" in pretrained
    timm_kwargs = dict(
        embed_dim=kwargs["embed_dim"],
        depth=kwargs["depth"],
        num_heads=kwargs["num_heads"],
        qkv_bias=kwargs["qkv_bias"],
        init_values=kwargs.get("init_values", kwargs.get("init_scale", 1.0)),
        class_token=True,
        no_embed_class=not internvit,
    )
    return BranchSpec(
        name=name,
        family="vit",
        timm_model="vit_base_patch16_224",
        timm_kwargs=timm_kwargs,
        norm="rmsnorm" if kwargs.get("norm_layer_type") == "RMSNorm" else "layernorm",
        qk_norm="all" if kwargs.get("qk_normalization") else "none",
        window_pad="tokens" if internvit else "qkv",
        interaction_indexes=kwargs["interaction_indexes"],
    )


def interaction_config(kwargs: dict) -> InteractionConfig:
    """Upstream's interaction kwargs (`deform_num_heads`, `n_points`, ...) as piip's (drop path off: eval)."""
    return InteractionConfig(
        num_heads=kwargs["deform_num_heads"],
        num_points=kwargs["n_points"],
        ratio=kwargs["deform_ratio"],
        with_cffn=kwargs["with_cffn"],
        cffn_ratio=kwargs["cffn_ratio"],
        drop_path=0.0,
        with_proj=kwargs.get("interaction_proj", True),
        norm="none" if kwargs.get("norm_layer") == "none" else "layernorm",
    )


def piip_config(record: dict) -> PIIPConfig:
    """The piip config of a fixture's official model: branches reversed (smallest model first)."""
    kwargs = record["official_kwargs"]
    if record["official_class"] == "deit.vit_models":  # a single-branch baseline: the branch itself
        branch = dict(kwargs, interaction_indexes=[[0, kwargs["depth"] - 1]], real_size=112)
        kwargs = dict(INTERACTION_DEFAULTS, branch1=branch)
    official = sorted((k for k in kwargs if k.startswith("branch")), reverse=True)
    specs = [branch_spec(f"b{k[-1]}", kwargs[k], record) for k in official]
    if record["official_class"] == "piip_4branch.PIIPFourBranch":  # upstream: branch4 = vit_models(**branch3)
        specs[0] = branch_spec(
            "b4",
            dict(
                kwargs["branch3"], **{k: kwargs["branch4"][k] for k in ("interaction_indexes", "real_size")}
            ),
            record,
        )
    resolutions = [kwargs[k].get("real_size") or kwargs[k]["img_size"] for k in official]
    windowed = [kwargs[k]["window_size"] for k in official if kwargs[k].get("window_size")]
    pattern = [w if w > 0 else None for w in (windowed[0] if windowed else [])]
    windows = [w for w in pattern if w]
    global_every = pattern.index(None) + 1 if None in pattern else None
    classification = "num_classes" in kwargs
    separate = kwargs.get("separate_head", False)
    merge = "regular_fpn" if kwargs.get("with_simple_fpn") is False else "simple_fpn"
    return PIIPConfig(
        branches=specs,
        resolutions=resolutions,
        num_interactions=len(kwargs[official[0]]["interaction_indexes"]),
        interaction=interaction_config(kwargs),
        window=WindowConfig(size=windows[0], global_every=global_every) if windows else None,
        pyramid_norm="layernorm" if record["official_class"] == "deit.vit_models" else "groupnorm",
        merge=("none" if separate else "classification") if classification else merge,
        out_interaction_indexes=list(kwargs.get("out_interaction_indexes", [])),
        head="classification" if classification else "pyramid",
        classifier="per_branch" if separate else "merged",
        classifier_token="first_patch",  # upstream's separate heads read x[:, 0] after the cls split
        num_classes=kwargs.get("num_classes", 1000),
        use_cls_token=classification,
        pos_embed_at_resolution=classification
        or record["official_class"].startswith("piip_2branch")
        and "img_size" in kwargs[official[0]],
    )
