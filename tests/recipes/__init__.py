"""Recipe tests. A package (unlike the other test folders) because its modules share
basenames with tests/models (test_ddsnet.py, test_adarevd.py, test_hyperres.py): as
top-level modules pytest would refuse to collect both in one run."""

import json


def run_quick(system: str, tmp_path_factory, *flags: str, out=None):
    """``python -m restorenet.recipes SYSTEM --quick --threads 1`` into ``out`` (default: a
    fresh folder).
    Checks what every recipe's run must hold -- it completed, and results.json holds
    the results it returned -- and returns ``(out_dir, results)``."""
    from restorenet.recipes.common import main

    out = tmp_path_factory.mktemp(system) if out is None else out
    results = main([system, "--quick", "--threads", "1", "--out", str(out), *flags])
    assert results["status"] == "complete"
    assert json.loads((out / "results.json").read_text()) == results
    return out, results
