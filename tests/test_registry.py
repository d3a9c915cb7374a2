"""The model registry: every name builds at paper size (on the meta device)."""
import pytest
import torch

import restorenet
from restorenet.registry import register_model

PAPER_MODELS = ["adarevd", "mhnet", "hyperres", "constyle_nafnet", "ddsnet", "nafnet"]


def test_every_paper_model_is_registered():
    assert set(PAPER_MODELS) <= set(restorenet.list_models())
    assert restorenet.list_models() == sorted(restorenet.list_models())


@pytest.mark.parametrize("name", restorenet.list_models())
def test_builds_at_paper_size_on_meta(name):
    with torch.device("meta"):
        model = restorenet.create_model(name)
    assert isinstance(model, torch.nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_name_is_named():
    with pytest.raises(ValueError, match="unknown model name='resnet'"):
        restorenet.create_model("resnet")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_model("hyperres")(lambda **cfg: None)
