"""ConStyle-NAFNet's released layout (Dongqi-Fan/IRConStyle) loads and computes the
released test path."""
import math

import pytest
import torch

import restorenet
from _released import constyle_nafnet_forward, constyle_nafnet_keys, constyle_state
from restorenet.registry import count_parameters
from restorenet.weights import CheckpointMismatch, from_released
from restorenet.weights.constyle_nafnet import convert

CFG = dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 2, 1))
TABLE = dict(dim=8, left=(1, 1, 1), bottom=1, right=(1, 2, 1))  # right: r1, r2, r3


@pytest.mark.parametrize("train", [False, True])  # a checkpoint saved while training holds MoCo state
def test_released_constyle_nafnet_loads_and_matches_the_released_forward(train):
    sd = constyle_state(constyle_nafnet_keys(**TABLE, train=train))
    ema = constyle_state(constyle_nafnet_keys(**TABLE, train=train), seed=1)
    model = from_released("constyle_nafnet", {"params": sd, "params_ema": ema}, **CFG).double()
    img = torch.rand(2, 3, 16, 24, dtype=torch.float64)
    with torch.no_grad():
        out = model(img)
    truth = constyle_nafnet_forward({k: v.double() if v.is_floating_point() else v for k, v in ema.items()}, img)
    torch.testing.assert_close(out, truth, rtol=1e-9, atol=1e-9)


def test_paper_size_count_equals_the_released_inference_model():
    released = constyle_nafnet_keys(dim=48, left=(7, 8, 9), bottom=9, right=(7, 8, 9))
    with torch.device("meta"):
        model = restorenet.create_model("constyle_nafnet")
    assert count_parameters(model) == 12_739_872
    params = {k: s for k, s in released.items() if not any(b in k for b in ("running_", "num_batches"))}
    assert sum(math.prod(s) for s in params.values()) == 12_739_872
    converted = convert({k: torch.empty(s, device="meta") for k, s in released.items()}, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_wrong_checkpoints_are_named():
    sd = constyle_state(constyle_nafnet_keys(**TABLE))
    with pytest.raises(CheckpointMismatch, match="unexpected keys.*dec_stages.1.1"):
        from_released("constyle_nafnet", sd, **{**CFG, "dec_blocks": (1, 1, 1)})
    del sd["ConStyle.encoder_q.mlp2.1.running_var"]
    with pytest.raises(CheckpointMismatch, match=r"missing keys \(1\): style_encoder.mlp.1.1.running_var"):
        from_released("constyle_nafnet", sd, **CFG)
