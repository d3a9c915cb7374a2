"""pytest hooks and fixtures for the benchmarks (``pytest bench/ --benchmark-only``).

* ``gpu_only`` marker: skipped, with its reason, where no CUDA device exists.
* ``pytest_benchmark_update_machine_info``: adds ``machine_info["restorenet"]``
  (device, driver, torch/CUDA/cuDNN/triton versions, commit, and on GPU the
  measured ceilings: copy bandwidth, bf16/tf32/fp32 matmul rates).
* ``pytest_benchmark_update_json``: writes the time ratios to each benchmark's
  named baselines (``extra_info["time_vs_baseline"]``, ``["time_vs"]``).
"""
from __future__ import annotations

import pytest
import torch

from bench import _util
from restorenet.bench_report import add_ratios


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: needs a CUDA device (skipped on CPU machines)")


def pytest_collection_modifyitems(config, items):
    if _util.ON_GPU:
        return
    skip = pytest.mark.skip(reason=_util.GPU_ONLY_REASON)
    for item in items:
        if item.get_closest_marker("gpu_only"):
            item.add_marker(skip)


def pytest_report_header(config):
    return (f"restorenet bench: device {_util.DEVICE} ({_util.device_name()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} CPU threads, target {_util.TARGET_S:g} s of timed work per benchmark")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["restorenet"] = _util.environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    add_ratios(output_json.get("benchmarks", []))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
    if _util.ON_GPU:  # leave no cached blocks from one case to the next
        torch.cuda.empty_cache()
