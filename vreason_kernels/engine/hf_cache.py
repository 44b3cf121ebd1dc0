"""The KV-cache argument of transformers' models and decoder layers, across versions.

transformers 5.24 renamed the cache argument and output field ``past_key_values`` to
``cache`` (the old name is deprecated until 5.40); the GPU image's 5.17 knows only
``past_key_values``. Passing the old name to a new layer that already received ``cache``
from its model would silently keep (and update) the real cache, so the engine asks each
callable which name it takes instead of guessing.
"""

import inspect
from functools import lru_cache

_NAMES = ("cache", "past_key_values")


@lru_cache(maxsize=None)
def _cache_argument(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(module, cache) -> dict:
    """``{name: cache}`` under the name ``module.forward`` takes."""
    return {_cache_argument(type(module).forward): cache}


def replace_cache_kwarg(kwargs: dict, cache) -> dict:
    """``kwargs`` captured from a layer call, with its cache argument (either name) set to ``cache``."""
    out = {k: v for k, v in kwargs.items() if k not in _NAMES}
    name = next((n for n in _NAMES if n in kwargs), "past_key_values")
    out[name] = cache
    return out


def output_cache(output):
    """The cache a model returned (``output.cache`` from 5.24 on, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
