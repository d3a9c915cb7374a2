"""The recipes' shared pieces: the command line, the training loop, the report."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from restorenet import recipes
from restorenet.recipes.common import Report, Settings, fit, main, md_table


def test_fit_follows_the_cosine_schedule_and_learns():
    torch.manual_seed(0)
    target = torch.randn(8)
    weight = torch.nn.Parameter(torch.zeros(8))
    logged = []
    losses = fit([weight], lambda step: (weight - target).square().mean(), steps=200, lr=0.05,
                 log=lambda step, loss: logged.append(step))
    assert len(losses) == 200 and losses[-1] < 1e-3 * losses[0]
    assert logged == list(range(20, 201, 20))


def test_fit_rejects_nothing_to_train_and_a_diverging_loss():
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    with pytest.raises(ValueError, match="^params"):
        fit([frozen], lambda step: frozen.sum(), steps=1, lr=1.0)
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(FloatingPointError, match="step 0"):
        fit([weight], lambda step: weight.sum() * float("nan"), steps=3, lr=1.0)


def fake_recipe(monkeypatch, run):
    module = types.ModuleType("fake_recipe")
    module.run = run
    module.add_arguments = lambda group: group.add_argument("--depth", type=int, default=2)
    monkeypatch.setitem(sys.modules, "fake_recipe", module)
    monkeypatch.setitem(recipes.RECIPES, "fake", "fake_recipe")


def test_main_runs_a_recipe_and_writes_its_report(monkeypatch, tmp_path):
    seen = {}

    def run(settings: Settings, report: Report):
        seen.update(settings=settings)
        with report.stage("stage 1"):
            report.results["psnr"] = 30.5
        report.table(["a", "b"], [[1, 2.345]], caption="a table")
        with report.figure("plot.png", "a plot") as (fig, ax):
            ax.plot([0, 1], [1, 0])

    fake_recipe(monkeypatch, run)
    results = main(["fake", "--quick", "--out", str(tmp_path), "--steps", "7", "--depth", "5",
                    "--threads", "1", "--model-kwarg", "width=(1,2)"])
    settings = seen["settings"]
    assert settings.quick and settings.steps == 7 and settings.extra == {"depth": 5}
    assert settings.model_kwargs == {"width": (1, 2)} and settings.choose(10, 1) == 1
    assert settings.given("steps", 3) == 7 and settings.given("batch", 3) == 3
    assert results == json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "complete" and results["psnr"] == 30.5
    assert results["plots"] == ["plot.png"] and set(results["stages_s"]) == {"stage 1"}
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "python -m restorenet.recipes fake --quick" in report and "| 1 | 2.35 |" in report
    assert "![a plot](plot.png)" in report and "Machine:" in report


def test_a_failing_recipe_still_writes_what_it_measured(monkeypatch, tmp_path):
    def run(settings, report):
        report.results["stage_1"] = {"psnr": 20.0}
        raise RuntimeError("out of patience")

    fake_recipe(monkeypatch, run)
    with pytest.raises(RuntimeError, match="out of patience"):
        main(["fake", "--out", str(tmp_path), "--threads", "1"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"].startswith("stopped: RuntimeError") and results["stage_1"]["psnr"] == 20.0


def test_unknown_system_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        main(["nosuch"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^system"):
        recipes.load_recipe("nosuch")


def test_md_table_formats_floats_and_escapes_pipes():
    assert md_table(["x", "y"], [[1.0, "a|b"]]).splitlines() == ["| x | y |", "|---|---|", "| 1.00 | a\\|b |"]


def test_help_lists_the_recipes_own_flags(monkeypatch, capsys):
    fake_recipe(monkeypatch, lambda settings, report: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["fake", "--help"])
    assert exit_info.value.code == 0 and "--depth" in capsys.readouterr().out
