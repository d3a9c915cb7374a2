"""The AdaRevD recipe: one --quick run (structure and sanity of its report, not its
quality) and the calibrated exit-map rule."""
import math

import pytest
import torch

from restorenet.models.adarevd import DEFAULT_EXIT_IDX, NUM_CLASSES
from restorenet.recipes.adarevd import exit_map_from_scores

from . import run_quick

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("stage 0: encoder", "stage 1: decoder columns", "stage 2: classifier", "evaluation")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return run_quick("adarevd", tmp_path_factory)


def test_writes_report_results_and_png_plots(quick_run):
    out, results = quick_run
    report = (out / "report.md").read_text()
    for heading in ("## Classifier (stage 2)", "## Exits vs fixed depth", "## What this shows"):
        assert heading in report
    assert set(results["plots"]) == {"losses.png", "psnr_vs_columns.png", "exit_map.png"}
    for name in results["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report
    assert set(results["stages_s"]) == set(STAGES)


def test_every_stage_trained_its_steps(quick_run):
    _, results = quick_run
    plan = results["plan"]
    assert len(results["encoder"]["losses"]) == plan["encoder_steps"]
    assert len(results["decoder"]["losses"]) == plan["steps"]
    classifier = results["classifier"]
    assert len(classifier["losses"]) == plan["classifier_steps"]
    assert sum(classifier["train_class_counts"]) == plan["classifier_steps"] * plan["batch"]
    for losses in (results["encoder"]["losses"], results["decoder"]["losses"], classifier["losses"]):
        assert all(math.isfinite(v) and v >= 0 for v in losses)
    for crops in (classifier["heldout"], classifier["train_photos"]):
        assert 0 <= crops["accuracy"] <= crops["within_one_class"] <= 1
        assert sum(map(sum, crops["confusion"])) == crops["crops"] == plan["heldout_crops"]


def test_exit_maps_and_columns_are_consistent(quick_run):
    _, results = quick_run
    k = results["plan"]["model"]["num_decoders"]
    maps = results["exit_maps"]
    assert maps["paper"] == list(DEFAULT_EXIT_IDX[k])
    assert len(maps["calibrated"]) == NUM_CLASSES and all(1 <= d <= k for d in maps["calibrated"])
    overall = results["evaluation"]["overall"]
    assert set(overall) == {f"depth {d}" for d in range(1, k + 1)} | {
        "classifier, paper map", "classifier, calibrated map"}
    tiles = {r["tiles"] for r in overall.values()}
    assert len(tiles) == 1 and tiles.pop() > 0  # every setting ran on the same tiles
    for d in range(1, k + 1):
        assert overall[f"depth {d}"]["mean_columns"] == d  # a fixed depth runs d columns everywhere
    for name, key in (("classifier, paper map", "paper"), ("classifier, calibrated map", "calibrated")):
        assert min(maps[key]) <= overall[name]["mean_columns"] <= max(maps[key])
    for r in overall.values():
        assert r["time_s"] > 0
    picture = results["evaluation"]["exit_map_picture"]
    assert picture["setting"] == "classifier, paper map"
    assert {d for row in picture["exits"] for d in row} <= set(maps["paper"])


def test_psnr_finite_and_plausible_per_level(quick_run):
    _, results = quick_run
    evaluation = results["evaluation"]
    assert evaluation["levels"] == ["7", "19"]  # --quick: the mildest and the strongest blur
    for level, row in evaluation["per_level"].items():
        assert {"input", "nafnet (stage 0)"} <= set(row)
        for name, r in row.items():
            assert 5 < r["psnr"] < 60, (level, name, r)
    # the overall PSNR of a setting is the mean of its per-level PSNRs (same images per level)
    for name, r in evaluation["overall"].items():
        per_level = [row[name]["psnr"] for row in evaluation["per_level"].values()]
        assert r["psnr"] == pytest.approx(sum(per_level) / len(per_level))


def test_exit_map_from_scores_picks_fewest_columns_within_tolerance():
    # 3 depths, crops of classes 0, 0, 2 (classes 1, 3, 4, 5 have none)
    scores = torch.tensor([[20.0, 22.0, 30.0],
                           [24.0, 25.95, 30.05],
                           [24.0, 26.0, 29.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 2])
    exit_map, per_class = exit_map_from_scores(scores, labels, tol=0.1)
    # class 0 means per depth: 21, 24.975, 25 -> depth 2 is within 0.1 dB of the best;
    # class 2: 30, 30.05, 29 -> depth 1; classes without crops: all K columns
    assert exit_map == (2, 3, 1, 3, 3, 3)
    assert per_class[0] == [21.0, 24.975, 25.0] and per_class[1] is None
    assert exit_map_from_scores(scores, labels, tol=0.0)[0][0] == 3


def test_encoder_weights_file_is_inherited_and_frozen(tmp_path):
    from restorenet.models.nafnet import NAFNet
    from restorenet.recipes.adarevd import SMALL_MODEL, build_model, stage_encoder
    from restorenet.recipes.common import Report, Settings
    from restorenet.training.checkpoint import save_model

    nafnet_cfg = dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1))
    nafnet = NAFNet(**nafnet_cfg)
    path = save_model(tmp_path / "nafnet.pt", "nafnet", nafnet_cfg, nafnet.state_dict())
    settings = Settings("adarevd", out=str(tmp_path / "out"), extra={"encoder_weights": str(path)})
    model = build_model({"model": SMALL_MODEL, "pool_window": 0}, "cpu")
    report = Report(settings, "test")
    assert stage_encoder(model, {"model": SMALL_MODEL}, settings, report) is None  # nothing trained
    for name, value in nafnet.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert report.results["encoder"] == {"source": str(path)}
