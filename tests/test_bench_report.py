"""restorenet.bench_report on small synthetic pytest-benchmark JSON files."""
import json

import pytest

from restorenet import bench_report


def bench(name, group, mean, **extra):
    return {"name": name, "group": group, "stats": {"mean": mean, "rounds": 5}, "extra_info": extra}


def synthetic_results():
    benches = []
    for size, scale in ((96, 1.0), (256, 7.0)):
        group = f"hyper_conv2d fwd bf16 N16 C64 {size}x{size}"
        common = dict(series="hyper_conv2d fwd bf16", size=size, dtype="bf16")
        benches += [
            bench(f"conv[{size}-floor]", group, 1e-3 * scale, strategy="floor",
                  baselines=["reference"], TFLOPs=100.0 / scale, fraction_of_ceiling=0.25,
                  peak_mem_bytes=3 * 2**20, **common),
            bench(f"conv[{size}-grouped]", group, 2e-3 * scale, strategy="grouped",
                  baselines=["floor", "reference"], TFLOPs=50.0 / scale, GBps=800.0,
                  peak_mem_bytes=5 * 2**20, **common),
            bench(f"conv[{size}-reference]", group, 8e-3 * scale, strategy="reference",
                  baselines=["floor"], TFLOPs=12.5 / scale, time_vs_ideal=8.0, **common),
        ]
    for k in (1, 2, 4):
        for strategy, mem in (("reversible", 100), ("autograd", 100 * k)):
            benches.append(bench(f"rev[{k}-{strategy}]", f"adarevd K{k}", 0.01 * k, strategy=strategy,
                                 K=k, series="adarevd vs K", peak_mem_bytes=mem * 2**20,
                                 baselines=["autograd"] if strategy == "reversible" else []))
    for mix, mean in (("narrowest", 0.001), ("widest", 0.004)):
        benches.append(bench(f"dds[{mix}]", "ddsnet mix", mean, strategy="ddsnet", width_mix=mix))
    return {
        "machine_info": {"node": "box", "python_version": "3.11.0", "cpu": {"brand_raw": "SomeCPU"},
                         "restorenet": {"device": "NVIDIA Test GPU", "driver": "999.1",
                                        "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cudnn": 91000,
                                        "triton": "3.6.0", "commit": "abc123def456",
                                        "ceilings": {"copy_GBps": 3000.0, "bf16_matmul_TFLOPs": 800.0}}},
        "commit_info": {"id": "unknown", "error": "no git"},
        "benchmarks": benches,
        "datetime": "2026-01-01T00:00:00",
        "version": "5.2.3",
    }


def write(tmp_path, data, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_add_ratios_matches_baseline_within_group():
    data = synthetic_results()
    bench_report.add_ratios(data["benchmarks"])
    by_name = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    grouped = by_name["conv[96-grouped]"]
    assert grouped["baseline"] == "floor"
    assert grouped["time_vs_baseline"] == pytest.approx(2.0)
    assert grouped["time_vs"]["reference"] == pytest.approx(0.25)
    # the 256 group has its own floor (7x slower), so the ratio stays 2
    assert by_name["conv[256-grouped]"]["time_vs_baseline"] == pytest.approx(2.0)
    assert by_name["rev[4-reversible]"]["time_vs_baseline"] == pytest.approx(1.0)
    assert by_name["rev[4-reversible]"]["mem_vs"]["autograd"] == pytest.approx(0.25)  # 100 vs 400 MiB
    assert grouped["mem_vs"]["floor"] == pytest.approx(5 / 3)
    assert grouped["mem_vs"]["reference"] is None  # the reference recorded no peak memory
    assert "time_vs" not in by_name["dds[widest]"]


def test_add_ratios_missing_or_ambiguous_baseline_gives_none():
    benches = [bench("a", "g", 1.0, strategy="x", baselines=["floor"]),
               bench("b", "g", 2.0, strategy="y", baselines=["x"]),
               bench("c", "g", 3.0, strategy="y", baselines=["x"]),
               bench("d", "g", 4.0, strategy="z", baselines=["y"])]
    bench_report.add_ratios(benches)
    assert benches[0]["extra_info"]["time_vs_baseline"] is None
    assert benches[1]["extra_info"]["time_vs_baseline"] == pytest.approx(2.0)
    assert benches[3]["extra_info"]["time_vs_baseline"] is None  # two benchmarks claim "y"


def test_report_writes_table_header_and_plots(tmp_path):
    path = write(tmp_path, synthetic_results())
    md_path = bench_report.write_report(path, tmp_path / "out")
    assert md_path == tmp_path / "out" / "results.md"
    md = md_path.read_text()
    for field in ("NVIDIA Test GPU", "999.1", "2.11.0+cu130", "3.6.0", "abc123def456"):
        assert field in md
    rows = [line for line in md.splitlines() if line.startswith("| hyper_conv2d")]
    assert len(rows) == 6
    grouped96 = next(r for r in rows if "conv[96-grouped]" in r)
    cells = [c.strip() for c in grouped96.strip("|").split("|")]
    assert cells == ["hyper_conv2d fwd bf16 N16 C64 96x96", "conv[96-grouped]", "2 ms",
                     "50 TFLOP/s / 800 GB/s", "2x floor", "-", "5 MiB", "n/a"]
    floor96 = next(r for r in rows if "conv[96-floor]" in r)
    assert "0.125x reference" in floor96 and "25%" in floor96
    reference96 = next(r for r in rows if "conv[96-reference]" in r)
    assert "| 8x |" in reference96  # time vs its computed ideal
    for suffix in ("time-vs-size", "memory-vs-K", "time-vs-width-mix"):
        png = tmp_path / "out" / f"results-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(results-{suffix}.png)" in md


def test_report_skips_plots_without_their_benchmarks(tmp_path):
    data = synthetic_results()
    data["benchmarks"] = [b for b in data["benchmarks"] if "size" in b["extra_info"]]
    path = write(tmp_path, data, "conv.json")
    assert bench_report.main([str(path)]) == 0
    assert (tmp_path / "conv.md").exists()
    assert (tmp_path / "conv-time-vs-size.png").exists()
    assert not (tmp_path / "conv-memory-vs-K.png").exists()
    assert not (tmp_path / "conv-time-vs-width-mix.png").exists()


def test_report_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    path = write(tmp_path, {"hello": 1}, "bad.json")
    with pytest.raises(ValueError, match="path"):
        bench_report.write_report(path)


def test_report_merges_the_parts_of_a_split_run(tmp_path):
    data = synthetic_results()
    hyper = [b for b in data["benchmarks"] if b["group"].startswith("hyper_conv2d")]
    rest = [b for b in data["benchmarks"] if not b["group"].startswith("hyper_conv2d")]
    part1 = write(tmp_path, dict(data, benchmarks=hyper), "run-conv.json")
    part2 = write(tmp_path, dict(data, benchmarks=rest), "run-models.json")
    md = bench_report.write_report([part1, part2], tmp_path / "out", stem="run").read_text()
    assert "conv[96-grouped]" in md and "rev[4-reversible]" in md and "dds[widest]" in md
    assert (tmp_path / "out" / "run-memory-vs-K.png").exists()
    other = dict(data, benchmarks=rest, commit_info={"id": "another"})
    with pytest.raises(ValueError, match="^paths"):
        bench_report.merge([part1, write(tmp_path, other, "other.json")])
