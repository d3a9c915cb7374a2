import json
import math

import pytest
import torch
import torch.nn as nn

from restorenet.data import get_task
from restorenet.train import (
    SMALL_CONFIGS,
    AdaRevDAdapter,
    HyperResAdapter,
    build_parser,
    fft_l1_loss,
    main,
    resolve_config,
    train,
)

TINY_NAFNET = dict(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))


@pytest.fixture(scope="module")
def nafnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nafnet-denoise")
    history = main(["--model", "nafnet", "--task", "denoise", "--steps", "12", "--batch", "4",
                    "--crop", "32", "--lr", "2e-3", "--eval-every", "6", "--eval-size", "32",
                    "--out", str(out), "--no-progress",
                    "--model-kwarg", "enc_blocks=(1, 1)", "--model-kwarg", "dec_blocks=(1, 1)"])
    return history, out


def test_cli_run_writes_plot_and_json_matching_the_history(nafnet_run):
    history, out = nafnet_run
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "history.json").read_text())
    assert saved["eval"] == history["eval"] and saved["train"] == history["train"]
    assert saved["config"]["model_kwargs"]["enc_blocks"] == [1, 1]
    assert saved["config"]["crop"] == 32 and saved["config"]["batch"] == 4


def test_history_has_every_step_and_evals_at_start_interval_and_end(nafnet_run):
    history, _ = nafnet_run
    assert history["train"]["step"] == list(range(1, 13))
    assert [e["step"] for e in history["eval"]] == [0, 6, 12]
    levels = [str(lv) for lv in get_task("denoise").levels]
    for record in history["eval"] + [history["input"]]:
        assert list(record["psnr"]) == levels and list(record["ssim"]) == levels
        assert all(math.isfinite(v) for v in record["psnr"].values())
        assert all(-1 <= v <= 1 for v in record["ssim"].values())
    assert all(math.isfinite(v) for v in history["train"]["loss"])
    # The degraded inputs get worse with sigma.
    inp = list(history["input"]["psnr"].values())
    assert inp == sorted(inp, reverse=True)


def test_cosine_schedule_decays_from_the_peak(nafnet_run):
    lrs = nafnet_run[0]["train"]["lr"]
    assert lrs[0] == pytest.approx(2e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.1 * lrs[0]


def test_training_improves_the_held_out_psnr(nafnet_run):
    # A fresh NAFNet's output conv is random, far from the identity; a dozen
    # steps already bring every level closer to the clean image.
    first, last = (nafnet_run[0]["eval"][i]["psnr"] for i in (0, -1))
    assert all(last[lv] > first[lv] for lv in first)


def test_hyperres_trains_all_levels_and_is_reproducible(tmp_path):
    kwargs = dict(model="hyperres", task="sr", steps=3, batch=2, crop=32, eval_size=32,
                  model_kwargs=dict(width=8, num_blocks=1), progress=False)
    a = train(out=tmp_path / "a", **kwargs)
    b = train(out=tmp_path / "b", **kwargs)
    assert a["train"]["loss"] == b["train"]["loss"] and a["eval"] == b["eval"]
    assert list(a["eval"][-1]["psnr"]) == ["2", "3", "4", "5"]
    assert (tmp_path / "a" / "plot.png").exists()


class RecordingModel(nn.Module):
    """Returns x * scale and remembers what it was called with."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, level=None):
        self.calls.append((x.shape, level))
        return x * self.scale


def test_hyperres_adapter_runs_every_level_in_one_batch_and_averages_per_level_l1():
    task = get_task("denoise")
    clean = torch.rand(3, 3, 16, 16)
    model = RecordingModel()
    loss = HyperResAdapter().training_loss(model, task, clean, torch.Generator().manual_seed(0),
                                           torch.device("cpu"))
    (shape, levels), = model.calls
    assert shape == (12, 3, 16, 16)
    assert levels.tolist() == [15.0] * 3 + [35.0] * 3 + [55.0] * 3 + [75.0] * 3
    g = torch.Generator().manual_seed(0)
    per_level = [(task.degrade(clean, lv, g) * 0.5 - clean).abs().mean() for lv in task.levels]
    torch.testing.assert_close(loss, torch.stack(per_level).mean())


def test_adarevd_adapter_averages_l1_plus_fft_over_columns():
    torch.manual_seed(0)
    clean = torch.rand(2, 3, 16, 16)
    cols = [torch.rand(2, 3, 16, 16) for _ in range(3)]
    expected = sum((c - clean).abs().mean() + 0.01 * (torch.fft.rfft2(c) - torch.fft.rfft2(clean)).abs().mean()
                   for c in cols) / 3
    torch.testing.assert_close(AdaRevDAdapter().loss(cols, clean), expected)
    assert fft_l1_loss(clean, clean).item() == 0


def test_resolve_config_layers_small_defaults_width_and_kwargs():
    kwargs, settings = resolve_config("nafnet", width=16, model_kwargs=dict(middle_blocks=2),
                                      lr=5e-4, batch=None)
    assert kwargs["width"] == 16 and kwargs["middle_blocks"] == 2
    assert kwargs["enc_blocks"] == SMALL_CONFIGS["nafnet"]["model"]["enc_blocks"]
    assert settings["lr"] == 5e-4 and settings["batch"] == SMALL_CONFIGS["nafnet"]["batch"]
    paper, _ = resolve_config("nafnet", small=False)
    assert paper == {}


def test_model_kwarg_values_parse_as_python_literals():
    args = build_parser().parse_args(["--model", "m", "--task", "sr", "--steps", "1",
                                      "--model-kwarg", "enc_blocks=(1,2)",
                                      "--model-kwarg", "mode=fast"])
    assert dict(args.model_kwarg) == {"enc_blocks": (1, 2), "mode": "fast"}


@pytest.mark.parametrize("kwargs, name", [
    (dict(model="no_such_model"), "model"),
    (dict(task="inpaint"), "task"),
    (dict(steps=0), "steps"),
    (dict(crop=0), "crop"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        train(**{"model": "nafnet", "task": "denoise", "steps": 2, "out": tmp_path,
                 "progress": False, "model_kwargs": TINY_NAFNET, **kwargs})
