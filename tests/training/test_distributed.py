import os

import pytest
import torch

from restorenet.train import train
from restorenet.training import distributed
from restorenet.training.distributed import _cgroup_cpu_limit, available_cpus, default_threads, spawn_local

STEPS, LR = 3, 2e-3
RUN = dict(model="hyperres", task="denoise", steps=STEPS, batch=4, crop=32, eval_size=32, lr=LR,
           model_kwargs=dict(width=8, num_blocks=1), eval_every=100, progress=False, threads=1)


def test_two_gloo_processes_with_half_batches_match_one_process_with_the_whole(tmp_path):
    """torchrun's setting (spawned here): 2 ranks x batch 2 each == 1 process x batch 4.

    Both see the same global batch; DDP averages the two half-batch gradients, which
    equals the whole batch's gradient up to float summation order (~1e-7 relative).
    Adam turns a gradient into a step of size <= ~lr per weight whatever its scale,
    and a relative gradient change d changes that step by ~d * lr (unless a gradient
    is as small as eps = 1e-8, where the step is tiny either way). So after k steps
    the weights agree to ~k * lr * 1e-6; we allow k * lr * 1e-3, a thousand times
    that, and still far below what one different sample would change (checked)."""
    # fork: the test process runs one thread (conftest) and no CUDA; it saves each
    # process the seconds of importing torch again.
    spawn_local(train, 2, start_method="fork", out=str(tmp_path / "ddp"), **RUN)
    single = train(out=tmp_path / "single", **RUN)
    other_seed = train(out=tmp_path / "seed1", seed=1, **RUN)
    weights = {name: torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]
               for name in ("ddp", "single", "seed1")}
    tolerance = STEPS * LR * 1e-3
    diff = max((weights["ddp"][k] - weights["single"][k]).abs().max().item() for k in weights["single"])
    assert diff <= tolerance
    control = max((weights["seed1"][k] - weights["single"][k]).abs().max().item() for k in weights["single"])
    assert control > 100 * tolerance
    ddp_history = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["history"]
    # Logged losses are the mean over the ranks: the whole batch's loss.
    assert ddp_history["train"]["loss"] == pytest.approx(single["train"]["loss"], rel=1e-5)
    assert len(torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["rng"]) == 2
    assert other_seed["train"]["loss"] != single["train"]["loss"]


def test_batch_must_split_over_the_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "setup", lambda device: distributed.DistContext(0, 3))
    with pytest.raises(ValueError, match="^batch must be divisible by the number of processes"):
        train(out=tmp_path, **RUN)


def test_default_threads_shares_the_cpus_among_local_processes(monkeypatch):
    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or cpus)
    monkeypatch.setattr(distributed, "available_cpus", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (250.0, 0.0, 0.0))  # load never changes it
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1


@pytest.mark.parametrize("text, cpus", [("max 100000\n", None), ("150000 100000\n", 1.5),
                                        ("garbage", None)])
def test_cgroup_quota_is_read_as_cpus(tmp_path, text, cpus):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert _cgroup_cpu_limit(path) == cpus
    assert _cgroup_cpu_limit(tmp_path / "missing") is None
