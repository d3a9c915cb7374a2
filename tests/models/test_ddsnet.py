"""DDS-Net: per-sample widths, the gate, straight-through gradients, FLOPs,
width validation once per forward, the gate's training objective."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from restorenet.models.ddsnet import (DDSNet, SlimConv2d, WidthGate, balanced_class_weights,
                                      hard_gumbel_straight_through, width_choices)
from restorenet.ops import use_backend
from restorenet.registry import count_parameters, create_model

from _host_reads import count_host_reads, sync_free_slim_reference


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
    assert count_parameters(model) > 0
    assert width_choices(32, 4) == [8, 16, 24, 32]
    assert all(k % 8 == 0 for k in width_choices(96, 3))


def test_choice_table_follows_the_model_and_stays_out_of_the_state_dict():
    model = DDSNet(width=32, depth=1)
    assert model.choice_table.tolist() == model.choices and model.choice_table.dtype == torch.int32
    assert "choice_table" not in model.state_dict()
    assert model.to(torch.float64).choice_table.dtype == torch.int32  # integer buffers keep their dtype


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


def test_forced_width_sequence_equals_tensor_and_is_checked_on_the_host(monkeypatch):
    model, x = small_model(), torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x, width=[8, 32]), model(x, width=torch.tensor([8, 32])))
    assert host_reads_of_forward(monkeypatch, model, x, (32, 8))[1] == 0
    for bad, exc in (([8, 12], ValueError), ([8], ValueError), ([8.0, 16.0], TypeError)):
        with pytest.raises(exc, match="^width"):
            model(x, width=bad)


def test_empty_batch_is_rejected():
    with pytest.raises(ValueError, match="^x must hold at least one image"):
        small_model()(torch.randn(0, 3, 6, 6))


@pytest.mark.parametrize("cfg,name", [
    (dict(depth=True), "depth"), (dict(in_channels=-3), "in_channels"), (dict(gate_hidden=0), "gate_hidden"),
    (dict(gate_tau=0.0), "gate_tau"), (dict(gate_tau=float("nan")), "gate_tau"), (dict(num_choices=True), "num_choices"),
])
def test_constructor_arguments_are_checked(cfg, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        create_model("ddsnet", **cfg)


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


# ------------------------------------------------- width validation once per forward
def host_reads_of_forward(monkeypatch, model, x, width):
    """(output, host reads) of ``model(x, width)``, with the reference backend's
    per-sample loop (which reads widths to slice) swapped for a sync-free
    masked conv with the same values, so only the checks are counted."""
    def forward():
        with use_backend("reference"):
            return model(x, width)

    with monkeypatch.context() as m:
        sync_free_slim_reference(m)
        return count_host_reads(m, forward)


@pytest.mark.parametrize("train", [False, True])
def test_forward_validates_widths_at_most_once(monkeypatch, train):
    model = small_model(depth=3).train(train)  # 8 slim convs: 16 width arguments
    x = torch.randn(4, 3, 6, 6)
    forced = torch.tensor([8, 32, 16, 8])
    torch.manual_seed(0)
    out, reads = host_reads_of_forward(monkeypatch, model, x, forced)
    assert reads <= 1
    torch.testing.assert_close(out, model(x, width=forced))  # masked conv: fp32 rounding differs
    assert host_reads_of_forward(monkeypatch, model, x, 16)[1] == 0
    torch.manual_seed(1)
    out, reads = host_reads_of_forward(monkeypatch, model, x, None)  # gate picks: choices by construction
    assert reads == 0 and out.shape == x.shape


def test_forced_widths_still_checked_once_per_forward():
    model = small_model()
    with pytest.raises(ValueError, match="^width must hold values from"):
        model(torch.randn(2, 3, 4, 4), width=torch.tensor([8, 33]))


# ------------------------------------------------------------------ gate objective
def test_all_widths_runs_every_sub_network_in_one_batch():
    model = small_model().eval()
    x = torch.randn(2, 3, 5, 7)
    outs = model.all_widths(x)
    assert outs.shape == (len(model.choices), *x.shape)
    for i, k in enumerate(model.choices):
        torch.testing.assert_close(outs[i], model(x, width=k), rtol=0, atol=0)


def test_gate_targets_pick_the_narrowest_width_within_tau(monkeypatch):
    model = small_model().eval()
    clean = torch.rand(3, 3, 4, 4)
    # Fake sub-network outputs with known PSNRs per (choice, image): error e -> PSNR -20 log10 e.
    psnr = torch.tensor([[20.0, 30.0, 40.0],
                         [29.95, 30.9, 40.0],
                         [30.0, 31.05, 39.0],
                         [30.0, 31.1, 35.0]])
    error = 10 ** (-psnr / 20)
    fake = clean[None] + error[:, :, None, None, None]
    fake = torch.where(fake > 1, clean[None] - error[:, :, None, None, None], fake)
    monkeypatch.setattr(model, "all_widths", lambda x: fake)
    assert model.gate_targets(clean, clean, tau_db=0.1).tolist() == [1, 2, 0]
    assert model.gate_targets(clean, clean, tau_db=0.0).tolist() == [2, 3, 0]
    assert model.gate_targets(clean, clean, tau_db=100.0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="^clean"):
        model.gate_targets(clean, clean[:2])
    with pytest.raises(ValueError, match="^tau_db"):
        model.gate_targets(clean, clean, tau_db=-1)


def test_gate_loss_is_cross_entropy_plus_expected_relative_cost():
    model = small_model()
    costs = model.relative_costs()
    assert costs[-1] == 1 and torch.all(costs[1:] > costs[:-1])
    flops = model.flops((5, 9), include_gate=False)
    assert costs[0].item() == pytest.approx(flops[model.choices[0]] / flops[model.choices[-1]])
    logits = torch.randn(5, len(model.choices), requires_grad=True)
    targets = torch.tensor([0, 3, 1, 2, 3])
    want = F.cross_entropy(logits, targets) + 0.5 * (logits.softmax(-1) * costs).sum(-1).mean()
    torch.testing.assert_close(model.gate_loss(logits, targets, cost_weight=0.5), want)
    # The cost term alone pushes probability towards narrower widths.
    model.gate_loss(logits, targets, cost_weight=1e6).backward()
    assert logits.grad[:, 0].sum() < 0 < logits.grad[:, -1].sum()
    with pytest.raises(ValueError, match="^logits"):
        model.gate_loss(logits[:, :2], targets)
    with pytest.raises(ValueError, match="^targets"):
        model.gate_loss(logits, targets.float())


def test_balanced_class_weights_are_n_over_classes_seen_times_count():
    counts = torch.tensor([1, 0, 9, 19, 71])
    # n = 100 targets over 4 classes seen: w_k = 100 / (4 n_k); the unseen class weighs 0.
    want = torch.tensor([100 / 4, 0, 100 / 36, 100 / 76, 100 / 284], dtype=torch.float64)
    torch.testing.assert_close(balanced_class_weights(counts), want)
    # Balanced: every seen class carries the same total weight n / K_present.
    assert torch.allclose(balanced_class_weights(counts) * counts, torch.tensor([25., 0, 25, 25, 25]).double())
    with pytest.raises(ValueError, match="^counts"):
        balanced_class_weights(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="^counts"):
        balanced_class_weights(torch.zeros(3))


def test_gate_loss_with_class_weights_is_the_weighted_mean_of_cross_entropies():
    model = small_model()
    logits = torch.randn(5, len(model.choices))
    targets = torch.tensor([0, 3, 3, 2, 3])
    weights = balanced_class_weights(torch.bincount(targets, minlength=4))
    per_image = -logits.log_softmax(-1)[torch.arange(5), targets]
    w = weights.float()[targets]
    want = (w * per_image).sum() / w.sum() + 0.3 * (logits.softmax(-1) * model.relative_costs()).sum(-1).mean()
    torch.testing.assert_close(model.gate_loss(logits, targets, cost_weight=0.3, class_weights=weights), want)
    with pytest.raises(ValueError, match="^class_weights"):
        model.gate_loss(logits, targets, class_weights=weights[:2])


def test_gate_pool_mean_sq_feeds_the_mean_and_the_mean_square():
    torch.manual_seed(0)
    gate = WidthGate(3, 4, hidden=5, pool="mean_sq")
    g = torch.rand(2, 3, 4, 6)
    pooled = torch.cat([g.mean((2, 3)), g.square().mean((2, 3))], 1)
    hidden = F.relu(pooled @ gate.reduce.weight.flatten(1).t() + gate.reduce.bias)
    want = hidden @ gate.to_logits.weight.flatten(1).t() + gate.to_logits.bias
    torch.testing.assert_close(gate(g), want)
    model = DDSNet(width=16, depth=1, num_choices=2, gate_pool="mean_sq").eval()
    assert model.gate_logits(torch.rand(2, 3, 8, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match="^pool"):
        WidthGate(3, 4, pool="max")


def test_gate_learns_targets_from_gate_loss():
    """A few steps of the stage-3 objective move the gate's picks to the targets."""
    model = small_model().eval()
    x = torch.randn(8, 3, 6, 6) * torch.linspace(0.1, 2, 8).view(-1, 1, 1, 1)
    targets = torch.tensor([0, 0, 0, 0, 3, 3, 3, 3])
    opt = torch.optim.Adam(model.gate.parameters(), lr=0.05)
    for _ in range(60):
        loss = model.gate_loss(model.gate_logits(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, picked = model(x, return_widths=True)
    assert picked.tolist() == [model.choices[i] for i in targets.tolist()]


# ------------------------------------------------- per-layer width configurations
def test_uniform_config_is_the_uniform_width():
    model = small_model().eval()  # width 32, depth 2: configurations (stream, inner_1, inner_2)
    assert model.num_groups == 3 and model.uniform_config(16) == (16, 16, 16)
    assert model.configs == [model.uniform_config(k) for k in model.choices]  # the gate's default
    x = torch.randn(2, 3, 7, 6)
    for k in model.choices:
        torch.testing.assert_close(model(x, config=(k,) * 3), model(x, width=k), rtol=0, atol=0)
        torch.testing.assert_close(model(x, config=torch.tensor((k,) * 3)), model(x, width=k), rtol=0, atol=0)
        assert model.flops((7, 6), config=(k,) * 3) == model.flops((7, 6), k)


def test_mixed_configuration_batch_equals_each_image_alone():
    """Exact (atol 0): every backend computes a sample's output from its own active
    channels only, in an order that does not depend on the rest of the batch."""
    model = small_model().eval()
    x = torch.randn(4, 3, 9, 11)
    configs = [(32, 8, 24), (8, 32, 16), (24, 24, 8), (16, 16, 16)]
    batched = model(x, config=configs)
    as_tensor = model(x, config=torch.tensor(configs))
    torch.testing.assert_close(as_tensor, batched, rtol=0, atol=0)
    for n, c in enumerate(configs):
        torch.testing.assert_close(batched[n:n + 1], model(x[n:n + 1], config=c), rtol=0, atol=0)
    # Inner widths matter: same stream, different inner widths, different outputs.
    assert (model(x[:1], config=(32, 8, 24)) - model(x[:1], config=(32, 32, 32))).abs().max() > 1e-6


def test_mixed_configuration_batch_runs_one_slim_launch_per_layer(monkeypatch):
    import restorenet.models.ddsnet as ddsnet_module

    calls = []
    real = ddsnet_module.slim_conv2d
    monkeypatch.setattr(ddsnet_module, "slim_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small_model()
    model(torch.randn(3, 3, 5, 5), config=[(32, 8, 24), (8, 32, 16), (24, 24, 8)])
    assert len(calls) == 1 + 2 * 2 + 1  # head, two convs per block, tail


def test_inactive_channels_of_a_configuration_stay_zero():
    model = small_model()
    config = (16, 8, 24)
    feats = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: feats.__setitem__(name, o))
             for name, m in model.named_modules() if isinstance(m, SlimConv2d)]
    model(torch.randn(2, 3, 6, 6), config=config)
    for h in hooks:
        h.remove()
    assert torch.all(feats["head"][:, 16:] == 0) and feats["head"][:, :16].abs().sum() > 0
    for b, inner in enumerate(config[1:]):
        conv1, conv2 = feats[f"blocks.{b}.conv1"], feats[f"blocks.{b}.conv2"]
        assert torch.all(conv1[:, inner:] == 0) and conv1[:, :inner].abs().sum() > 0
        assert torch.all(conv2[:, 16:] == 0)


def test_flops_of_a_configuration_match_the_hand_formula_and_the_counter():
    model = small_model().eval()
    h, w = 12, 10
    for s, i1, i2 in [(16, 8, 24), (8, 32, 32), (32, 32, 32), (24, 8, 8)]:
        hand = 2 * 9 * h * w * (3 * s + 2 * s * i1 + 2 * s * i2 + s * 3)
        assert model.flops((h, w), config=(s, i1, i2), include_gate=False) == hand
        assert model.flops((h, w), config=(s, i1, i2)) == hand + model.gate_flops((h, w))
        x = torch.randn(1, 3, h, w)
        assert counted_flops(lambda: model(x, config=(s, i1, i2))) == hand


@pytest.mark.parametrize("config,exc,name", [
    ((32, 8), ValueError, "config"),                            # depth + 1 = 3 widths
    ((32, 8, 0), ValueError, "config"),
    ((32, 8, 33), ValueError, "config"),
    ((32, 8.0, 8), TypeError, "config"),
    ([(32, 8, 8)] * 3, ValueError, "config"),                   # N = 2
    ([(32, 8, 8), (8, 8)], ValueError, r"config\[1\]"),
    (torch.tensor([32, 8]), ValueError, "config"),
    (torch.tensor([[32, 8, 8]] * 3), ValueError, "config"),
    (torch.tensor([[32, 8, 8], [40, 8, 8]]), ValueError, "config"),
    (torch.tensor([32.0, 8.0, 8.0]), TypeError, "config"),
    ("wide", TypeError, "config"),
])
def test_bad_configurations_name_the_argument(config, exc, name):
    model = small_model()
    with pytest.raises(exc, match=f"^{name}"):
        model(torch.randn(2, 3, 6, 6), config=config)


def test_configuration_api_errors_name_the_argument():
    model = small_model()
    with pytest.raises(ValueError, match="^config"):
        model(torch.randn(2, 3, 6, 6), width=8, config=(8, 8, 8))
    with pytest.raises(ValueError, match="^config"):
        model.flops(8, config=(8, 8, 64))
    with pytest.raises(ValueError, match=r"^configs\[1\]"):
        model.set_gate_configs([(8, 8, 8), (8, 8)])
    with pytest.raises(ValueError, match="^configs must be in strictly increasing FLOPs"):
        model.set_gate_configs([(16, 16, 16), (8, 8, 8)])
    with pytest.raises(ValueError, match="^configs"):
        model.set_gate_configs([])
    with pytest.raises(ValueError, match=r"^configs\[0\]"):
        model.all_configs(torch.randn(1, 3, 4, 4), [(8,)])


def test_tensor_configuration_is_validated_with_one_host_read(monkeypatch):
    model = small_model(depth=3)
    x = torch.randn(2, 3, 6, 6)
    configs = torch.tensor([[32, 8, 16, 24], [8, 8, 32, 16]])

    def forward(config):
        with use_backend("reference"):
            return model(x, config=config)

    with monkeypatch.context() as m:
        sync_free_slim_reference(m)
        _, reads = count_host_reads(m, lambda: forward(configs))
        as_list = configs.tolist()
        _, host_reads = count_host_reads(m, lambda: forward(as_list))
    assert reads <= 1 and host_reads == 0


def test_gate_chooses_among_given_configurations():
    model = small_model()
    configs = [(8, 8, 16), (16, 24, 8), (32, 32, 32)]
    model.set_gate_configs(configs)
    assert model.configs == configs and model.gate_logits(torch.randn(2, 3, 4, 4)).shape == (2, 3)
    costs = model.relative_costs()
    flops = [model.flops(7, config=c, include_gate=False) for c in configs]
    torch.testing.assert_close(costs, torch.tensor([f / flops[-1] for f in flops]))
    x = torch.randn(6, 3, 8, 8)
    for train in (False, True):
        model.train(train)
        torch.manual_seed(3)
        out, stream = model(x, return_widths=True)
        torch.manual_seed(3)
        picks = model.gate_logits(x)
        picks = (hard_gumbel_straight_through(picks, model.gate_tau) if train else picks).argmax(-1)
        rows = [configs[i] for i in picks.tolist()]
        assert stream.tolist() == [r[0] for r in rows]
        # The straight-through masks change no value: the gate's run is the forced one.
        torch.testing.assert_close(out, model(x, config=rows), rtol=0, atol=0)
    assert torch.equal(model.eval().gate_pick(x), model.gate_logits(x).argmax(-1))
    outs = model.all_widths(x[:2])
    assert outs.shape == (3, 2, 3, 8, 8)
    for i, c in enumerate(configs):
        torch.testing.assert_close(outs[i], model(x[:2], config=c), rtol=0, atol=0)


def test_straight_through_gradient_reaches_gate_through_inner_widths():
    """Candidates that differ only in an inner width: the gate's gradient comes
    through the inner masks alone."""
    model = small_model().train()
    model.set_gate_configs([(32, 8, 32), (32, 32, 32)])
    torch.manual_seed(2)
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.gate.parameters())


def test_gate_learns_targets_among_configurations():
    model = small_model().eval()
    model.set_gate_configs([(8, 8, 8), (16, 32, 8), (32, 32, 32)])
    x = torch.randn(6, 3, 6, 6) * torch.linspace(0.1, 2, 6).view(-1, 1, 1, 1)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    opt = torch.optim.Adam(model.gate.parameters(), lr=0.05)
    for _ in range(80):
        loss = model.gate_loss(model.gate_logits(x), targets, cost_weight=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.gate_pick(x).tolist() == targets.tolist()
