"""Name -> class registries whose entries live one per module: `family: convnext` is the `Branch`
subclass in `piip.models.branches.convnext`, `detector.name: mask_rcnn` the `Detector` in
`piip.models.heads.mask_rcnn`.
A class registers itself when its module is imported; a lookup imports the module named like the entry, so
adding one is adding one file, and nothing else lists them."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

from piip.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, package: str, kind: str) -> None:
        self.package, self.kind = package, kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T]) -> None:
        self._classes[name] = cls

    def get(self, name: str, where: str) -> type[T]:
        """The class registered as `name`; `where` starts the error message (the config key to fix)."""
        if name not in self._classes and name in self._module_names():
            importlib.import_module(f"{self.package}.{name}")
        if name not in self._classes:
            raise ConfigError(f"{where}: unknown {self.kind} {name!r}; expected one of {self.names()}")
        return self._classes[name]

    def names(self) -> list[str]:
        """Every registered name, after importing every module of the package."""
        for module in self._module_names():
            importlib.import_module(f"{self.package}.{module}")
        return sorted(self._classes)

    def _module_names(self) -> list[str]:
        package = importlib.import_module(self.package)
        return [module.name for module in pkgutil.iter_modules(package.__path__)]
