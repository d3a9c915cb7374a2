"""MHNet's released layout (Tombs98/MHNet) loads and computes the released forward."""
import math

import pytest
import torch

import restorenet
from _released import mhnet_forward, mhnet_keys, nafnet_keys, random_state
from restorenet.registry import count_parameters
from restorenet.weights import CheckpointMismatch, from_released
from restorenet.weights.mhnet import convert, unused

CFG = dict(width=8, enc_blocks=(1, 1, 1, 1), dec_blocks=(1, 1, 1, 1), cabg_blocks=1)


@pytest.mark.parametrize("taps", ["shared", "per_level"])
def test_released_mhnet_loads_and_matches_the_released_forward(taps):
    sd = random_state(mhnet_keys(width=8))
    model = from_released("mhnet", {"state_dict": sd, "epoch": 3000}, decoder_tap_convs=taps, **CFG)
    img = torch.rand(1, 3, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model.double()(img)
    truth = mhnet_forward({k: v.double() for k, v in sd.items()}, img)
    torch.testing.assert_close(out, truth, rtol=1e-9, atol=1e-9)
    # The fold: the four released scalars are our mix_weights, in order.
    torch.testing.assert_close(model.stage1.middle.mix_weights.float(),
                               torch.cat([sd[f"stage1.middle_blks.0.attn{j}"] for j in range(1, 5)]))


def test_the_unnormalised_residual_variant_differs_from_the_released_forward():
    sd = random_state(mhnet_keys(width=8))
    img = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    model = from_released("mhnet", sd, stage2_residual="input", **CFG).double()
    truth = mhnet_forward({k: v.double() for k, v in sd.items()}, img)
    with torch.no_grad():
        assert (model(img) - truth).abs().max() > 1e-3


def test_paper_size_counts_released_minus_the_unused():
    released = mhnet_keys(width=64, enc=(1, 1, 1, 28), num_cab=8)
    total = sum(math.prod(s) for s in released.values())
    assert total == 67_543_311
    dropped = sum(math.prod(released[k]) for k in unused(4))
    assert dropped == 1_728 + 1_731 + 3 * 4_096
    with torch.device("meta"):
        model = restorenet.create_model("mhnet")
    assert count_parameters(model) == total - dropped == 67_527_564
    converted = convert({k: torch.empty(s, device="meta") for k, s in released.items()}, model)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_wrong_checkpoints_are_named():
    sd = random_state(mhnet_keys(width=8))
    del sd["stage1.middle_blks.0.attn3"]   # the fold cannot happen: named, not guessed
    with pytest.raises(CheckpointMismatch) as err:
        from_released("mhnet", sd, **CFG)
    assert err.value.missing == ["stage1.middle.mix_weights"]
    assert sorted(err.value.unexpected) == [f"stage1.middle.attn{j}" for j in (1, 2, 4)]
    with pytest.raises(CheckpointMismatch, match="unexpected keys \\(1\\): stage2.extra"):
        from_released("mhnet", random_state(mhnet_keys(width=8)) | {"stage2.extra": torch.zeros(1)},
                      **CFG)
    nafnet = random_state(nafnet_keys(width=8, enc=(1, 1, 1, 1), dec=(1, 1, 1, 1)))
    with pytest.raises(CheckpointMismatch, match="(?s)missing keys.*unexpected keys"):
        from_released("mhnet", nafnet, **CFG)
