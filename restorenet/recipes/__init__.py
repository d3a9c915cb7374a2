"""Recipes: each system's adaptive idea trained and measured end to end.

    python -m restorenet.recipes ddsnet   [--quick] [--out DIR]   supernet, per-layer tailoring, gate
    python -m restorenet.recipes adarevd  [--quick] [--out DIR]   decoder columns, patch classifier, exits
    python -m restorenet.recipes hyperres [--quick] [--out DIR]   trained vs unseen levels, blind estimator
    python -m restorenet.recipes constyle [--quick] [--out DIR]   two-stage MoCo schedule, style on/off

Every recipe trains on random crops of the photos scikit-image ships (degraded
on the fly) and evaluates on the held-out photos, then writes ``report.md``,
``results.json`` and its plots into ``--out`` (default ``recipes/<system>``).
The default run is CPU-sized (tens of minutes on 2 cores); ``--quick`` is a
smoke run of every stage (under 2 minutes on 2 cores: the numbers mean little);
``--paper-config`` starts from the paper-size models. See each recipe module's
docstring for its stages and what it measures.
"""
from __future__ import annotations

import importlib

__all__ = ["RECIPES", "load_recipe"]

# system -> module (imported on use: a recipe pulls in its models only when run)
RECIPES: dict[str, str] = {
    "ddsnet": "restorenet.recipes.ddsnet",
    "adarevd": "restorenet.recipes.adarevd",
    "hyperres": "restorenet.recipes.hyperres",
    "constyle": "restorenet.recipes.constyle",
}


def load_recipe(system: str):
    """The recipe module of ``system``: it defines ``run(settings, report)`` and may
    define ``add_arguments(parser)`` for flags of its own."""
    if system not in RECIPES:
        raise ValueError(f"system must be one of {sorted(RECIPES)}, got {system!r}")
    return importlib.import_module(RECIPES[system])
