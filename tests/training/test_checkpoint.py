import random

import numpy as np
import pytest
import torch

import restorenet
from restorenet.training import checkpoint
from restorenet.training.checkpoint import (atomic_save, load_model, rng_state, save_checkpoint,
                                            save_model, set_rng_state, step_files)


def test_rng_state_round_trip_restores_every_generator():
    state = rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]


def test_states_load_with_weights_only(tmp_path):
    path = atomic_save({"rng": rng_state()}, tmp_path / "x.pt")
    set_rng_state(torch.load(path, weights_only=True)["rng"])


def test_an_interrupted_save_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "value": torch.ones(3)}, tmp_path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"partial": True}, f)  # something reached the disk, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "value": torch.zeros(3)}, tmp_path)
    monkeypatch.undo()
    latest = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert latest["step"] == 1 and torch.equal(latest["value"], torch.ones(3))
    assert [p.name for p in step_files(tmp_path)] == ["step-1.pt"]
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []  # no temporary files


def test_keep_last_deletes_the_oldest_by_step_number(tmp_path):
    for step in (1, 2, 9, 10):
        save_checkpoint({"step": step}, tmp_path, keep_last=2)
    assert [p.name for p in step_files(tmp_path)] == ["step-9.pt", "step-10.pt"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10


def test_checkpoint_pt_survives_without_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    save_checkpoint({"step": 3}, tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


def test_load_model_rebuilds_name_kwargs_and_weights(tmp_path):
    model = restorenet.create_model("hyperres", width=8, num_blocks=1)
    save_model(tmp_path / "model.pt", "hyperres", dict(width=8, num_blocks=1), model.state_dict())
    loaded = restorenet.load_model(tmp_path / "model.pt")
    assert not loaded.training
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x, 25.0), model.eval()(x, 25.0), rtol=0, atol=0)


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing.pt", "no such file"),
    (lambda p: (p / "junk.pt").write_bytes(b"not a checkpoint") and p / "junk.pt", "cannot load"),
    (lambda p: atomic_save({"a": 1}, p / "other.pt"), "not a restorenet model"),
])
def test_load_model_errors_name_the_file(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        load_model(path)
    assert str(path) in str(info.value)
