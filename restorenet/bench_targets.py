"""The issues' performance targets, checked against a benchmark JSON.

Every target of issues #3 to #7 is one :class:`Target`: which benchmarks it is
about (``select``), the number measured on each of them (``measure``, from the
benchmark and the means of its group's other strategies) and the bound. The
report (``python -m restorenet.bench_report``) prints one row per target, so a
committed GPU result shows every target with its measured ratio, or says that
nothing measured it.

Only GPU results count: the targets are stated for an H100/H200, and a CPU run
(the harness's smoke test) is reported as "not measured (CPU run)".
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["Target", "TARGETS", "TargetResult", "evaluate", "table_rows"]

FAST_BACKENDS = ("triton", "cuda")
HYPER_COMPOSITIONS = ("grouped", "linearity", "compiled_grouped", "compiled_linearity")
MEMORY_BOUND_GROUPS = ("elementwise ", "tile ")  # bench/test_bench_elementwise.py, tile ops in test_bench_restore.py
CONV_GROUPS = ("hyper_conv2d ", "slim_conv2d ")


class Measurement:
    """What a target sees of one benchmark: its extra_info, mean time, group and
    the mean time of each strategy in the same group (the alternatives)."""

    def __init__(self, bench: dict, peers: dict[str, float], all_benches: list[dict]):
        self.bench = bench
        self.info = bench.get("extra_info") or {}
        self.mean = bench["stats"]["mean"]
        self.group = str(bench.get("group") or "")
        self.peers = peers
        self._all = all_benches

    def get(self, key: str, default=None):
        return self.info.get(key, default)

    def peer_ratio(self, strategy: str) -> Optional[float]:
        """This benchmark's time over ``strategy``'s in the same group (>1: slower)."""
        other = self.peers.get(strategy)
        return self.mean / other if other else None

    def find(self, **fields) -> list["Measurement"]:
        """Benchmarks (anywhere in the file) whose extra_info has all ``fields``."""
        found = []
        for b in self._all:
            info = b.get("extra_info") or {}
            if all(info.get(k) == v for k, v in fields.items()):
                found.append(Measurement(b, {}, self._all))
        return found


@dataclass(frozen=True)
class Target:
    key: str
    issue: int
    claim: str                      # the issue's words, short
    metric: str                     # what the number is
    bound: float
    sense: str                      # "<=" or ">="
    select: Callable[[Measurement], bool]
    measure: Callable[[Measurement], Optional[float]]

    def met(self, value: float) -> bool:
        return {"<=": operator.le, ">=": operator.ge}[self.sense](value, self.bound)


@dataclass
class TargetResult:
    target: Target
    worst: Optional[float] = None   # the value furthest from the bound
    worst_name: Optional[str] = None
    passed: int = 0
    measured: int = 0
    note: str = ""

    @property
    def status(self) -> str:
        if self.note:
            return self.note
        if not self.measured:
            return "not measured (no benchmark matched)"
        return "met" if self.passed == self.measured else f"missed ({self.passed}/{self.measured} met)"


# ------------------------------------------------------------------ selectors
def _fast(m: Measurement) -> bool:
    return m.get("strategy") in FAST_BACKENDS


def _train_bf16(prefix: str) -> Callable[[Measurement], bool]:
    return lambda m: m.group.startswith(prefix) and m.get("dtype") == "bf16" and _fast(m)


def _mixed(m: Measurement) -> bool:
    return not str(m.get("mix", "")).startswith("uniform")


def _best_composition_speedup(m: Measurement) -> Optional[float]:
    times = [m.peers[s] for s in HYPER_COMPOSITIONS if m.peers.get(s)]
    return min(times) / m.mean if times else None


def _peak(m: Measurement) -> Optional[float]:
    return m.get("peak_mem_bytes")


def _memory_vs_k1(m: Measurement) -> Optional[float]:
    base = m.find(K=1, strategy=m.get("strategy"), dtype=m.get("dtype"))
    if not base or not _peak(m) or not _peak(base[0]):
        return None
    return _peak(m) / _peak(base[0])


def _memory_vs_peer(m: Measurement, strategy: str) -> Optional[float]:
    peer = [p for p in m.find(strategy=strategy, K=m.get("K"), dtype=m.get("dtype"))
            if p.group == m.group]
    if not peer or not _peak(m) or not _peak(peer[0]):
        return None
    return _peak(m) / _peak(peer[0])


def _ceiling_fraction(kind: str) -> Callable[[Measurement], Optional[float]]:
    def measure(m: Measurement) -> Optional[float]:
        ceiling = str(m.get("ceiling") or "")
        if kind == "copy" and ceiling != "copy_GBps":
            return None
        if kind == "matmul" and "matmul" not in ceiling:
            return None
        return m.get("fraction_of_ceiling")
    return measure


def _channels(m: Measurement) -> int:
    shape = m.get("shape")
    return int(shape[1]) if isinstance(shape, list) and len(shape) > 1 else 0


_REVERSIBLE = "reversible"
_ADAREVD_STEP = "adarevd train step"

TARGETS: tuple[Target, ...] = (
    Target("3.floor", 3, "hyper_conv2d bf16 fwd+bwd within 1.15x of the plain-conv floor",
           "time / floor (one shared kernel, F.conv2d)", 1.15, "<=",
           _train_bf16("hyper_conv2d fwd+bwd"), lambda m: m.peer_ratio("floor")),
    Target("3.compositions", 3, "hyper_conv2d bf16 fwd+bwd >= 1.8x faster than the best PyTorch composition",
           "best composition time / time", 1.8, ">=",
           _train_bf16("hyper_conv2d fwd+bwd"), _best_composition_speedup),
    Target("4.ideal", 4, "slim_conv2d mixed widths, bf16 fwd+bwd, within 1.15x of the FLOP-proportional ideal",
           "time / ideal", 1.15, "<=",
           lambda m: _train_bf16("slim_conv2d fwd+bwd")(m) and _mixed(m), lambda m: m.get("time_vs_ideal")),
    Target("4.grouping", 4, "slim_conv2d mixed widths >= 1.5x faster than grouping by width",
           "group_by_width time / time", 1.5, ">=",
           lambda m: _train_bf16("slim_conv2d fwd+bwd")(m) and _mixed(m),
           lambda m: (1 / r) if (r := m.peer_ratio("group_by_width")) else None),
    Target("4.uniform", 4, "slim_conv2d uniform width within 1.05x of cuDNN at that width",
           "time / cuDNN at the width", 1.05, "<=",
           lambda m: _train_bf16("slim_conv2d fwd+bwd")(m) and not _mixed(m),
           lambda m: m.peer_ratio("dense_at_width")),
    Target("5.memory", 5, "AdaRevD decoder step: peak memory at K=8 within 1.2x of K=1",
           "peak memory K=8 / K=1", 1.2, "<=",
           lambda m: m.group.startswith(_ADAREVD_STEP) and m.get("strategy") == _REVERSIBLE and m.get("K") == 8,
           _memory_vs_k1),
    Target("5.time", 5, "AdaRevD decoder step within 1.25x of plain autograd",
           "time / plain autograd (strategy autograd)", 1.25, "<=",
           lambda m: m.group.startswith(_ADAREVD_STEP) and m.get("strategy") == _REVERSIBLE and m.get("K", 0) > 1,
           lambda m: m.peer_ratio("autograd")),
    Target("5.checkpoint-time", 5, "AdaRevD decoder step faster than per-column checkpointing",
           "time / checkpoint time", 1.0, "<=",
           lambda m: m.group.startswith(_ADAREVD_STEP) and m.get("strategy") == _REVERSIBLE and m.get("K", 0) > 1,
           lambda m: m.peer_ratio("checkpoint")),
    Target("5.checkpoint-memory", 5, "... at equal or lower peak memory than per-column checkpointing",
           "peak memory / checkpoint's", 1.0, "<=",
           lambda m: m.group.startswith(_ADAREVD_STEP) and m.get("strategy") == _REVERSIBLE and m.get("K", 0) > 1,
           lambda m: _memory_vs_peer(m, "checkpoint")),
    Target("6.ideal", 6, "AdaRevD.restore (ragged batching) within 1.1x of the ideal",
           "time / ideal", 1.1, "<=",
           lambda m: m.group.startswith("adarevd restore") and m.get("strategy") == "batched",
           lambda m: m.get("time_vs_ideal")),
    Target("6.syncs", 6, "AdaRevD.restore: one host sync at most (the plain path's syncs gone)",
           "device-to-host syncs per restore", 1, "<=",
           lambda m: m.group.startswith("adarevd restore") and m.get("strategy") == "batched",
           lambda m: m.get("host_syncs")),
    Target("7.bandwidth", 7, "memory-bound kernels reach >= 80% of the measured copy bandwidth",
           "fraction of copy bandwidth", 0.8, ">=",
           lambda m: m.group.startswith(MEMORY_BOUND_GROUPS) and _fast(m), _ceiling_fraction("copy")),
    Target("7.matmul", 7, "conv kernels reach >= 50% of the measured matmul rate at >= 64 channels",
           "fraction of the matmul (roofline) bound", 0.5, ">=",
           lambda m: m.group.startswith(CONV_GROUPS) and _fast(m) and _channels(m) >= 64,
           _ceiling_fraction("matmul")),
)


def _group_means(benchmarks: list[dict]) -> dict[str, dict[str, float]]:
    means: dict[str, dict[str, float]] = {}
    for b in benchmarks:
        strategy = (b.get("extra_info") or {}).get("strategy")
        if strategy is not None and b.get("stats"):
            means.setdefault(str(b.get("group") or ""), {})[strategy] = b["stats"]["mean"]
    return means


def _on_gpu(bench: dict) -> bool:
    device = str((bench.get("extra_info") or {}).get("device") or "")
    return bool(device) and not device.lower().startswith("cpu")


def evaluate(benchmarks: list[dict]) -> list[TargetResult]:
    """One result per target: the worst measured value over the benchmarks it
    selects (GPU runs only) and how many of them meet the bound."""
    timed = [b for b in benchmarks if b.get("stats")]
    means = _group_means(timed)
    gpu = [b for b in timed if _on_gpu(b)]
    results = []
    for target in TARGETS:
        result = TargetResult(target)
        if timed and not gpu:
            result.note = "not measured (CPU run)"
        for b in gpu:
            m = Measurement(b, means.get(str(b.get("group") or ""), {}), gpu)
            if not target.select(m):
                continue
            value = target.measure(m)
            if value is None:
                continue
            result.measured += 1
            result.passed += target.met(value)
            further = (result.worst is None or
                       (value > result.worst if target.sense == "<=" else value < result.worst))
            if further:
                result.worst, result.worst_name = value, b.get("name")
        results.append(result)
    return results


def table_rows(benchmarks: list[dict]) -> list[dict[str, str]]:
    """Formatted rows for the report: one per target."""
    rows = []
    for r in evaluate(benchmarks):
        t = r.target
        rows.append({
            "issue": f"#{t.issue}",
            "target": t.claim,
            "bound": f"{t.metric} {t.sense} {t.bound:g}",
            "worst measured": "n/a" if r.worst is None else f"{r.worst:.3g} ({r.worst_name})",
            "status": r.status,
        })
    return rows
