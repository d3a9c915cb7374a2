"""The profiler trace summary of bench/test_bench_restore.py (host syncs, copies and
launches of one call) on known calls: it must count every ``.item()`` and boolean-mask
read, and nothing the profiler itself does."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) leaves the repo root out
    sys.path.insert(0, str(ROOT))

_threads = torch.get_num_threads()
from bench.test_bench_restore import host_syncs, trace_summary, trace_table  # noqa: E402

torch.set_num_threads(_threads)  # bench._util pins CPU benchmarks to one thread on import


def test_counts_one_item_sync():
    x = torch.arange(6.0)
    counts = trace_summary(lambda: x.sum().item())
    assert counts["aten::item"] == 1 and counts["aten::_local_scalar_dense"] == 1
    assert counts["aten::nonzero"] == 0
    assert host_syncs(counts) == 1
    assert counts["aten_ops"] == 2  # sum and item; _local_scalar_dense runs inside item


def test_counts_every_read_and_nothing_else():
    x = torch.arange(6.0) - 2
    assert host_syncs(trace_summary(lambda: x * 2)) == 0
    counts = trace_summary(lambda: (int(x.max()), bool(x.min() < 0)))
    assert counts["aten::_local_scalar_dense"] == 2 and host_syncs(counts) == 2
    counts = trace_summary(lambda: x[x > 0])  # a boolean mask: a hidden nonzero
    assert counts["aten::nonzero"] == 1 and counts["aten::index"] == 1
    assert host_syncs(counts) == 1


def test_empty_call_counts_nothing():
    counts = trace_summary(lambda: None)
    assert set(counts.values()) == {0}, counts


def test_table_rows_and_device_columns():
    counts = trace_summary(lambda: torch.ones(2).sum().item())
    cpu = trace_table([{"case": "one item", **counts}], on_gpu=False)
    header, rule, row = cpu.strip().splitlines()
    cells = [c.strip() for c in row.strip("|").split("|")]
    titles = [c.strip() for c in header.strip("|").split("|")]
    assert rule.count("|") == header.count("|")
    assert cells[0] == "one item" and cells[titles.index("scalar reads")] == "1"
    assert cells[titles.index("DtoH copies")] == "-" and cells[titles.index("kernel launches")] == "-"
    gpu = trace_table([{"case": "one item", **counts}], on_gpu=True)
    assert "| one item | 0 | 0 | 1 |" in gpu
