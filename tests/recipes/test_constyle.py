"""The ConStyle recipe: one --quick run checked for structure and sanity (not quality),
the mixed degradations, the zeroed style input and the stage-2 freeze."""
import math

import pytest
import torch

from restorenet.data import get_task
from restorenet.recipes import constyle
from restorenet.recipes.common import Settings
from restorenet.registry import create_model

from . import run_quick

PNG = b"\x89PNG\r\n\x1a\n"
TINY = dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=0, dec_blocks=(1, 1, 1))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out, results = run_quick("constyle", tmp_path_factory)
    return results, out


def test_quick_run_writes_report_json_and_png(quick_run):
    results, out = quick_run
    report = (out / "report.md").read_text()
    assert "What this shows" in report and "What it does not show" in report
    assert results["plots"] == ["psnr_per_degradation.png"]
    assert (out / "psnr_per_degradation.png").read_bytes()[:8] == PNG
    # one row per degradation plus the mean, one column per variant plus the name
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(constyle.MIXED_TASKS) + 1
    assert all(line.count("|") == len(constyle.VARIANTS) + 2 for line in table)


def test_quick_run_scores_every_variant_degradation_and_level(quick_run):
    results, _ = quick_run
    per_level, per_task = results["psnr_per_level"], results["psnr_per_degradation"]
    assert set(per_level) == set(per_task) == set(constyle.VARIANTS)
    for variant, tasks in per_level.items():
        assert list(tasks) == list(constyle.MIXED_TASKS)
        for name, levels in tasks.items():
            assert list(levels) == [str(lv) for lv in get_task(name).levels]
            assert all(math.isfinite(v) and 0 < v < 100 for v in levels.values())
            assert per_task[variant][name] == pytest.approx(sum(levels.values()) / len(levels))
    assert all(5 < v < 60 for levels in per_level["input"].values() for v in levels.values())


def test_quick_run_training_record(quick_run):
    results, _ = quick_run
    train = results["training"]
    assert train["steps"] == 4 and train["stage1_steps"] == round(4 * constyle.STAGE1_FRACTION)
    assert train["queue_size"] % train["batch"] == 0
    assert all(len(curve) == 4 for curve in results["curves"].values())
    assert all(math.isfinite(v) for v in train["final_l1"].values())
    assert all(math.isfinite(v) for v in train["stage1_moco"].values())
    params = results["parameters"]
    assert params["constyle"] > params["style_encoder"] > 0 and params["nafnet"] > 0


def test_degrade_mixed_applies_each_images_own_task():
    clean = torch.rand(12, 3, 24, 24)
    degraded, names = constyle.degrade_mixed(clean, torch.Generator().manual_seed(3))
    assert degraded.shape == clean.shape and len(names) == 12
    assert set(names) <= set(constyle.MIXED_TASKS) and len(set(names)) > 1
    again, same = constyle.degrade_mixed(clean, torch.Generator().manual_seed(3))
    assert same == names and torch.equal(again, degraded)
    for image, out, name in zip(clean, degraded, names):
        task = get_task(name)
        if name in ("dejpeg", "sr"):  # deterministic: the output is one of its levels'
            assert any(torch.equal(task.degrade(image[None], lv)[0], out) for lv in task.levels)
        else:
            assert not torch.equal(image, out)


def _style_inputs(model, what):
    """What the modulation and the three injections receive under style_zeroed(what)."""
    seen = {}
    hooks = [model.modulation.register_forward_pre_hook(lambda m, args: seen.update(q=args[1]))]
    hooks += [inj.register_forward_pre_hook(lambda m, args, i=i: seen.update({f"f{i}": args[0]}))
              for i, inj in enumerate(model.injects)]
    with constyle.style_zeroed(model, what):
        out = model(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    return seen, out


def test_style_zeroed_replaces_latent_or_everything_and_then_restores():
    model = create_model("constyle_nafnet", **TINY).eval()
    plain, out = _style_inputs(model, "none")
    latent, out_latent = _style_inputs(model, "latent")
    whole, _ = _style_inputs(model, "all")
    assert plain["q"].abs().sum() > 0 and not torch.equal(out, out_latent)
    assert torch.equal(latent["q"], torch.zeros_like(plain["q"]))
    assert torch.equal(whole["q"], torch.zeros_like(plain["q"]))
    for i in range(3):
        assert torch.equal(latent[f"f{i}"], plain[f"f{i}"]) and plain[f"f{i}"].abs().sum() > 0
        assert torch.equal(whole[f"f{i}"], torch.zeros_like(plain[f"f{i}"]))
    _, after = _style_inputs(model, "none")  # the hook is gone after the block
    assert torch.equal(after, out)
    with pytest.raises(ValueError, match="what"):
        with constyle.style_zeroed(model, "features"):
            pass


@pytest.mark.parametrize("stage1_steps, encoder_trains", [(0, False), (2, True)])
def test_style_encoder_trains_in_stage_1_only(stage1_steps, encoder_trains):
    torch.manual_seed(0)
    model = create_model("constyle_nafnet", **TINY)
    before = {k: v.clone() for k, v in model.named_parameters()}
    log = constyle.train_constyle(model, constyle.MixedBatches(16, 2, 0), 2, stage1_steps, 4,
                                  Settings("constyle"), 1e-3, 1e-4)
    changed = {k: not torch.equal(v, before[k]) for k, v in model.named_parameters()}
    assert any(changed[k] for k in changed if k.startswith("style_encoder.")) == encoder_trains
    assert all(changed[k] for k in changed if k.startswith("intro."))
    assert len(log["l1"]) == 2 and len(log["infonce"]) == stage1_steps
