"""Import the official PIIP code (github.com/OpenGVLab/PIIP) on a CPU machine without mmcv, mmdet or CUDA.

Used only by the fixture scripts in this folder; nothing in `piip` imports it. It never copies upstream code:
it puts the official folders on `sys.path`, registers small stand-ins for the mmcv/mmdet/mmseg names the
backbone files import (a registry decorator, a logger, `BaseModule`), and replaces the compiled deformable
op's `apply` by the official pure-PyTorch function (`ms_deform_attn_core_pytorch`), as the issue prescribes.

One process imports one code base (classification, mmdetection, mmsegmentation or llava): they each ship a
top-level `ops` package with different contents.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path

from torch import nn

CODE_BASES = ("classification", "mmdetection", "mmsegmentation", "llava")


class _Registry:
    """Stands in for mmcv's `Registry`: `@BACKBONES.register_module()` returns the class unchanged."""

    def __init__(self) -> None:
        self.classes: dict[str, type] = {}

    def register_module(self, *args, **kwargs):
        def register(cls: type) -> type:
            self.classes[cls.__name__] = cls
            return cls

        return register(args[0]) if args and isinstance(args[0], type) else register


class _BaseModule(nn.Module):
    """mmcv's `BaseModule` minus its init-config machinery (the fixtures set every weight themselves)."""

    def __init__(self, init_cfg=None) -> None:
        super().__init__()
        self.init_cfg = init_cfg


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _refuse_checkpoint(*args, **kwargs):
    raise RuntimeError("fixture generation never loads pretrained files (set every `pretrained` to a name)")


def install_stubs() -> _Registry:
    """mmcv / mmdet / mmseg names the backbone files import; returns the shared backbone registry."""
    backbones = _Registry()
    logger = lambda *a, **k: logging.getLogger("official")  # noqa: E731
    for package in ("mmdet", "mmseg"):
        _module(package, __path__=[])
        _module(f"{package}.models", __path__=[])
        _module(f"{package}.models.builder", BACKBONES=backbones, NECKS=_Registry(), HEADS=_Registry())
        _module(f"{package}.utils", get_root_logger=logger)
    _module("mmcv", __path__=[])
    _module("mmcv.runner", BaseModule=_BaseModule, load_checkpoint=_refuse_checkpoint)
    _module("mmcv_custom", load_checkpoint=_refuse_checkpoint)
    _module("MultiScaleDeformableAttention")  # the compiled op; `apply` is replaced below
    return backbones


def _use_pytorch_deformable(functions_module: str) -> None:
    """Route the compiled op to the official pure-PyTorch implementation of the same sampling."""
    functions = importlib.import_module(functions_module)
    core = functions.ms_deform_attn_core_pytorch

    def apply(value, shapes, level_start, locations, weights, im2col_step=64):
        return core(value, shapes, locations, weights)

    for name in ("MSDeformAttnFunction", "MSDeformAttnFunctionOptimized"):
        if hasattr(functions, name):
            getattr(functions, name).apply = staticmethod(apply)


def _skip_pretrained_files(modules: dict[str, types.ModuleType]) -> None:
    """The official branch constructors load their `pretrained` file themselves; the fixtures pass only a
    name (it selects the branch class: 'deit', 'beit', 'perceiver', ...) and randomise every weight after."""
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith(("official_", "deit", "intern_vit", "piip_")):
            continue
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, nn.Module) and "init_weights" in vars(value):
                value.init_weights = lambda self, pretrained=None: None


def _package_alias(alias: str, folder: Path) -> None:
    """A package named `alias` over `folder` whose `__init__` is never run (it imports all of mmdet)."""
    _module(alias, __path__=[str(folder)])


def load(official: Path, code_base: str) -> dict[str, types.ModuleType]:
    """Import the backbone modules of one official code base; returns them by file name."""
    official = Path(official).resolve()
    if code_base not in CODE_BASES:
        raise ValueError(f"code base must be one of {CODE_BASES}, got {code_base!r}")
    if not (official / code_base).is_dir():
        raise FileNotFoundError(f"{official / code_base}: not found; pass the root of a PIIP checkout")
    install_stubs()
    modules: dict[str, types.ModuleType] = {}
    if code_base == "classification":
        sys.path.insert(0, str(official / "classification"))
        _use_pytorch_deformable("ops.functions.ms_deform_attn_func")
        for name in ("piip_2branch", "piip_3branch", "piip_4branch", "deit", "intern_vit_6b", "piip_modules"):
            modules[name] = importlib.import_module(name)
        _skip_pretrained_files(modules)
        return modules
    if code_base == "llava":
        root = official / "llava"
        sys.path.insert(0, str(root))
        _package_alias("official_llava_piip", root / "llava/model/multimodal_encoder/piip")
        _package_alias("official_llava_piip.ops", root / "llava/model/multimodal_encoder/piip/ops")
        _use_pytorch_deformable("official_llava_piip.ops.functions.ms_deform_attn_func")
        for name in ("modeling_piip_2branch", "modeling_piip_2branch_mix", "configuration_piip_2branch"):
            modules[name] = importlib.import_module(f"official_llava_piip.{name}")
        _skip_pretrained_files(modules)
        return modules
    package = {"mmdetection": "mmdet", "mmsegmentation": "mmseg"}[code_base]
    sys.path.insert(0, str(official / "mmdetection"))  # both use mmdetection/ops (upstream links it)
    _use_pytorch_deformable("ops.deformable_attention.functions.ms_deform_attn_func")
    alias = f"official_{package}_backbones"
    _package_alias(alias, official / code_base / package / "models/backbones")
    names = ["piip_2branch", "piip_3branch", "piip_modules"]
    names += ["piip_4branch", "deit"] if code_base == "mmdetection" else []  # deit: the ViT baselines
    for name in names:
        modules[name] = importlib.import_module(f"{alias}.{name}")
    _skip_pretrained_files(modules)
    return modules


def sequential_downsampling(model: nn.Module) -> nn.Module:
    """Recent transformers hold ConvNeXt's downsampling layers in ModuleLists (empty for stage 0); the
    official wrapper (written for transformers 4.3x) expects a Sequential or an Identity. Same children,
    same keys, same forward."""
    for stage in model.encoder.stages:
        layers = stage.downsampling_layer
        if isinstance(layers, nn.ModuleList):
            stage.downsampling_layer = nn.Sequential(*layers) if len(layers) else nn.Identity()
    return model
