"""Model registry: ``create_model(name, **cfg)`` and ``list_models()``.

Each model file registers a factory with :func:`register_model`; the factory's
keyword defaults are the paper's configuration, so ``create_model(name)`` builds
the published model and kwargs (``width=16`` ...) shrink it for tests.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

_FACTORIES: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``factory`` under ``name`` (lower-case, unique)."""

    def wrap(factory: Callable[..., nn.Module]):
        if name in _FACTORIES:
            raise ValueError(f"model {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    _import_models()
    return sorted(_FACTORIES)


def create_model(name: str, weights=None, **cfg) -> nn.Module:
    """Build model ``name``; ``cfg`` overrides the paper's default config.

    ``weights``: an authors' released checkpoint (a path or a loaded object) to load,
    converted to our layout (``restorenet.weights.from_released``; the model is then
    returned in eval mode)."""
    if weights is not None:
        from restorenet.weights import from_released

        return from_released(name, weights, **cfg)
    _import_models()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown model name={name!r}; choose one of {sorted(_FACTORIES)}"
        ) from None
    return factory(**cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device: no memory needed)."""
    return sum(p.numel() for p in model.parameters())


def _import_models() -> None:
    # Importing the package runs every model file's @register_model.
    import restorenet.models  # noqa: F401
