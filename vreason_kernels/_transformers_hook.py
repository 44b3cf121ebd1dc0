"""``attn_implementation="vreason"`` works after a plain ``import vreason_kernels``.

Registering means importing transformers, which costs seconds and is an optional
dependency, so ``import vreason_kernels`` does not do it eagerly. Instead:

- transformers' model code already imported: register now;
- not yet imported: a meta-path finder waits for ``transformers.modeling_utils`` (where
  ``AttentionInterface`` lives and where ``attn_implementation`` is checked) and registers
  right after that module has run, before any model can be built. The finder only wraps
  that one module's loader; transformers' code is not changed.

``import vreason_kernels.integrations`` still registers at once, as before.
"""

import importlib.abc
import sys
import warnings

_TARGET = "transformers.modeling_utils"


def _register() -> None:
    try:
        from vreason_kernels.integrations.transformers import register

        register()
    except Exception as exc:  # never break the user's import of transformers
        warnings.warn(f"vreason_kernels: could not register attn_implementation='vreason' ({exc!r})", stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one-shot: the next import of it is the real one
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if transformers' model code is loaded, else when it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
