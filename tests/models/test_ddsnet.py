"""DDS-Net: per-sample widths, the gate, straight-through gradients, FLOPs."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from restorenet.models.ddsnet import DDSNet, SlimConv2d, hard_gumbel_straight_through, width_choices
from restorenet.registry import create_model


def small_model(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"width": 32, "depth": 2, **cfg}
    return create_model("ddsnet", **cfg)


def counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_default_config_and_choices():
    with torch.device("meta"):
        model = create_model("ddsnet")
    assert isinstance(model, DDSNet)
    assert model.choices == [16, 32, 48, 64]
    assert sum(p.numel() for p in model.parameters()) > 0
    assert width_choices(32, 4) == [8, 16, 24, 32]
    assert all(k % 8 == 0 for k in width_choices(96, 3))


def test_mixed_width_batch_equals_each_image_alone():
    model = small_model().eval()
    x = torch.randn(4, 3, 9, 11)
    widths = torch.tensor([8, 32, 16, 8])
    batched = model(x, width=widths)
    for n in range(4):
        alone = model(x[n:n + 1], width=int(widths[n]))
        torch.testing.assert_close(batched[n:n + 1], alone, rtol=0, atol=0)
    # Different widths are really different sub-networks.
    assert (model(x[:1], width=8) - model(x[:1], width=32)).abs().max() > 1e-6


def test_gate_choice_equals_forced_run_in_eval_and_train():
    model = small_model()
    x = torch.randn(6, 3, 8, 8)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(5)
        out, widths = model(x, return_widths=True)
        assert widths.shape == (6,) and widths.dtype == torch.int64
        assert set(widths.tolist()) <= set(model.choices)
        # The straight-through mask changes no value.
        torch.testing.assert_close(out, model(x, width=widths), rtol=0, atol=0)


def test_eval_gate_is_the_argmax_of_its_logits():
    model = small_model().eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        model.gate.to_logits.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    _, widths = model(x, return_widths=True)
    expected = torch.tensor(model.choices)[model.gate_logits(x).argmax(-1)]
    assert torch.equal(widths, expected) and torch.all(widths == 24)


def test_train_gate_samples_several_widths():
    model = small_model().train()
    torch.manual_seed(1)
    _, widths = model(torch.randn(16, 3, 2, 2), return_widths=True)
    assert len(set(widths.tolist())) >= 2


def test_straight_through_gradient_reaches_gate():
    model = small_model().train()
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(2)
    model(x).square().mean().backward()
    for p in model.gate.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # Forced widths bypass the gate: no gradient there.
    model.zero_grad(set_to_none=True)
    model(x, width=16).square().mean().backward()
    assert all(p.grad is None for p in model.gate.parameters())


def test_hard_gumbel_is_exactly_one_hot_with_soft_gradient():
    torch.manual_seed(3)
    logits = torch.randn(5, 4, requires_grad=True)
    z = hard_gumbel_straight_through(logits)
    assert torch.all((z == 0) | (z == 1)) and torch.all(z.sum(-1) == 1)
    (z * torch.arange(4.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_inactive_channels_stay_zero_inside_the_network():
    model = small_model().train()
    x = torch.randn(3, 3, 6, 6)
    feats = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o))
             for m in model.modules() if isinstance(m, SlimConv2d) and m is not model.tail]
    torch.manual_seed(4)
    _, widths = model(x, return_widths=True)
    for h in hooks:
        h.remove()
    assert len(feats) == 1 + 2 * 2
    for f in feats:
        for n in range(3):
            assert torch.all(f[n, widths[n]:] == 0)


def test_forward_backward_finite_any_size_and_batch_one():
    model = small_model().train()
    for shape in [(1, 3, 7, 5), (2, 3, 1, 3)]:
        x = torch.randn(*shape, requires_grad=True)
        y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.mean().backward()
        assert torch.isfinite(x.grad).all()
    assert small_model(in_channels=1)(torch.randn(1, 1, 5, 5)).shape == (1, 1, 5, 5)


def test_flops_grow_with_width_and_include_the_gate():
    model = small_model()
    flops = model.flops((12, 10))
    values = [flops[k] for k in model.choices]
    assert values == sorted(values) and len(set(values)) == len(values)
    gate = model.gate_flops((12, 10))
    assert gate > 0
    for k in model.choices:
        assert model.flops((12, 10), k) == model.flops((12, 10), k, include_gate=False) + gate


def test_flops_match_torch_flop_counter():
    model = small_model().eval()
    x = torch.randn(1, 3, 12, 10)
    for k in model.choices:
        assert counted_flops(lambda: model(x, width=k)) == model.flops((12, 10), k, include_gate=False)
    _, (k,) = model(x, return_widths=True)
    assert counted_flops(lambda: model(x)) == model.flops((12, 10), int(k))


@pytest.mark.parametrize("x,width,exc,name", [
    (torch.randn(1, 4, 8, 8), None, ValueError, "x"),
    ("img", None, TypeError, "x"),
    (torch.randn(2, 3, 8, 8), 12, ValueError, "width"),
    (torch.randn(2, 3, 8, 8), torch.tensor([8, 12]), ValueError, "width"),
    (torch.randn(2, 3, 8, 8), torch.tensor([8, 16, 24]), ValueError, "width"),
    (torch.randn(2, 3, 8, 8), torch.tensor([8.0, 16.0]), TypeError, "width"),
    (torch.randn(2, 3, 8, 8), 8.0, TypeError, "width"),
])
def test_errors_name_the_argument(x, width, exc, name):
    model = small_model()
    with pytest.raises(exc, match=f"^{name}"):
        model(x, width=width)


def test_config_errors():
    with pytest.raises(ValueError, match="^width"):
        create_model("ddsnet", width=20)
    with pytest.raises(ValueError, match="^width"):
        create_model("ddsnet", width=16, num_choices=4)
    with pytest.raises(ValueError, match="^num_choices"):
        create_model("ddsnet", num_choices=0)
    with pytest.raises(ValueError, match="^width"):
        small_model().flops(8, width=12)
    with pytest.raises(ValueError, match="^image_size"):
        small_model().flops((8,), width=8)
