"""restorenet.bench_targets on synthetic benchmark entries: each target picks the
benchmarks it is about, computes its ratio from them, and reports the worst."""
from restorenet import bench_report, bench_targets

GPU = "NVIDIA H200"


def bench(name, group, mean, device=GPU, **extra):
    return {"name": name, "group": group, "stats": {"mean": mean},
            "extra_info": {"device": device, **extra}}


def results_by_key(benchmarks):
    return {r.target.key: r for r in bench_targets.evaluate(benchmarks)}


def hyper_group(triton_s, cuda_s, floor_s=1.0, linearity_s=3.0, grouped_s=4.0, dtype="bf16", device=GPU):
    group = f"hyper_conv2d fwd+bwd {dtype} N16 C64 256x256"
    common = dict(dtype=dtype, shape=[16, 64, 256, 256], device=device)
    return [
        bench("floor", group, floor_s, strategy="floor", **common),
        bench("linearity", group, linearity_s, strategy="linearity", **common),
        bench("grouped", group, grouped_s, strategy="grouped", **common),
        bench("triton", group, triton_s, strategy="triton", ceiling="roofline(bf16_matmul_TFLOPs, copy_GBps)",
              fraction_of_ceiling=0.6, **common),
        bench("cuda", group, cuda_s, strategy="cuda", ceiling="roofline(bf16_matmul_TFLOPs, copy_GBps)",
              fraction_of_ceiling=0.4, **common),
    ]


def test_hyper_targets_take_the_worst_fast_backend():
    r = results_by_key(hyper_group(triton_s=1.1, cuda_s=1.3))
    floor = r["3.floor"]
    assert floor.measured == 2 and floor.passed == 1
    assert abs(floor.worst - 1.3) < 1e-12 and floor.worst_name == "cuda"
    assert floor.status == "missed (1/2 met)"
    comp = r["3.compositions"]  # best composition is linearity at 3.0 s
    assert abs(comp.worst - 3.0 / 1.3) < 1e-12 and comp.status == "met"
    assert r["7.matmul"].measured == 2 and abs(r["7.matmul"].worst - 0.4) < 1e-12
    assert r["7.matmul"].passed == 1


def test_fp32_and_cpu_runs_do_not_count():
    r = results_by_key(hyper_group(1.0, 1.0, dtype="fp32"))
    assert r["3.floor"].measured == 0 and r["3.floor"].status.startswith("not measured (no benchmark")
    r = results_by_key(hyper_group(1.0, 1.0, device="cpu (2 threads)"))
    assert r["3.floor"].status == "not measured (CPU run)"


def adarevd_step(k, strategy, mean, mem, dtype="bf16"):
    return bench(f"adarevd[{k}-{strategy}]", f"adarevd train step K{k} {dtype}", mean,
                 strategy=strategy, K=k, dtype=dtype, peak_mem_bytes=mem)


def test_reversible_targets_compare_with_k1_autograd_and_checkpoint():
    benches = [adarevd_step(1, "reversible", 1.0, 100), adarevd_step(1, "autograd", 0.9, 100)]
    for k in (2, 8):
        benches += [adarevd_step(k, "reversible", 1.2 * k, 110 + k),
                    adarevd_step(k, "autograd", 1.0 * k, 100 * k),
                    adarevd_step(k, "checkpoint", 1.5 * k, 105 + k)]
    r = results_by_key(benches)
    assert r["5.memory"].measured == 1 and abs(r["5.memory"].worst - 1.18) < 1e-12
    assert r["5.memory"].status == "met"
    assert r["5.time"].measured == 2 and abs(r["5.time"].worst - 1.2) < 1e-12
    assert r["5.checkpoint-time"].status == "met"
    mem = r["5.checkpoint-memory"]  # 112/107 at K=2 (worse than 118/113 at K=8)
    assert mem.status == "missed (0/2 met)" and abs(mem.worst - 112 / 107) < 1e-12


def test_every_target_gets_a_report_row_even_when_unmeasured():
    data = {"benchmarks": hyper_group(1.0, 1.0)}
    rows = bench_targets.table_rows(data["benchmarks"])
    assert [row["issue"] for row in rows] == [f"#{t.issue}" for t in bench_targets.TARGETS]
    assert {t.issue for t in bench_targets.TARGETS} == {3, 4, 5, 6, 7}
    md = bench_report.render_markdown(data)
    assert "## Targets" in md and "not measured (no benchmark matched)" in md
    assert "plain-conv floor" in md


# The benchmark file that defines each strategy a target refers to.
STRATEGY_HOME = {
    "floor": "strategies.py", "grouped": "strategies.py", "linearity": "strategies.py",
    "compiled_grouped": "strategies.py", "compiled_linearity": "strategies.py", "triton": "strategies.py",
    "cuda": "strategies.py", "group_by_width": "strategies.py", "dense_at_width": "strategies.py",
    "autograd": "test_bench_models.py", "checkpoint": "test_bench_models.py", "reversible": "test_bench_models.py",
    "batched": "test_bench_restore.py",
}


def test_every_strategy_a_target_names_is_one_its_benchmark_defines():
    """A renamed benchmark strategy must not silently turn a target into 'not measured'."""
    import re
    from pathlib import Path

    source = Path(bench_targets.__file__).read_text()
    found = re.findall(r'peer_ratio\("(\w+)"\)|_memory_vs_peer\(m, "(\w+)"\)|strategy"\) == "(\w+)"', source)
    named = {n for group in found for n in group if n}
    named |= set(bench_targets.FAST_BACKENDS) | set(bench_targets.HYPER_COMPOSITIONS) | {bench_targets._REVERSIBLE}
    assert named == set(STRATEGY_HOME), f"update STRATEGY_HOME: targets name {sorted(named)}"
    bench_dir = Path(bench_targets.__file__).resolve().parents[1] / "bench"
    missing = [f"{name} (in {home})" for name, home in STRATEGY_HOME.items()
               if f'"{name}"' not in (bench_dir / home).read_text()]
    assert not missing, f"bench_targets names strategies their benchmark does not define: {missing}"
