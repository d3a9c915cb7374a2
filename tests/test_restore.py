import json
import sys
import types

import pytest
import torch
import torch.nn as nn

import restorenet
from restorenet.data import heldout_images, read_image, write_image
from restorenet.metrics import psnr
from restorenet.restore import load_weights, main, restore_files, restore_image
from restorenet.training.adapters import ModelAdapter, get_adapter
from restorenet.training.checkpoint import save_checkpoint, save_model

HYPERRES = dict(width=8, num_blocks=1)


@pytest.fixture(scope="module")
def hyperres_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = restorenet.create_model("hyperres", **HYPERRES)
    return save_model(root / "model.pt", "hyperres", HYPERRES, model.state_dict()), model.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Noisy inputs (8-bit PNG, 16-bit PNG, JPEG; odd sizes) and clean references."""
    root = tmp_path_factory.mktemp("images")
    (root / "in").mkdir()
    (root / "ref").mkdir()
    clean = heldout_images(72)[:, :, :45, :70]
    g = torch.Generator().manual_seed(0)
    for name, bits, img in (("a.png", 8, clean[0]), ("b.png", 16, clean[1]), ("c.jpg", 8, clean[0])):
        write_image(root / "in" / name, (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1), bits)
        write_image(root / "ref" / name.replace(".jpg", ".png"), img, bits)
    return root


def test_restores_a_folder_keeping_sizes_and_bit_depths(hyperres_file, images, tmp_path):
    path, model = hyperres_file
    result = restore_files(path, images / "in", tmp_path, level=25, tile=32, overlap=8,
                           reference=images / "ref", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]
    for name, bits in (("a", 8), ("b", 16), ("c", 8)):
        out, out_bits = read_image(tmp_path / f"{name}.png")
        assert out.shape == (3, 45, 70) and out_bits == bits
        ref, _ = read_image(images / "ref" / f"{name}.png")
        # The reported PSNR is the written file's.
        assert result["images"][f"{name}.png" if name != "c" else "c.jpg"]["psnr"] == pytest.approx(
            psnr(out[None], ref[None]).item(), abs=1e-9)
    assert set(result["mean"]) == {"psnr", "ssim", "psnr_y", "ssim_y"}
    # The tiled result is the model's, blended: compare one image with a whole-image run.
    img, _ = read_image(images / "in" / "a.png")
    with torch.no_grad():
        whole = model(img[None], 25.0)[0]
    tiled, _ = read_image(tmp_path / "a.png")
    assert (tiled - whole.clamp(0, 1)).abs().mean() < 0.02


class Halve(nn.Module):
    def forward(self, x):
        return x * 0.5


def test_tiles_blend_back_to_the_whole_image_result():
    # A pixel-wise model gives the same pixels in every tile: the blended tiling must
    # reproduce the whole-image result (weights normalised by their sum).
    x = torch.rand(1, 3, 50, 77)
    tiled = restore_image(Halve(), ModelAdapter(), x, tile=24, overlap=8, tile_batch=3)
    torch.testing.assert_close(tiled, x * 0.5)
    assert torch.equal(restore_image(Halve(), ModelAdapter(), x, tile=0), x * 0.5)


def test_adarevd_restores_through_its_patch_exits():
    torch.manual_seed(0)
    model = restorenet.create_model("adarevd", width=8, num_decoders=2, enc_blocks=(1, 1, 1, 1)).eval()
    x = torch.rand(1, 3, 40, 56)
    out = restore_image(model, get_adapter("adarevd"), x, tile=32, overlap=16)
    torch.testing.assert_close(out, model.restore(x, tile=32, overlap=16), rtol=0, atol=0)


def test_cli_reads_checkpoints_and_writes_metrics(hyperres_file, images, tmp_path, capsys):
    _, model = hyperres_file
    save_checkpoint({"step": 1, "model": model.state_dict(), "ema": None,
                     "config": {"model": "hyperres", "model_kwargs": HYPERRES}}, tmp_path / "run")
    name, loaded = load_weights(tmp_path / "run" / "checkpoint.pt")
    assert name == "hyperres"
    main(["--weights", str(tmp_path / "run" / "checkpoint.pt"), "--input", str(images / "in" / "a.png"),
          "--output", str(tmp_path / "out"), "--level", "25", "--reference", str(images / "ref"),
          "--no-progress", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "a.png: PSNR" in printed and "mean over 1" in printed
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"]["a.png"]["psnr"] > 0


@pytest.mark.parametrize("extra, message", [
    ([], "level must be given for hyperres"),
    (["--level", "25", "--tile", "16", "--overlap", "16"], "overlap must be smaller than the tile"),
    (["--level", "25", "--reference", "/no/such/dir"], "reference: "),
])
def test_cli_errors_are_clean(hyperres_file, images, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        main(["--weights", str(hyperres_file[0]), "--input", str(images / "in"), "--output",
              str(tmp_path), "--no-progress", "--threads", "1", *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_level_estimators_are_refused(tmp_path, images):
    model = restorenet.create_model("hyperres_level_estimator")
    path = save_model(tmp_path / "est.pt", "hyperres_level_estimator", {}, model.state_dict())
    with pytest.raises(ValueError, match="estimates a level"):
        restore_files(path, images / "in", tmp_path / "out", progress=False)


def test_released_checkpoints_need_a_model_name_and_go_through_from_released(
        hyperres_file, tmp_path, monkeypatch):
    _, model = hyperres_file
    released = tmp_path / "released.pth"
    torch.save({"params": model.state_dict()}, released)  # not a restorenet file
    with pytest.raises(ValueError, match="name its model"):
        load_weights(released)
    calls = []

    def from_released(name, checkpoint, **cfg):  # stands in for restorenet.weights'
        calls.append((name, sorted(checkpoint)))
        return model

    fake = types.ModuleType("restorenet.weights")
    fake.from_released = from_released
    monkeypatch.setitem(sys.modules, "restorenet.weights", fake)
    name, loaded = load_weights(released, model_name="hyperres")
    assert name == "hyperres" and loaded is model and calls == [("hyperres", ["params"])]
