"""scripts/gpu_check.sh stays runnable: valid bash, and its test selection
(scripts/gpu_tests.txt) names tests that exist, covering every op file."""
import ast
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SELECTION = [ln.strip() for ln in (ROOT / "scripts" / "gpu_tests.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]


@functools.cache
def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_selected_test_exists():
    missing = []
    for node in SELECTION:
        path, _, rest = node.partition("::")
        name = re.match(r"\w+", rest)[0]
        if not (ROOT / path).exists() or name not in _test_functions(ROOT / path):
            missing.append(node)
    assert not missing, missing


def test_selection_covers_every_op_backend_and_64_bit_indexing():
    files = {node.split("::")[0] for node in SELECTION}
    ops = {p.stem.removesuffix("_cuda") for p in (ROOT / "tests" / "ops").glob("test_*_cuda.py")}
    for op in ops:
        assert f"tests/ops/{op}_cuda.py" in files and f"tests/ops/{op}.py" in files, op
    assert sum("more_than_2_pow_31" in n for n in SELECTION) >= 2
    assert any("bfloat16" in n for n in SELECTION)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
