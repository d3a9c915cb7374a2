"""Turn a pytest-benchmark JSON (from ``pytest bench/ --benchmark-json=R.json``)
into a markdown report and plots::

    python -m restorenet.bench_report R.json [--out DIR]
    python -m restorenet.bench_report PART1.json PART2.json --stem NAME   # a split run

Writes ``DIR/<stem>.md`` (DIR defaults to the JSON's folder) with a header
naming the device, driver, torch, triton and commit, one table row per
benchmark (group, name, mean time, TFLOP/s or GB/s, time vs the named
baseline, time vs the benchmark's computed ideal where it has one, peak memory, fraction of the measured ceiling), a table of the
issues' targets with the worst measured value of each (restorenet.bench_targets),
and PNGs next to it:

* ``<stem>-time-vs-size.png``   benchmarks with ``series``/``size`` in extra_info;
* ``<stem>-memory-vs-K.png``    benchmarks with ``K`` (peak memory and time vs K);
* ``<stem>-time-vs-width-mix.png`` benchmarks with ``width_mix``.

A plot whose benchmarks are absent is skipped. The extra_info keys are the
ones bench/_util.py writes (see its docstring).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from restorenet import bench_targets

__all__ = ["load", "merge", "add_ratios", "table_rows", "render_markdown", "write_plots", "write_report", "main"]


def load(path: str | os.PathLike) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"path {str(path)!r} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    return data


# ------------------------------------------------------------------- ratios
def add_ratios(benchmarks: list[dict]) -> None:
    """Write ``time_vs`` ({baseline: mean / baseline mean}), ``baseline`` (the
    first name), ``time_vs_baseline`` and ``mem_vs`` ({baseline: peak memory /
    baseline peak memory}) into the extra_info of every benchmark entry that
    lists ``baselines``, matching them by ``strategy`` within its group. A
    baseline that did not run, or that two benchmarks of the group claim, gives
    None. Used by bench/conftest.py and :func:`write_report`."""
    by_group: dict[Any, dict[str, Optional[dict]]] = {}
    for b in benchmarks:
        strategy = (b.get("extra_info") or {}).get("strategy")
        if strategy is not None and b.get("stats"):
            peers = by_group.setdefault(b.get("group"), {})
            peers[strategy] = None if strategy in peers else b  # claimed twice: ambiguous
    for b in benchmarks:
        info = b.get("extra_info") or {}
        names = info.get("baselines") or []
        if not names or not b.get("stats"):
            continue
        peers = by_group.get(b.get("group"), {})
        info["time_vs"] = {name: _ratio(b["stats"]["mean"], _stat(peers.get(name), "mean")) for name in names}
        info["mem_vs"] = {name: _ratio(info.get("peak_mem_bytes"), _stat(peers.get(name), "peak_mem_bytes"))
                          for name in names}
        info["baseline"] = names[0]
        info["time_vs_baseline"] = info["time_vs"][names[0]]


def _stat(bench: Optional[dict], key: str) -> Optional[float]:
    if bench is None:
        return None
    return bench["stats"]["mean"] if key == "mean" else (bench.get("extra_info") or {}).get(key)


def _ratio(value: Optional[float], other: Optional[float]) -> Optional[float]:
    return value / other if value is not None and other else None


# ------------------------------------------------------------------ formatting
def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_rate(info: dict) -> str:
    parts = []
    tflops, gbps = info.get("TFLOPs"), info.get("GBps")
    if tflops is not None:
        parts.append(f"{tflops:.3g} TFLOP/s" if tflops >= 0.1 else f"{tflops * 1e3:.3g} GFLOP/s")
    if gbps is not None:
        parts.append(f"{gbps:.3g} GB/s")
    return " / ".join(parts) or "n/a"


def fmt_ratio(info: dict) -> str:
    ratio, base = info.get("time_vs_baseline"), info.get("baseline")
    if ratio is None or base is None:
        return f"n/a ({base} missing)" if base else "-"
    return f"{ratio:.3g}x {base}"


def fmt_vs_ideal(info: dict) -> str:
    """Time over a computed ideal (e.g. active FLOPs at the dense rate), where the benchmark has one."""
    ratio = info.get("time_vs_ideal")
    return "-" if ratio is None else f"{ratio:.3g}x"


def fmt_fraction(info: dict) -> str:
    frac = info.get("fraction_of_ceiling")
    return "n/a" if frac is None else f"{100 * frac:.3g}%"


# ----------------------------------------------------------------------- table
def table_rows(data: dict) -> list[dict[str, str]]:
    """One formatted row per benchmark, ordered by group then mean time."""
    rows = []
    benches = sorted(data["benchmarks"], key=lambda b: (str(b.get("group")), b["stats"]["mean"]))
    for b in benches:
        info = b.get("extra_info") or {}
        rows.append({
            "group": str(b.get("group") or "-"),
            "name": b.get("name", "?"),
            "mean": fmt_time(b["stats"]["mean"]),
            "rate": fmt_rate(info),
            "vs baseline": fmt_ratio(info),
            "vs ideal": fmt_vs_ideal(info),
            "peak memory": fmt_bytes(info.get("peak_mem_bytes")),
            "of ceiling": fmt_fraction(info),
        })
    return rows


def _md_table(rows: Sequence[dict[str, str]]) -> list[str]:
    if not rows:
        return ["(no benchmarks in this file)"]
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(r[c].replace("|", "\\|") for c in cols) + " |")
    return out


def environment(data: dict) -> dict[str, str]:
    """Header fields from machine_info (with our bench's additions) and commit_info."""
    mi = data.get("machine_info") or {}
    rn = mi.get("restorenet") or {}
    ci = data.get("commit_info") or {}
    commit = ci.get("id")
    if commit and commit != "unknown":
        commit = commit + (" (dirty)" if ci.get("dirty") else "") + (
            f" on {ci['branch']}" if ci.get("branch") else "")
    else:
        commit = rn.get("commit") or f"unknown ({ci.get('error', 'no commit info')})"
    cpu = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or mi.get("machine")
    torch_line = str(rn.get("torch", "unknown"))
    if rn.get("torch_cuda"):
        torch_line += f" (CUDA {rn['torch_cuda']}, cuDNN {rn.get('cudnn')})"
    ceil = rn.get("ceilings") or {}
    ceil_line = ", ".join(f"{k} {v:.4g}" for k, v in ceil.items() if isinstance(v, (int, float)))
    return {
        "device": str(rn.get("device") or cpu or "unknown"),
        "driver": str(rn.get("driver") or "n/a"),
        "torch": torch_line,
        "triton": str(rn.get("triton") or "not installed"),
        "commit": str(commit),
        "host": f"{mi.get('node', '?')}, {cpu or '?'}, Python {mi.get('python_version', '?')}",
        "ceilings (measured)": ceil_line or "not measured (no GPU)",
        "date": str(data.get("datetime", "unknown")),
        "pytest-benchmark": str(data.get("version", "?")),
    }


def render_markdown(data: dict, plots: Sequence[str | os.PathLike] = (), title: Optional[str] = None) -> str:
    env = environment(data)
    lines = [f"# {title or 'restorenet benchmarks'}: {env['device']}", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "Times are pytest-benchmark means; the device is synchronised inside each timed call.",
              "`vs baseline`: mean time over the named baseline's in the same group (>1: slower).",
              "`of ceiling`: achieved rate over the roofline bound from the measured copy bandwidth",
              "and matmul rate for the dtype (see each benchmark's extra_info `ceiling`).", ""]
    lines += ["", "## Targets", "",
              "Each issue's target, checked on this run's GPU benchmarks (restorenet/bench_targets.py):",
              "the worst value over the benchmarks it covers, and how many of them meet it.", ""]
    lines += _md_table(bench_targets.table_rows(data["benchmarks"]))
    lines += ["", "## Benchmarks", ""]
    lines += _md_table(table_rows(data))
    notes = _notes(data)
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    for p in plots:
        lines += ["", f"![{Path(p).stem}]({Path(p).name})"]
    return "\n".join(lines) + "\n"


def _notes(data: dict) -> list[str]:
    """Distinct caveats recorded by the benchmarks: unmeasured memory, failed FLOP counts."""
    notes: list[str] = []
    for b in data["benchmarks"]:
        info = b.get("extra_info") or {}
        candidates = [info.get("peak_mem_note")]
        if "failed" in str(info.get("flops_note", "")):
            candidates.append(f"{b.get('name')}: {info['flops_note']}")
        notes += [n for n in candidates if n and n not in notes]
    return notes


# ----------------------------------------------------------------------- plots
def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _series(benches: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        info = b.get("extra_info") or {}
        if info.get(key) is not None:
            out[str(info.get("series") or b.get("group"))].append(b)
    return dict(out)


def _by_strategy(benches: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for b in benches:
        out[str((b.get("extra_info") or {}).get("strategy", b.get("name")))].append(b)
    return dict(out)


def _plot_time_vs_size(benches, path) -> Optional[Path]:
    series = _series(benches, "size")
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig, axes = _grid(len(series))
    for ax, (name, items) in zip(axes, sorted(series.items())):
        for strategy, bs in sorted(_by_strategy(items).items()):
            bs = sorted(bs, key=lambda b: b["extra_info"]["size"])
            ax.plot([b["extra_info"]["size"] for b in bs], [b["stats"]["mean"] * 1e3 for b in bs],
                    "o-", label=strategy)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("size (px)")
        ax.set_ylabel("mean time (ms)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("time vs size per strategy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _plot_vs_k(benches, path) -> Optional[Path]:
    series = _series(benches, "K")
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 2, figsize=(10, 3.8 * len(series)), squeeze=False)
    for (ax_mem, ax_t), (name, items) in zip(axes, sorted(series.items())):
        any_mem = False
        for strategy, bs in sorted(_by_strategy(items).items()):
            bs = sorted(bs, key=lambda b: b["extra_info"]["K"])
            ks = [b["extra_info"]["K"] for b in bs]
            mem = [b["extra_info"].get("peak_mem_bytes") for b in bs]
            if any(m is not None for m in mem):
                any_mem = True
                ax_mem.plot(ks, [m / 2**20 if m is not None else float("nan") for m in mem], "o-",
                            label=strategy)
            ax_t.plot(ks, [b["stats"]["mean"] * 1e3 for b in bs], "o-", label=strategy)
        if not any_mem:
            ax_mem.text(0.5, 0.5, "peak memory not measured\n(no CUDA device)", ha="center",
                        va="center", transform=ax_mem.transAxes)
        else:
            ax_mem.legend(fontsize=7)
        ax_mem.set_xlabel("K")
        ax_mem.set_ylabel("peak memory (MiB)")
        ax_mem.set_title(f"{name}: memory", fontsize=9)
        ax_t.set_xlabel("K")
        ax_t.set_ylabel("mean time (ms)")
        ax_t.set_title(f"{name}: time", fontsize=9)
        ax_t.legend(fontsize=7)
        for ax in (ax_mem, ax_t):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _plot_width_mix(benches, path) -> Optional[Path]:
    series = _series(benches, "width_mix")
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig, axes = _grid(len(series))
    for ax, (name, items) in zip(axes, sorted(series.items())):
        labels = [str(b["extra_info"]["width_mix"]) for b in items]
        ax.bar(range(len(items)), [b["stats"]["mean"] * 1e3 for b in items])
        ax.set_xticks(range(len(items)), labels, rotation=20, fontsize=8)
        ax.set_ylabel("mean time (ms)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("time vs width mix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_plots(data: dict, out_dir: str | os.PathLike, stem: str) -> list[Path]:
    """Write every plot whose benchmarks exist; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    benches = [b for b in data["benchmarks"] if b.get("stats")]
    written = []
    for suffix, plot in (("time-vs-size", _plot_time_vs_size), ("memory-vs-K", _plot_vs_k),
                         ("time-vs-width-mix", _plot_width_mix)):
        p = plot(benches, out_dir / f"{stem}-{suffix}.png")
        if p is not None:
            written.append(p)
    return written


def merge(paths: Sequence[str | os.PathLike]) -> dict:
    """One result from the JSONs of a benchmark run split into parts (e.g. by
    ``scripts/gpu_check.sh`` with BENCH_PART): the benchmarks of all of them, the
    machine and commit info of the first. Parts from another device or commit
    are refused: their ratios and targets would mix."""
    parts = [load(p) for p in paths]
    for path, part in zip(paths[1:], parts[1:]):
        if _origin(part) != _origin(parts[0]):
            raise ValueError(f"paths: {str(path)!r} comes from {_origin(part)} (device, commit), not "
                             f"{_origin(parts[0])}; merge only the parts of one run")
    return dict(parts[0], benchmarks=[b for part in parts for b in part["benchmarks"]])


def _origin(data: dict) -> tuple[Optional[str], Optional[str]]:
    device = ((data.get("machine_info") or {}).get("restorenet") or {}).get("device")
    return device, (data.get("commit_info") or {}).get("id")


def write_report(json_paths: str | os.PathLike | Sequence[str | os.PathLike],
                 out_dir: str | os.PathLike | None = None, title: Optional[str] = None,
                 stem: Optional[str] = None) -> Path:
    """Write ``<out_dir>/<stem>.md`` and its plots for one JSON, or for the parts
    of one run merged (``stem`` then defaults to the first part's); return the
    markdown path."""
    paths = [Path(json_paths)] if isinstance(json_paths, (str, os.PathLike)) else [Path(p) for p in json_paths]
    data = merge(paths)
    add_ratios(data["benchmarks"])
    out_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or paths[0].stem
    plots = write_plots(data, out_dir, stem)
    md = out_dir / f"{stem}.md"
    md.write_text(render_markdown(data, plots, title))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m restorenet.bench_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+",
                        help="pytest-benchmark JSON (--benchmark-json); several: the parts of one split run")
    parser.add_argument("--out", default=None, help="output folder (default: the first JSON's folder)")
    parser.add_argument("--title", default=None, help="report title")
    parser.add_argument("--stem", default=None, help="name of the report files (default: the first JSON's)")
    args = parser.parse_args(argv)
    md = write_report(args.results, args.out, args.title, args.stem)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
