"""HyperRes's released layouts (ifryed/HyperRes): the main network and NoiseNet."""
import math

import pytest
import torch

import restorenet
from _released import (hyperres_forward, hyperres_keys, noisenet_forward, noisenet_keys,
                       random_state)
from restorenet.registry import count_parameters
from restorenet.weights import CheckpointMismatch, from_released


def _double(sd):
    return {k: v.double() for k, v in sd.items()}


@pytest.mark.parametrize("levels", [[15.0, 50.0], [0.2, 0.6]])  # raw, and already normalised
def test_released_hyperres_loads_and_matches_the_released_forward(levels):
    sd = random_state(hyperres_keys(meta_blocks=2), std=0.05)
    ckpt = {"epoch": 10, "arch": "Unet", "state_dict": {"module." + k: v for k, v in sd.items()},
            "best_prec1": 30.1, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "sigmas": [15, 35, 55, 75]}
    model = from_released("hyperres", ckpt, num_blocks=2).double()
    x = torch.rand(2, 3, 8, 10, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, torch.tensor(levels, dtype=torch.float64))
    truth = torch.cat(hyperres_forward(_double(sd), [x[:1], x[1:]], levels))
    torch.testing.assert_close(out, truth, rtol=1e-10, atol=1e-10)


def test_released_noisenet_loads_and_matches_the_released_forward():
    sd = random_state(noisenet_keys(width=8, crop=32), std=0.2)
    model = from_released("hyperres_level_estimator", sd, width=8, crop_size=32, crop="center").double()
    x = torch.rand(3, 3, 36, 40, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    truth = noisenet_forward(_double(sd), x[..., 2:34, 4:36])
    torch.testing.assert_close(out, truth[:, 0], rtol=1e-10, atol=1e-10)


def test_paper_size_counts_equal_the_released():
    with torch.device("meta"):
        hyperres = restorenet.create_model("hyperres")
        noisenet = restorenet.create_model("hyperres_level_estimator")
    for model, table in ((hyperres, hyperres_keys(16)), (noisenet, noisenet_keys())):
        assert count_parameters(model) == sum(math.prod(s) for s in table.values())
    assert count_parameters(hyperres) == 2_588_483 and count_parameters(noisenet) == 330_561


def test_wrong_checkpoints_are_named():
    sd = random_state(hyperres_keys(meta_blocks=2), std=0.05)
    with pytest.raises(CheckpointMismatch) as err:   # a 2-block checkpoint into a 1-block model
        from_released("hyperres", sd, num_blocks=1)
    assert err.value.unexpected == [f"blocks.1.conv{k}.meta.{p}" for k in (1, 2) for p in ("bias", "weight")]
    with pytest.raises(CheckpointMismatch, match=r"head.weight \(checkpoint \[64, 3, 3, 3\], model \[64, 1, 3, 3\]"):
        from_released("hyperres", sd, num_blocks=2, in_channels=1)
    with pytest.raises(CheckpointMismatch, match="(?s)missing keys.*unexpected keys"):
        from_released("hyperres_level_estimator", sd)
    with pytest.raises(CheckpointMismatch, match="(?s)missing keys.*unexpected keys"):
        from_released("hyperres_level_estimator", random_state(noisenet_keys()), architecture="five_conv")
