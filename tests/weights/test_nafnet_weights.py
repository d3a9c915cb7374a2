"""NAFNet's released layout (megvii-research/NAFNet) loads and computes the released forward."""
import torch

import restorenet
from _released import nafnet_forward, nafnet_keys, random_state
from restorenet.weights import from_released

CFG = dict(width=8, enc_blocks=(1, 2), middle_blocks=1, dec_blocks=(2, 1))
RELEASED = nafnet_keys(width=8, enc=(1, 2), middle=1, dec=(2, 1))


def test_released_nafnet_loads_and_matches_the_released_forward():
    sd = random_state(RELEASED)
    model = from_released("nafnet", sd, **CFG)
    assert not model.training
    img = torch.rand(2, 3, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        out = model.double()(img)
    truth = nafnet_forward({k: v.double() for k, v in sd.items()}, img)
    torch.testing.assert_close(out, truth, rtol=1e-10, atol=1e-10)


def test_paper_size_key_table_matches_the_model():
    # NAFNet-GoPro-width64: every released key and shape has a place in ours (meta device).
    released = nafnet_keys(width=64, enc=(1, 1, 1, 28), middle=1, dec=(1, 1, 1, 1))
    with torch.device("meta"):
        model = restorenet.create_model("nafnet")
    from restorenet.weights.nafnet import convert
    ours = {k: v.shape for k, v in model.state_dict().items()}
    converted = convert({k: torch.empty(s, device="meta") for k, s in released.items()}, model)
    assert {k: v.shape for k, v in converted.items()} == ours
