"""Run a callback right after a module is imported (or now, if it already is).

verl's plugin loader imports us in every process, but most processes never import the trainer or the
engine modules we patch; importing them eagerly would cost seconds per Ray worker. So a patch is
attached to its module's import instead: `when_imported("verl.trainer.ppo.ray_trainer", fn)`.

This matters for `python -m verl.trainer.main_ppo` too: that module runs as `__main__` and binds
`need_critic` / `validate_config` with `from ... import ...`, so the source modules must be patched
the moment they finish executing, before `__main__` copies the names.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType

__all__ = ["cancel_hooks", "when_imported"]

logger = logging.getLogger(__name__)

_lock = threading.RLock()
_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` now if `name` is imported, else right after its first import."""
    with _lock:
        module = sys.modules.get(name)
        if module is None or getattr(getattr(module, "__spec__", None), "_initializing", False):
            _pending.setdefault(name, []).append(callback)
            if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    callback(module)


def cancel_hooks(owner: str) -> None:
    """Drop the pending callbacks whose `__module__` starts with `owner` (used by the revert functions)."""
    with _lock:
        for name in list(_pending):
            _pending[name] = [cb for cb in _pending[name] if not getattr(cb, "__module__", "").startswith(owner)]
            if not _pending[name]:
                del _pending[name]


def _run(name: str, module: ModuleType) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
    for callback in callbacks:
        callback(module)


class _Loader(importlib.abc.Loader):
    """Wraps the real loader: execute the module, then run its callbacks."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run(self._name, module)

    def __getattr__(self, item):  # get_source, get_filename, is_package, ... for tools that ask the loader
        return getattr(self._loader, item)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a hooked name it asks the other finders and wraps the loader."""

    _busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        with _lock:
            if fullname not in _pending:
                return None
        if getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.name = None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, fullname)
        return spec
