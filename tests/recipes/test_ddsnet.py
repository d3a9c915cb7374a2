"""The DDS-Net recipe's --quick run: every stage runs and the report is complete and
sane (structure, not quality: --quick trains for a few steps)."""
import math

import pytest

from restorenet.recipes import common
from restorenet.recipes.ddsnet import EVAL_SIGMAS, keep_at_budgets

from . import run_quick

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddsnet")
    return run_quick("ddsnet", tmp_path_factory, "--save-supernet", str(out / "supernet.pt"), out=out)


def test_report_files_and_status(quick_run):
    out, results = quick_run
    report = (out / "report.md").read_text()
    for heading in ("greedy tailoring path", "Sub-networks", "The gate on held-out photos",
                    "What this shows", "What it does not show"):
        assert heading in report
    assert set(results["plots"]) == {"psnr_vs_flops.png", "gate_mix.png", "losses.png"}
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and f"]({name})" in report
    assert set(results["stages_s"]) == {"stage 1: supernet (sandwich rule)", "stage 2: greedy per-layer tailoring",
                                        "stage 3: gate", "evaluation: held-out photos"}


def test_tailoring_path_narrows_one_group_per_step(quick_run):
    _, results = quick_run
    path, step = results["stage2"]["path"], 8
    widths = [p["config"] for p in path]
    assert widths[0] == [results["plan"]["model_kwargs"]["width"]] * len(widths[0])
    for before, after in zip(widths, widths[1:]):
        assert sorted(a - b for a, b in zip(before, after)) == [0] * (len(before) - 1) + [step]
    flops = [p["rel_flops"] for p in path]
    assert flops[0] == 1 and all(b < a for a, b in zip(flops, flops[1:]))
    assert all(math.isfinite(p["val_psnr"]) and 5 < p["val_psnr"] < 60 for p in path)
    kept = results["stage2"]["kept"]
    assert [k["config"] for k in kept] == results["stage3"]["configs"]  # the gate's candidates
    assert sorted(b for k in kept for b in k["budgets"]) == sorted(results["plan"]["budgets"])
    assert all(k["rel_flops"] <= min(k["budgets"]) + 1e-9 or k["config"] == widths[-1] for k in kept)


def test_heldout_table_is_consistent(quick_run):
    _, results = quick_run
    held = results["heldout"]
    kept = results["stage2"]["kept"]
    assert [r["sigma"] for r in held["rows"]] == list(EVAL_SIGMAS)
    assert len(held["fixed_configs"]) == len(held["fixed_rel_flops"])
    for row in held["rows"] + [held["overall"]]:
        assert len(row["mix"]) == len(kept) and sum(row["mix"]) == pytest.approx(1)
        assert len(row["fixed_psnr"]) == len(held["fixed_configs"])
        for key in ("noisy_psnr", "widest_psnr", "gate_psnr", "oracle_psnr"):
            assert math.isfinite(row[key]) and 5 < row[key] < 60
        # The gate's FLOPs are a mix of the kept sub-networks' (its own cost included).
        assert min(held["gate_rel_flops"]) - 1e-12 <= row["gate_rel_flops"] <= max(held["gate_rel_flops"]) + 1e-12
        if row["best_fixed"] is not None:
            assert row["best_fixed"]["rel_flops"] <= row["gate_rel_flops"] + 1e-12
    # Noisier inputs score lower.
    noisy = [r["noisy_psnr"] for r in held["rows"]]
    assert noisy == sorted(noisy, reverse=True)


def test_gate_diagnostics_are_recorded(quick_run):
    _, results = quick_run
    stage3, k = results["stage3"], len(results["stage2"]["kept"])
    assert stage3["balanced"] is True and len(stage3["class_weights"]) == k
    # Balanced: each target class seen carries the same total weight.
    shares = [w * s for w, s in zip(stage3["class_weights"], stage3["train_target_share"]) if s > 0]
    assert max(shares) == pytest.approx(min(shares))
    val = stage3["on_validation"]
    assert sum(val["mix"]) == pytest.approx(1) and len(val["mean_logits"]) == k
    assert val["margin_mean"] >= 0 and math.isfinite(val["psnr"]) and math.isfinite(val["widest_psnr"])
    for row in results["heldout"]["rows"]:
        assert row["gate_margin_mean"] >= 0 and sum(row["oracle_mix"]) == pytest.approx(1)
        kept_psnr = [row["fixed_psnr"][results["heldout"]["fixed_configs"].index(k["config"])]
                     for k in results["stage2"]["kept"]]
        assert row["blind_mix_psnr"] == pytest.approx(sum(m * p for m, p in zip(row["mix"], kept_psnr)))


def test_a_saved_supernet_replaces_stages_1_and_2(quick_run, tmp_path):
    out, results = quick_run
    again = common.main(["ddsnet", "--quick", "--threads", "1", "--out", str(tmp_path),
                         "--supernet", str(out / "supernet.pt"), "--gate-pool", "mean"])
    # The backbone is loaded; the gate (never trained by stages 1-2) may take other options.
    assert again["stage3"]["pool"] == "mean" and again["plan"]["model_kwargs"]["gate_pool"] == "mean"
    assert set(again["stages_s"]) == {"stage 3: gate", "evaluation: held-out photos"}
    assert again["stage2"] == results["stage2"] and again["stage1"]["loaded_from"] == str(out / "supernet.pt")
    # Same weights and candidates: every fixed sub-network scores the same on the held-out crops.
    assert again["heldout"]["overall"]["fixed_psnr"] == results["heldout"]["overall"]["fixed_psnr"]


def test_keep_at_budgets_takes_the_first_config_within_each_budget():
    path = [dict(config=(32, 32), rel_flops=1.0), dict(config=(32, 24), rel_flops=0.8),
            dict(config=(24, 24), rel_flops=0.56), dict(config=(16, 24), rel_flops=0.4)]
    kept = keep_at_budgets(path, [1.0, 0.75, 0.5, 0.1])
    assert [k["config"] for k in kept] == [(16, 24), (24, 24), (32, 32)]
    assert [k["budgets"] for k in kept] == [[0.5, 0.1], [0.75], [1.0]]
