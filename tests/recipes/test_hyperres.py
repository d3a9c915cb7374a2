"""The HyperRes recipe: one --quick run checked for structure and sanity (not quality),
and the level choices that decide what "unseen" means."""
import math

import pytest
import torch
import torch.nn as nn

from restorenet.data import get_task
from restorenet.models.hyperres import level_to_condition
from restorenet.recipes import hyperres

from . import run_quick

PNG = b"\x89PNG\r\n\x1a\n"
TASKS = ("denoise", "sr")  # the blind stage (denoise) and a second task with float levels


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, results = run_quick("hyperres", tmp_path_factory, "--task", *TASKS)
    return results, out


def test_quick_run_writes_report_json_and_pngs(quick_run):
    results, out = quick_run
    report = (out / "report.md").read_text()
    assert "What this shows" in report and "What it does not show" in report
    assert results["plots"] == ["psnr_vs_level.png", "blind.png"]
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG
        assert f"]({name})" in report
    assert set(results["stages_s"]) == {"train denoise", "evaluate denoise", "train sr",
                                        "evaluate sr", "train blind estimator", "evaluate blind"}


@pytest.mark.parametrize("task", TASKS)
def test_quick_run_measures_every_level_of_each_kind(quick_run, task):
    results, _ = quick_run
    result = results["tasks"][task]
    rows = result["levels"]
    assert [(r["level"], r["kind"]) for r in rows] == hyperres.evaluated_levels(task)
    assert result["train"]["steps"] == 4 and result["train"]["parameters"] > 0
    for r in rows:
        # Degraded inputs are plausible photos; an untrained model's output may be
        # anything, but its PSNR is a finite number of a real comparison.
        assert 5 < r["input_psnr"] < 60 and 0 < r["input_ssim"] <= 1
        assert math.isfinite(r["psnr"]) and 0 < r["psnr"] < 100
        assert r["gain_db"] == pytest.approx(r["psnr"] - r["input_psnr"])
    for kind, gain in result["gain_by_kind"].items():
        expected = [r["gain_db"] for r in rows if r["kind"] == kind]
        assert gain == pytest.approx(sum(expected) / len(expected))
    # Worse degradation, worse input: the levels were really applied.
    inputs = [r["input_psnr"] for r in rows]
    assert inputs == sorted(inputs, reverse=True)


@pytest.mark.parametrize("task", TASKS)
def test_quick_run_level_sensitivity_feeds_every_trained_level(quick_run, task):
    sens = quick_run[0]["tasks"][task]["level_sensitivity"]
    levels = list(get_task(task).levels)
    assert sens["fed_levels"] == levels and [r["true_level"] for r in sens["rows"]] == levels
    for r in sens["rows"]:
        values = list(r["psnr_by_fed_level"].values())
        assert list(r["psnr_by_fed_level"]) == [str(lv) for lv in levels]
        assert all(math.isfinite(v) for v in values)
        assert r["spread_db"] == pytest.approx(max(values) - min(values))
        assert r["true_minus_best_db"] <= 0


def test_quick_run_blind_stage_covers_every_sigma(quick_run):
    results, _ = quick_run
    blind, rows = results["blind"], results["tasks"]["denoise"]["levels"]
    assert [b["level"] for b in blind] == [r["level"] for r in rows]
    for b, r in zip(blind, rows):
        assert len(b["estimates"]) == 2  # the two held-out photos
        assert b["level_error"] == pytest.approx(sum(abs(e - b["level"]) for e in b["estimates"]) / 2)
        assert b["psnr_true_level"] == r["psnr"] and math.isfinite(b["psnr_estimated_level"])
    assert results["estimator"]["crop"] == 64 and results["estimator"]["init"] == "pytorch"


@pytest.mark.parametrize("task", sorted(hyperres.LEVELS))
def test_unseen_levels_lie_inside_and_outside_the_trained_range(task):
    levels = hyperres.evaluated_levels(task)
    trained = [lv for lv, kind in levels if kind == "trained"]
    assert tuple(trained) == get_task(task).levels
    low, high = min(trained), max(trained)
    for level, kind in levels:
        if kind == "unseen_inside":
            assert low < level < high and level not in trained
        if kind == "unseen_outside":
            assert level < low or level > high
    assert {kind for _, kind in levels} == {"trained", "unseen_inside", "unseen_outside"}
    if get_task(task).integer_levels:
        assert all(isinstance(lv, int) for lv, _ in levels)


@pytest.mark.parametrize("task", sorted(hyperres.LEVELS))
def test_every_evaluated_level_is_fed_as_level_over_255(task):
    # The released rule divides only when the smallest level is >= 1: the recipe's
    # levels must all take that branch, as the training levels do.
    for level, _ in hyperres.evaluated_levels(task):
        assert level_to_condition(float(level)) == pytest.approx(level / 255)
        assert level_to_condition(torch.tensor([float(level)])).item() == pytest.approx(level / 255)


class _ConstantEstimator(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0],), self.value)


def test_estimated_level_is_clamped_to_one_before_hyperres_sees_it():
    seen = []
    adapter = hyperres.EstimatedLevelAdapter(_ConstantEstimator(0.3))
    adapter.restore(lambda x, level: seen.append(level) or x, torch.zeros(2, 3, 8, 8), 25)
    assert torch.equal(seen[0], torch.ones(2))
    adapter = hyperres.EstimatedLevelAdapter(_ConstantEstimator(42.0))
    adapter.restore(lambda x, level: seen.append(level) or x, torch.zeros(2, 3, 8, 8), 25)
    assert torch.equal(seen[1], torch.full((2,), 42.0))


def test_estimator_crop_is_a_multiple_of_32_within_the_held_out_crops():
    assert hyperres.estimator_crop(256) == 128
    assert hyperres.estimator_crop(128) == 128
    assert hyperres.estimator_crop(100) == 96
    with pytest.raises(ValueError, match="eval_size"):
        hyperres.estimator_crop(31)
