"""The module paths of 0.1, kept importable for one release after the move to packages (0.2).

``import bitdance.checkpoint`` (or ``from bitdance.training_tasks import Task``) still works: the old name
becomes a module that forwards every attribute to the new homes listed in :data:`MOVED`, in order, and
says once, with a DeprecationWarning, where the names live now. The old paths go in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

__all__ = ["MOVED", "install", "old_module"]

MOVED: dict[str, tuple[str, ...]] = {
    "bitdance.quantizer": ("bitdance.models.quantizer",),
    "bitdance.tokenizer": ("bitdance.models.tokenizer",),
    "bitdance.head": ("bitdance.models.head",),
    "bitdance.transformer": ("bitdance.models.transformer",),
    "bitdance.t2i": ("bitdance.models.t2i", "bitdance.training.t2i_packing", "bitdance.training.t2i"),
    "bitdance.config": ("bitdance.models.config", "bitdance.models.presets"),
    "bitdance.sampler": ("bitdance.sampling.flow",),
    "bitdance.checkpoint": ("bitdance.formats.weights", "bitdance.formats.official", "bitdance.formats.folders",
                            "bitdance.files"),
    "bitdance.t2i_folder": ("bitdance.formats.t2i_folder",),
    "bitdance.pipeline": ("bitdance.pipelines.base", "bitdance.pipelines.class_conditional",
                          "bitdance.pipelines.text_to_image", "bitdance.formats.folders", "bitdance.images"),
    "bitdance.fid": ("bitdance.evaluation.fid",),
    "bitdance.training_config": ("bitdance.training.config",),
    "bitdance.training_tasks": ("bitdance.training.tasks",),
    "bitdance.t2i_training": ("bitdance.training.t2i_packing", "bitdance.training.t2i"),
    "bitdance.losses": ("bitdance.training.losses",),
    "bitdance.distributed": ("bitdance.training.distributed",),
    "bitdance.cli": ("bitdance.apps.cli", "bitdance.apps.commands", "bitdance.apps.eval_commands"),
    "bitdance.cli_commands": ("bitdance.apps.commands",),
    "bitdance.cli_eval": ("bitdance.apps.eval_commands",),
    "bitdance.bench": ("bitdance.apps.bench",),
    "bitdance.demo": ("bitdance.apps.demo",),
    "bitdance.studio": ("bitdance.apps.studio", "bitdance.apps.studio_jobs"),
    "bitdance.studio_jobs": ("bitdance.apps.studio_jobs",),
}


class _OldModule(types.ModuleType):
    """Stands in for a module that moved: attributes come from its new homes."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"Moved to {', '.join(homes)} (deprecated path, removed in 0.3).")
        self.__homes = homes

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self.__homes)}) has no "
                             f"attribute {attr!r}")

    def __dir__(self):
        return sorted({n for home in self.__homes for n in dir(importlib.import_module(home))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        homes = MOVED[spec.name]
        warnings.warn(f"{spec.name} has moved to {' / '.join(homes)}; the old path goes in bitdance 0.3",
                      DeprecationWarning, stacklevel=2)  # warnings skips importlib's frames
        return _OldModule(spec.name, homes)

    def exec_module(self, module):
        pass

    def get_code(self, fullname):
        """What ``python -m <old path>`` runs (runpy asks the loader for code): the new home, the first one
        listed, as the main module, after the same warning."""
        home = MOVED[fullname][0]
        message = f"{fullname} has moved to {home}; run python -m {home} (the old path goes in bitdance 0.3)"
        source = (f"import runpy, warnings\nwarnings.warn({message!r}, DeprecationWarning)\n"
                  f"runpy.run_module({home!r}, run_name='__main__', alter_sys=True)\n")
        return compile(source, f"<{fullname}: moved to {home}>", "exec")


_FINDER = _Finder()


def install() -> None:
    """Make the old module paths importable (done once by ``import bitdance``)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)


def old_module(name: str) -> types.ModuleType:
    """``bitdance.<name>`` for an old module name (the package's ``__getattr__``); AttributeError otherwise."""
    full = f"bitdance.{name}"
    if full not in MOVED:
        raise AttributeError(f"module 'bitdance' has no attribute {name!r}")
    return importlib.import_module(full)
