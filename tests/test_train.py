import json
import math
import shlex
import subprocess
import warnings

import pytest
import torch
import torch.nn as nn

import restorenet
from restorenet.data import get_task, heldout_images, write_image
from restorenet.registry import list_models
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
from restorenet.training.adapters import Batch, LevelEstimatorAdapter

TINY_NAFNET = dict(width=8, enc_blocks=(1, 1), middle_blocks=1, dec_blocks=(1, 1))
# Tiny HyperRes run settings: seconds per run on one thread.
TINY_HYPERRES = dict(model="hyperres", task="denoise", batch=4, crop=32, eval_size=32,
                     model_kwargs=dict(width=8, num_blocks=1), progress=False, threads=1)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def nafnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nafnet-denoise")
    history = main(["--model", "nafnet", "--task", "denoise", "--steps", "12", "--batch", "4",
                    "--crop", "32", "--lr", "2e-3", "--eval-every", "6", "--eval-size", "32",
                    "--out", str(out), "--no-progress", "--threads", "1",
                    "--model-kwarg", "enc_blocks=(1, 1)", "--model-kwarg", "dec_blocks=(1, 1)"])
    return history, out


def test_cli_run_writes_plot_json_model_and_checkpoint(nafnet_run):
    history, out = nafnet_run
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((out / "history.json").read_text())
    assert saved["eval"] == history["eval"] and saved["train"] == history["train"]
    assert saved["config"]["model_kwargs"]["enc_blocks"] == [1, 1]
    assert saved["config"]["crop"] == 32 and saved["config"]["batch"] == 4
    # Without --save-every: one checkpoint, at the end; checkpoint.pt is that file.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-12.pt"]
    assert (out / "checkpoint.pt").samefile(out / "checkpoints" / "step-12.pt") or \
        (out / "checkpoint.pt").read_bytes() == (out / "checkpoints" / "step-12.pt").read_bytes()
    model_file = load(out / "model.pt")
    assert model_file["model"] == "nafnet" and model_file["step"] == 12 and not model_file["ema"]
    assert model_file["model_kwargs"]["enc_blocks"] == (1, 1)


def test_history_has_every_step_and_evals_at_start_interval_and_end(nafnet_run):
    history, _ = nafnet_run
    assert history["train"]["step"] == list(range(1, 13))
    assert [e["step"] for e in history["eval"]] == [0, 6, 12]
    levels = [str(lv) for lv in get_task("denoise").levels]
    for record in history["eval"] + [history["input"]]:
        for metric in ("psnr", "ssim", "psnr_y", "ssim_y"):
            assert list(record[metric]) == levels
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


def test_load_model_rebuilds_the_trained_model(nafnet_run):
    history, out = nafnet_run
    model = restorenet.load_model(out / "model.pt")
    assert type(model).__name__ == "NAFNet" and not model.training
    ckpt = load(out / "checkpoint.pt")
    assert state_dicts_equal(model.state_dict(), ckpt["model"])
    # Its held-out PSNR is the run's last evaluation.
    from restorenet.training.evaluation import EvalSet, evaluate
    from restorenet.training.adapters import get_adapter

    scores = evaluate(model, get_adapter("nafnet"), EvalSet.build(get_task("denoise"), 32))
    assert scores["psnr"] == history["eval"][-1]["psnr"]


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module", params=[None, 0.9], ids=["plain", "ema"])
def resumed_pair(request, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoint every step, last 3 kept) and a run
    resumed from its step-2 checkpoint into another folder."""
    ema = request.param
    full = tmp_path_factory.mktemp("full")
    train(steps=4, out=full, save_every=1, keep_last=3, eval_every=2, ema=ema, **TINY_HYPERRES)
    resumed = tmp_path_factory.mktemp("resumed")
    history = train(steps=4, resume=full / "checkpoints" / "step-2.pt", out=resumed, threads=1,
                    progress=False)
    return full, resumed, history, ema


def test_resume_gives_the_uninterrupted_run_bitwise(resumed_pair):
    full, resumed, history, ema = resumed_pair
    a, b = load(full / "model.pt"), load(resumed / "model.pt")
    assert a["ema"] == b["ema"] == (ema is not None)
    assert state_dicts_equal(a["state_dict"], b["state_dict"])
    ca, cb = load(full / "checkpoint.pt"), load(resumed / "checkpoint.pt")
    assert state_dicts_equal(ca["model"], cb["model"])
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for key, state in ca["optimizer"]["state"].items():
        assert state_dicts_equal(state, cb["optimizer"]["state"][key])
    if ema is not None:
        assert state_dicts_equal(ca["ema"], cb["ema"])
        # model.pt holds the averaged weights, not the raw ones.
        assert not state_dicts_equal(a["state_dict"], ca["model"])
    saved = json.loads((full / "history.json").read_text())
    assert history["train"] == saved["train"] and history["eval"] == saved["eval"]
    assert [e["step"] for e in history["eval"]] == [0, 2, 4]


def test_checkpoints_keep_the_last_n_and_point_at_the_latest(resumed_pair):
    full, resumed, _, _ = resumed_pair
    assert [p.name for p in sorted((full / "checkpoints").iterdir())] == [
        "step-2.pt", "step-3.pt", "step-4.pt"]
    latest = load(full / "checkpoint.pt")
    assert latest["step"] == 4 and latest["format"] == "restorenet-checkpoint"
    assert set(latest) >= {"model", "optimizer", "scheduler", "scaler", "ema", "sampler",
                           "degrade", "rng", "config", "history"}
    assert set(latest["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    # The resumed run saved its own checkpoints from step 3 on (--keep-last carried over).
    assert [p.name for p in sorted((resumed / "checkpoints").iterdir())] == ["step-3.pt", "step-4.pt"]


def test_resume_refuses_settings_that_change_the_run(resumed_pair, tmp_path):
    full = resumed_pair[0]
    with pytest.raises(ValueError, match="^batch must match the checkpoint"):
        train(resume=full / "checkpoint.pt", batch=8, out=tmp_path, progress=False, threads=1)
    with pytest.raises(ValueError, match="^resume: .* not a training checkpoint"):
        train(resume=full / "model.pt", out=tmp_path, progress=False, threads=1)


def test_resume_can_extend_the_run(resumed_pair, tmp_path):
    full = resumed_pair[0]
    history = train(resume=full / "checkpoint.pt", steps=5, out=tmp_path, progress=False,
                    threads=1)
    assert history["train"]["step"] == [1, 2, 3, 4, 5] and history["config"]["steps"] == 5


# ----------------------------------------------------------------------------- precision


def test_amp_trains_in_bf16_and_fp16_with_a_scaler(tmp_path):
    runs = {}
    for amp in (None, "bf16", "fp16"):
        runs[amp] = train(steps=2, out=tmp_path / str(amp), amp=amp, grad_clip=0.1,
                          eval_every=100, **TINY_HYPERRES)
    fp32, bf16, fp16 = (runs[a]["train"]["loss"] for a in (None, "bf16", "fp16"))
    # Same data, lower precision: close to the fp32 losses, but not equal to them.
    for low in (bf16, fp16):
        assert low != fp32 and low == pytest.approx(fp32, rel=0.05)
    scaler = load(tmp_path / "fp16" / "checkpoint.pt")["scaler"]
    assert scaler["scale"] > 1  # the fp16 run scales its loss
    assert load(tmp_path / "bf16" / "checkpoint.pt")["scaler"] == {}  # disabled scaler


def test_threads_sets_the_torch_thread_count(tmp_path):
    # The count is set first thing (here a bad model name stops the run right after).
    with pytest.raises(ValueError, match="^model"):
        train(**{**TINY_HYPERRES, "model": "no_such_model", "steps": 1, "out": tmp_path,
                 "threads": 2})
    assert torch.get_num_threads() == 2


def test_amp_that_torch_cannot_autocast_is_an_error(monkeypatch, tmp_path):
    real_autocast = torch.autocast

    class RefusingAutocast(real_autocast):  # as torch does where a dtype is unsupported
        def __init__(self, device_type, dtype=None, **kwargs):
            warnings.warn("In CPU autocast, but the target dtype is not supported. "
                          "Disabling autocast.")
            super().__init__(device_type, dtype=dtype, enabled=False)

    monkeypatch.setattr(torch, "autocast", RefusingAutocast)
    with pytest.raises(ValueError, match="^amp: torch .* cannot autocast to fp16 on cpu"):
        train(**{**TINY_HYPERRES, "steps": 1, "out": tmp_path, "amp": "fp16"})


@pytest.mark.parametrize("kwargs, name", [
    (dict(amp="fp8"), "amp"),
    (dict(ema=1.5), "ema"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(threads=0), "threads"),
])
def test_bad_precision_flags_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        train(**{**TINY_HYPERRES, "steps": 1, "out": tmp_path, **kwargs})


# ----------------------------------------------------------------------------- models


def test_hyperres_trains_all_levels_and_is_reproducible(tmp_path):
    kwargs = dict(model="hyperres", task="sr", steps=3, batch=2, crop=32, eval_size=32,
                  model_kwargs=dict(width=8, num_blocks=1), progress=False, threads=1)
    a = train(out=tmp_path / "a", **kwargs)
    b = train(out=tmp_path / "b", **kwargs)
    assert a["train"]["loss"] == b["train"]["loss"] and a["eval"] == b["eval"]
    assert list(a["eval"][-1]["psnr"]) == ["2", "3", "4", "5"]
    assert (tmp_path / "a" / "plot.png").exists()


def test_level_estimator_trains_on_level_regression(tmp_path):
    # It predicts a level, not an image: trained by L1 on the level, evaluated by
    # the mean absolute level error (whatever its architecture: default config).
    history = train(model="hyperres_level_estimator", task="denoise", steps=2, batch=2,
                    out=tmp_path, progress=False, threads=1)
    assert history["metric"] == "level_error" and history["input"] is None
    errors = history["eval"][-1]["level_error"]
    assert list(errors) == ["15", "35", "55", "75"]
    assert all(math.isfinite(v) and v >= 0 for v in errors.values())
    assert (tmp_path / "plot.png").exists()
    model = restorenet.load_model(tmp_path / "model.pt")
    assert model(heldout_images(128)).shape == (2,)


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
    adapter = HyperResAdapter()
    batch = adapter.make_batch(task, clean, torch.Generator().manual_seed(0))
    loss = adapter.batch_loss(model, batch)
    (shape, levels), = model.calls
    assert shape == (12, 3, 16, 16)
    assert levels.tolist() == [15.0] * 3 + [35.0] * 3 + [55.0] * 3 + [75.0] * 3
    g = torch.Generator().manual_seed(0)
    per_level = [(task.degrade(clean, lv, g) * 0.5 - clean).abs().mean() for lv in task.levels]
    torch.testing.assert_close(loss, torch.stack(per_level).mean())


def test_batch_shards_are_disjoint_equal_and_cover_the_batch():
    batch = Batch(torch.arange(8.0).view(8, 1, 1, 1), torch.zeros(8, 1, 1, 1), torch.arange(8.0))
    shards = [batch.shard(r, 4) for r in range(4)]
    assert torch.equal(torch.cat([s.inputs for s in shards]), batch.inputs)
    assert torch.equal(torch.cat([s.levels for s in shards]), batch.levels)
    with pytest.raises(ValueError, match="^batch must split evenly"):
        batch.shard(0, 3)


def test_adarevd_adapter_averages_l1_plus_fft_over_columns():
    torch.manual_seed(0)
    clean = torch.rand(2, 3, 16, 16)
    cols = [torch.rand(2, 3, 16, 16) for _ in range(3)]
    expected = sum((c - clean).abs().mean() + 0.01 * (torch.fft.rfft2(c) - torch.fft.rfft2(clean)).abs().mean()
                   for c in cols) / 3
    loss = AdaRevDAdapter().batch_loss(lambda x: cols, Batch(clean, clean))
    torch.testing.assert_close(AdaRevDAdapter().loss(cols, clean), expected)
    torch.testing.assert_close(loss, expected)
    assert fft_l1_loss(clean, clean).item() == 0


def test_level_estimator_adapter_regresses_the_level():
    task = get_task("denoise")
    clean = torch.rand(4, 3, 16, 16)
    adapter = LevelEstimatorAdapter()
    batch = adapter.make_batch(task, clean, torch.Generator().manual_seed(0))
    assert batch.target.shape == (4,) and set(batch.target.tolist()) <= set(map(float, task.levels))
    predict = lambda x: torch.full((x.shape[0],), 40.0)  # noqa: E731
    torch.testing.assert_close(adapter.batch_loss(predict, batch), (40.0 - batch.target).abs().mean())
    assert adapter.score(torch.tensor([10.0, 30.0]), clean[:2], 25) == {"level_error": [15.0, 5.0]}


# ----------------------------------------------------------------------------- own data


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    """Clean crops of the held-out photos, and noisy/clean pairs of them, as PNGs."""
    root = tmp_path_factory.mktemp("images")
    photos = heldout_images(48)
    g = torch.Generator().manual_seed(0)
    for sub in ("clean", "lq", "gt"):
        (root / sub).mkdir()
    for i, img in enumerate(photos):
        write_image(root / "clean" / f"{i}.png", img)
        write_image(root / "gt" / f"{i}.png", img)
        write_image(root / "lq" / f"{i}.png", (img + 0.1 * torch.randn(img.shape, generator=g)))
    return root


def test_trains_on_a_folder_of_clean_images(image_folders, tmp_path):
    history = train(steps=2, out=tmp_path, data=str(image_folders / "clean"),
                    val=[str(image_folders / "clean")], **TINY_HYPERRES)
    assert list(history["eval"][-1]["psnr"]) == ["15", "35", "55", "75"]
    assert history["config"]["data"] == str(image_folders / "clean")


def test_trains_on_paired_folders_with_paired_validation(image_folders, tmp_path):
    lq, gt = str(image_folders / "lq"), str(image_folders / "gt")
    history = train(**{**TINY_HYPERRES, "task": None}, steps=2, out=tmp_path, paired=[lq, gt],
                    val=[lq, gt], level=25)
    assert list(history["eval"][-1]["psnr"]) == ["25"] and history["level_name"] == "level"
    assert history["input"]["psnr"]["25"] == pytest.approx(20, abs=1)  # noise sigma 0.1
    with pytest.raises(ValueError, match="^level must be given"):
        train(**{**TINY_HYPERRES, "task": None}, steps=1, out=tmp_path, paired=[lq, gt])


# ----------------------------------------------------------------------------- CLI


def test_resolve_config_layers_small_defaults_width_and_kwargs():
    kwargs, settings = resolve_config("nafnet", width=16, model_kwargs=dict(middle_blocks=2),
                                      lr=5e-4, batch=None)
    assert kwargs["width"] == 16 and kwargs["middle_blocks"] == 2
    assert kwargs["enc_blocks"] == SMALL_CONFIGS["nafnet"]["model"]["enc_blocks"]
    assert settings["lr"] == 5e-4 and settings["batch"] == SMALL_CONFIGS["nafnet"]["batch"]
    paper, _ = resolve_config("nafnet", small=False)
    assert paper == {}


def test_model_kwarg_values_parse_as_python_literals():
    args = build_parser().parse_args(["--model", "nafnet", "--task", "sr", "--steps", "1",
                                      "--model-kwarg", "enc_blocks=(1,2)",
                                      "--model-kwarg", "mode=fast"])
    assert dict(args.model_kwarg) == {"enc_blocks": (1, 2), "mode": "fast"}


def test_docstring_examples_are_valid_shell_and_parse():
    # The usage lines at the top of --help, as pasted into a shell: bash -n checks the
    # syntax (an unquoted "enc_blocks=(1,1,2,2)" is a bash syntax error), then the
    # words bash would pass must parse.
    import restorenet.train as module

    text = module.__doc__.split("\n\n")[1].replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if line.strip()]
    assert len(commands) == 4
    for command in commands:
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        words = shlex.split(command)
        build_parser().parse_args(words[words.index("restorenet.train") + 1:])


def test_help_lists_the_model_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in list_models())


def test_bad_model_is_a_clean_argparse_error_listing_the_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "no_such_model", "--task", "denoise", "--steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'no_such_model'" in err and "hyperres" in err and "Traceback" not in err


def test_bad_data_folder_is_a_clean_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "hyperres", "--task", "denoise", "--steps", "1", "--out", str(tmp_path),
              "--data", str(tmp_path / "missing"), "--no-progress", "--threads", "1"])
    assert exit_info.value.code == 2
    assert "data: " in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, name", [
    (dict(model="no_such_model"), "model"),
    (dict(task="inpaint"), "task"),
    (dict(steps=0), "steps"),
    (dict(crop=0), "crop"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        train(**{"model": "nafnet", "task": "denoise", "steps": 2, "out": tmp_path,
                 "progress": False, "model_kwargs": TINY_NAFNET, "threads": 1, **kwargs})


def test_compile_trains_like_eager_and_saves_plain_weights(tmp_path):
    # Inductor reorders float sums, so the losses agree to rounding, not bitwise; the
    # saved weights must carry the model's own keys (no torch.compile "_orig_mod." prefix).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {flag: train(steps=2, out=tmp_path / str(flag), compile=flag, eval_every=100, **TINY_HYPERRES)
            for flag in (False, True)}
    assert counters["stats"]["unique_graphs"] >= 1  # the --compile run went through Dynamo
    eager, compiled = (runs[flag]["train"]["loss"] for flag in (False, True))
    assert compiled == pytest.approx(eager, rel=1e-4)
    model = restorenet.load_model(tmp_path / "True" / "model.pt")
    assert set(model.state_dict()) == set(restorenet.load_model(tmp_path / "False" / "model.pt").state_dict())
