"""Shared fixtures for the piip.models tests: tiny timm branches (test_vit, test_convnext), a PIIP builder.

All models here are deliberately tiny (widths 32-96, depth 2-4, grids of at most 32x32) so that each test
runs in well under a second on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from piip.models import BranchSpec, InteractionConfig, PIIPBackbone, PIIPConfig

# As train.py does: before torch starts its thread pool, so every intra-op thread flushes subnormals.
torch.set_flush_denormal(True)

# ConvNeXt `test_convnext` flattened into 12 blocks: 1 + (1 + 2) + (1 + 4) + (1 + 2).
# These interaction stages end at blocks 0 / 3 / 8 / 11, i.e. at strides 4 / 8 / 16 / 32.
CONVNEXT_STRIDE_STAGES = [[0, 0], [1, 3], [4, 8], [9, 11]]


def make_vit_spec(
    name: str = "vit", dim: int = 32, depth: int = 2, heads: int = 1, **spec_kwargs
) -> BranchSpec:
    """A tiny timm `test_vit` branch (patch 16, stored pos-embed grid 14x14 unless overridden)."""
    return BranchSpec(
        name=name,
        family="vit",
        timm_model="test_vit",
        timm_kwargs=dict(embed_dim=dim, depth=depth, num_heads=heads),
        **spec_kwargs,
    )


def make_convnext_spec(name: str = "cnx", **spec_kwargs) -> BranchSpec:
    """A timm `test_convnext` branch: 12 flattened blocks, widths 24/32/48/64 at strides 4/8/16/32."""
    return BranchSpec(name=name, family="convnext", timm_model="test_convnext", **spec_kwargs)


def make_piip_config(branches: list[BranchSpec], resolutions: list[int], **overrides) -> PIIPConfig:
    """A `PIIPConfig` with test-friendly defaults: 2 interaction heads, no interaction drop-path."""
    overrides.setdefault("interaction", InteractionConfig(num_heads=2, drop_path=0.0))
    overrides.setdefault("num_interactions", 2)
    return PIIPConfig(branches=branches, resolutions=resolutions, **overrides)


@pytest.fixture(autouse=True)
def seeded_torch() -> None:
    """Every test starts from the same RNG state, so random inputs and initialisations are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def vit_spec() -> Callable[..., BranchSpec]:
    """Factory fixture: `vit_spec(name, dim, depth=2, heads=1, **BranchSpec fields)`."""
    return make_vit_spec


@pytest.fixture
def convnext_spec() -> Callable[..., BranchSpec]:
    """Factory fixture: `convnext_spec(name, **BranchSpec fields)`."""
    return make_convnext_spec


@pytest.fixture
def piip_config() -> Callable[..., PIIPConfig]:
    """Factory fixture: `piip_config(branches, resolutions, **PIIPConfig fields)`."""
    return make_piip_config


@pytest.fixture
def build_piip() -> Callable[..., PIIPBackbone]:
    """Factory fixture: `build_piip(branches, resolutions, **PIIPConfig fields)` in eval mode."""

    def build(branches: list[BranchSpec], resolutions: list[int], **overrides) -> PIIPBackbone:
        return PIIPBackbone(make_piip_config(branches, resolutions, **overrides)).eval()

    return build


@pytest.fixture
def convnext_stride_stages() -> list[list[int]]:
    """Interaction indexes for `test_convnext` whose 4 stages end at strides 4, 8, 16 and 32."""
    return [list(pair) for pair in CONVNEXT_STRIDE_STAGES]
