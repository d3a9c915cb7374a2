"""Checkpoint layouts and strict loading (restorenet/weights/_load.py), on NAFNet."""
import pytest
import torch

import restorenet
from _released import nafnet_keys, random_state
from restorenet.weights import CheckpointMismatch, from_released

CFG = dict(width=4, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,))
RELEASED = nafnet_keys(width=4, enc=(1,), middle=1, dec=(1,))


def _loaded(model):
    return model.ending.bias.detach().clone()


@pytest.fixture
def sd():
    return random_state(RELEASED)


@pytest.mark.parametrize("layout", ["raw", "params", "state_dict", "module", "params_module"])
def test_layouts_load_the_same_weights(sd, layout):
    wrapped = {
        "raw": sd,
        "params": {"params": sd},
        "state_dict": {"state_dict": sd, "epoch": 300, "best_psnr": 33.7, "optimizer": {"lr": 1e-3}},
        "module": {"module." + k: v for k, v in sd.items()},
        "params_module": {"params": {"module." + k: v for k, v in sd.items()}},
    }[layout]
    torch.testing.assert_close(_loaded(from_released("nafnet", wrapped, **CFG)), sd["ending.bias"],
                               rtol=0, atol=0)


def test_params_ema_is_preferred_unless_params_is_asked_for(sd):
    ema = {k: v + 1 for k, v in sd.items()}
    ckpt = {"params": sd, "params_ema": ema}
    torch.testing.assert_close(_loaded(from_released("nafnet", ckpt, **CFG)), ema["ending.bias"])
    chosen = from_released("nafnet", ckpt, checkpoint_key="params", **CFG)
    torch.testing.assert_close(_loaded(chosen), sd["ending.bias"])
    with pytest.raises(ValueError, match="checkpoint_key='ema'"):
        from_released("nafnet", ckpt, checkpoint_key="ema", **CFG)


def test_path_is_read_weights_only_and_create_model_takes_weights(sd, tmp_path, monkeypatch):
    path = tmp_path / "NAFNet-width4.pth"
    torch.save({"params": sd}, path)
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    for model in (from_released("nafnet", path, **CFG), from_released("nafnet", str(path), **CFG),
                  restorenet.create_model("nafnet", weights=path, **CFG)):
        assert not model.training
        torch.testing.assert_close(_loaded(model), sd["ending.bias"])
    assert calls and all(kw.get("weights_only") is True for kw in calls)


def test_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"params": {"ending.bias": torch.zeros(3)}, "cfg": object()}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        from_released("nafnet", path, **CFG)


def _mismatch(ckpt) -> CheckpointMismatch:
    model = restorenet.create_model("nafnet", **CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from restorenet.weights import _load, nafnet
    with pytest.raises(CheckpointMismatch) as err:
        _load.load_strict(model, nafnet.convert(ckpt, model), "nafnet")
    # Never a partial load: the model is untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return err.value


def test_a_missing_key_is_named(sd):
    del sd["decoders.0.0.conv4.bias"]
    err = _mismatch(sd)
    assert err.missing == ["decoder.stages.0.0.ffn_expand.bias"] and not err.unexpected and not err.wrong_shape
    assert "missing keys (1): decoder.stages.0.0.ffn_expand.bias" in str(err)


def test_an_extra_key_is_named(sd):
    sd["encoders.0.0.conv6.weight"] = torch.zeros(1)
    err = _mismatch(sd)
    assert err.unexpected == ["encoder.stages.0.0.conv6.weight"] and not err.missing
    assert "unexpected keys (1)" in str(err)


def test_a_wrong_shape_is_named(sd):
    sd["intro.weight"] = torch.zeros(4, 3, 5, 5)
    err = _mismatch(sd)
    assert err.wrong_shape == [("encoder.intro.weight", (4, 3, 5, 5), (4, 3, 3, 3))]
    assert "encoder.intro.weight (checkpoint [4, 3, 5, 5], model [4, 3, 3, 3])" in str(err)


def test_a_checkpoint_of_another_config_or_model_is_refused(sd):
    with pytest.raises(CheckpointMismatch, match="wrongly shaped"):
        from_released("nafnet", sd, **{**CFG, "width": 8})
    with pytest.raises(CheckpointMismatch, match="(?s)missing keys.*unexpected keys"):
        from_released("nafnet", {"params": {"conv_first.weight": torch.zeros(4, 3, 3, 3)}}, **CFG)
    assert isinstance(CheckpointMismatch("m", [], [], []), ValueError)


def test_bad_arguments_are_named(sd):
    with pytest.raises(TypeError, match="checkpoint must be a path or a mapping"):
        from_released("nafnet", [sd], **CFG)
    with pytest.raises(ValueError, match="name='resnet'"):
        from_released("resnet", sd)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        from_released("nafnet", {"epoch": 3, "net": sd}, **CFG)
