"""Registers moat's variants with timm when timm is imported, without importing timm.

``timm.create_model("moat_0")`` needs ``moat.integrations.timm_registry`` imported, but ``import moat``
must stay free of timm (it costs seconds). So ``install()`` registers right away if timm is
already loaded, and otherwise adds an import hook that registers right after timm loads.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

REGISTRY = "moat.integrations.timm_registry"


class _RegisterAfterLoading(importlib.abc.Loader):
    """timm's own loader, then the registration."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _uninstall()
        try:
            importlib.import_module(REGISTRY)
        except ImportError as err:  # e.g. a timm without the API we use: timm still works
            warnings.warn(f"moat's models are not registered in this timm ({err}); "
                          "use moat.create_model instead", stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # resources, file names, ...: timm's loader
        return getattr(self._loader, name)


class _TimmFinder(importlib.abc.MetaPathFinder):
    _busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != "timm" or self._busy:
            return None
        self._busy = True
        try:  # the real spec, from the finders after this one
            spec = importlib.util.find_spec("timm")
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


_FINDER = _TimmFinder()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    if "timm" in sys.modules:
        importlib.import_module(REGISTRY)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
