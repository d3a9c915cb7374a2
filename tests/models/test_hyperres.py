"""HyperRes: parameter counts, level handling, gradients to the meta blocks."""
import pytest
import torch

import restorenet.ops
from restorenet.models.hyperres import (BlindLevelEstimator, HyperConv2d, HyperRes, NoiseNet,
                                        level_to_condition)
from restorenet.registry import count_parameters, create_model

from _host_reads import count_host_reads


def small_model(seed=0, **cfg):
    torch.manual_seed(seed)
    cfg = {"width": 16, "num_blocks": 2, **cfg}
    return create_model("hyperres", **cfg)


def randomise_meta_bias(model):
    # B starts at zero; give it values so the base of each kernel matters too.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HyperConv2d):
                m.meta.bias.normal_(0, 0.02)


@pytest.mark.parametrize("num_blocks,expected", [(16, 2_588_483), (1, 372_803)])
def test_parameter_count_matches_paper(num_blocks, expected):
    with torch.device("meta"):
        model = create_model("hyperres", num_blocks=num_blocks)
    assert count_parameters(model) == expected


def test_meta_block_layout_and_init():
    conv = HyperConv2d(4, 5, 3, init="conv_fan_in")
    assert conv.meta.weight.shape == (5 * 4 * 9 + 5, 1)
    assert torch.all(conv.meta.bias == 0)
    # Views share the Linear's storage (no copies).
    assert conv.kernel_slope.data_ptr() == conv.meta.weight.data_ptr()
    assert conv.bias_base.data_ptr() == conv.meta.bias.data_ptr() + 5 * 4 * 9 * 4
    # Kaiming (fan_in = Cin*k*k = 36, gain sqrt 2) times 0.1: std ~ 0.1*sqrt(2/36) ~ 0.0236.
    std = conv.kernel_slope.std().item()
    assert 0.015 < std < 0.035
    kernel, bias = conv.generate(0.5)
    torch.testing.assert_close(kernel, 0.5 * conv.meta.weight[:180].view(5, 4, 3, 3))
    torch.testing.assert_close(bias, 0.5 * conv.meta.weight[180:, 0])


def test_released_init_is_kaiming_over_each_layers_own_fan_in_times_0_1():
    """The released train_main.py: weights_init_kaiming(scale=0.1) on every Linear and
    conv. The meta Linear(1, P) has fan-in 1: std 0.1*sqrt(2) over all of W; biases 0."""
    torch.manual_seed(0)
    model = create_model("hyperres", width=16, num_blocks=2)
    meta = model.blocks[0].conv1.meta
    assert torch.all(meta.bias == 0)
    assert 0.12 < meta.weight.std().item() < 0.163   # 16*16*9+16 = 2320 samples of N(0, 0.1414)
    for conv in (model.head, model.body_end, model.tail.expand, model.tail.to_image):
        assert torch.all(conv.bias == 0)
        fan_in = conv.weight[0].numel()
        assert 0.6 < conv.weight.std().item() / (0.1 * (2 / fan_in) ** 0.5) < 1.4


def test_generated_conv_equals_static_conv():
    torch.manual_seed(0)
    conv = HyperConv2d(3, 4, 3)
    with torch.no_grad():
        conv.meta.bias.normal_()
    x = torch.randn(1, 3, 6, 6)
    kernel, bias = conv.generate(0.3)
    torch.testing.assert_close(conv(x, 0.3), torch.nn.functional.conv2d(x, kernel, bias, padding=1))


def test_level_to_condition():
    """Released rule: divide by 255 only when the batch's smallest level is >= 1."""
    assert level_to_condition(255) == 1.0
    assert level_to_condition(0.5) == 0.5
    torch.testing.assert_close(level_to_condition(torch.tensor([0.5, 25.5])), torch.tensor([0.5, 25.5]))
    torch.testing.assert_close(level_to_condition(torch.tensor([0.5, 25.5]), "divide"),
                               torch.tensor([0.5, 25.5]) / 255)
    assert level_to_condition(0.5, "divide") == 0.5 / 255


def test_level_rule_option_changes_only_levels_below_one():
    model, x = small_model(), torch.rand(2, 3, 8, 8)
    divide = small_model(level_rule="divide")
    torch.testing.assert_close(model(x, [15.0, 50.0]), divide(x, [15.0, 50.0]))
    torch.testing.assert_close(model(x, 0.2), divide(x, 0.2 * 255))
    with pytest.raises(ValueError, match="^level_rule must be one of"):
        small_model(level_rule="always")
    torch.testing.assert_close(level_to_condition(torch.tensor([25.5, 51.0])), torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("shape", [(2, 3, 12, 10), (1, 3, 9, 7), (1, 3, 1, 5)])
def test_forward_backward_shapes_and_finite(shape):
    model = small_model()
    x = torch.randn(*shape, requires_grad=True)
    y = model(x, 25.0)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_grayscale_input():
    model = small_model(in_channels=1)
    assert model(torch.randn(1, 1, 8, 8), 15).shape == (1, 1, 8, 8)


def test_scalar_level_equals_tensor_of_identical_levels():
    model = small_model()
    randomise_meta_bias(model)
    x = torch.randn(3, 3, 8, 8)
    a = model(x, 35.0)
    b = model(x, torch.full((3,), 35.0))
    c = model(x, torch.tensor(35.0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_per_sample_levels_equal_each_sample_alone():
    model = small_model().double()
    randomise_meta_bias(model)
    x = torch.randn(3, 3, 8, 10, dtype=torch.float64)
    levels = torch.tensor([15.0, 55.0, 75.0], dtype=torch.float64)
    batched = model(x, levels)
    for n in range(3):
        alone = model(x[n:n + 1], float(levels[n]))
        torch.testing.assert_close(batched[n:n + 1], alone, rtol=1e-12, atol=1e-12)
    # ... and the level really changes the output.
    assert (model(x[:1], 15.0) - model(x[:1], 75.0)).abs().max() > 1e-6


def test_integer_levels_are_accepted():
    model = small_model()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(model(x, torch.tensor([10, 80])), model(x, torch.tensor([10.0, 80.0])))


def test_gradients_reach_meta_weights_and_biases():
    model = small_model()
    x = torch.randn(2, 3, 8, 8)
    model(x, torch.tensor([15.0, 75.0])).abs().mean().backward()
    metas = [m.meta for m in model.modules() if isinstance(m, HyperConv2d)]
    assert len(metas) == 4
    for meta in metas:
        assert meta.weight.grad is not None and meta.weight.grad.abs().sum() > 0
        assert meta.bias.grad is not None and meta.bias.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


def test_reference_backend_context():
    model = small_model()
    x = torch.randn(1, 3, 6, 6)
    with restorenet.ops.use_backend("reference"):
        y = model(x, 50.0)
    torch.testing.assert_close(y, model(x, 50.0))


@pytest.mark.parametrize("cfg,cls", [(dict(crop="center"), NoiseNet),
                                     (dict(architecture="five_conv"), BlindLevelEstimator)])
def test_level_estimator(cfg, cls):
    torch.manual_seed(0)
    est = create_model("hyperres_level_estimator", width=8, **cfg).eval()
    assert isinstance(est, cls)
    x = torch.randn(2, 3, 130, 150)
    levels = est(x)
    assert levels.shape == (2,)
    # The center crop is what it sees: changing the border changes nothing.
    x2 = x.clone()
    x2[..., :1, :] = 100.0
    torch.testing.assert_close(est(x2), levels)
    # Its output feeds HyperRes directly.
    assert small_model()(x[:, :, :16, :16], levels.detach().abs()).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="^x"):
        est(torch.randn(1, 3, 127, 200))


def test_estimator_clamps_a_negative_estimate_in_eval_only():
    """HyperRes rejects a negative level: at inference the estimate is clamped at 0;
    in training the raw output keeps the loss's gradient."""
    est = create_model("hyperres_level_estimator", architecture="five_conv", width=4, crop_size=32)
    with torch.no_grad():
        est.regressor[-1].bias.fill_(-1e3)  # every estimate far below 0
    x = torch.rand(2, 3, 32, 32)
    assert torch.all(est.train()(x) < 0)
    levels = est.eval()(x)
    assert torch.equal(levels, torch.zeros(2))
    assert small_model()(torch.rand(2, 3, 8, 8), levels).shape == (2, 3, 8, 8)


def test_noisenet_returns_the_raw_estimate_unless_asked_to_clamp():
    x = torch.rand(2, 3, 32, 32)
    for clamp in (False, True):
        est = create_model("hyperres_level_estimator", width=4, crop_size=32, clamp_negative=clamp)
        with torch.no_grad():
            est.regressor[-1].bias.fill_(-1e3)
        assert torch.all(est.train()(x) < 0)
        assert torch.all(est.eval()(x) == 0) if clamp else torch.all(est(x) < 0)


def test_noisenet_random_crop_draws_from_torchs_generator():
    est = create_model("hyperres_level_estimator", width=4, crop_size=32).eval()
    x = torch.rand(1, 3, 64, 64)
    torch.manual_seed(3)
    a = est(x)
    torch.manual_seed(3)
    torch.testing.assert_close(est(x), a)
    seen = {tuple(est.crop_position(64, 64)) for _ in range(20)}
    assert len(seen) > 1 and all(0 <= t < 32 and 0 <= l < 32 for t, l in seen)
    assert est.crop_position(32, 40)[0] == 0


def test_estimator_paper_layout():
    with torch.device("meta"):
        est = BlindLevelEstimator()
        released = create_model("hyperres_level_estimator")
    convs = [m for m in est.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in est.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 5 and len(fcs) == 3
    assert isinstance(released, NoiseNet) and count_parameters(released) == 330_561
    convs = [m for m in released.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 and convs[0].stride == (2, 2)


@pytest.mark.parametrize("x,level,exc,name", [
    (torch.randn(1, 4, 8, 8), 15.0, ValueError, "x"),
    (torch.randn(3, 8, 8), 15.0, ValueError, "x"),
    ("img", 15.0, TypeError, "x"),
    (torch.randn(2, 3, 8, 8), torch.tensor([15.0, 25.0, 35.0]), ValueError, "level"),
    (torch.randn(2, 3, 8, 8), torch.ones(2, 1), ValueError, "level"),
    (torch.randn(2, 3, 8, 8), "high", TypeError, "level"),
    (torch.randn(2, 3, 8, 8), True, TypeError, "level"),
])
def test_errors_name_the_argument(x, level, exc, name):
    model = small_model()
    with pytest.raises(exc, match=f"^{name}"):
        model(x, level)


@pytest.mark.parametrize("level", [float("nan"), float("inf"), -15.0, torch.tensor([15.0, float("nan")]),
                                   torch.tensor([-1, 25]), [15.0, float("-inf")]])
def test_nonfinite_or_negative_levels_are_rejected(level):
    """Noise sigma, JPEG quality and SR scale are all finite and >= 0: a NaN level
    would silently give a NaN image."""
    with pytest.raises(ValueError, match="^level must be finite and >= 0"):
        small_model()(torch.rand(2, 3, 8, 8), level)


def test_allow_nonfinite_skips_the_level_check():
    out = small_model()(torch.rand(2, 3, 8, 8), torch.tensor([15.0, float("nan")]), allow_nonfinite=True)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


@pytest.mark.parametrize("level,reads", [(torch.tensor([15.0, 50.0]), 1), (torch.tensor(25), 1),
                                         (25.0, 0), ([15.0, 50.0], 0)])
def test_a_tensor_level_costs_one_host_read_per_forward(monkeypatch, level, reads):
    """One read for the whole forward, not one per generated conv (4 of them here)."""
    model, x = small_model(), torch.rand(2, 3, 8, 8)
    with restorenet.ops.use_backend("reference"):
        _, counted = count_host_reads(monkeypatch, lambda: model(x, level))
    assert counted == reads


def test_level_sequence_equals_level_tensor():
    model, x = small_model(), torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(x, [15.0, 50.0]), model(x, torch.tensor([15.0, 50.0])))


def test_empty_batch_is_rejected():
    with pytest.raises(ValueError, match=r"^x must hold at least one image \(N >= 1"):
        small_model()(torch.rand(0, 3, 8, 8), 25.0)


@pytest.mark.parametrize("cfg,name", [
    (dict(width=-8), "width"), (dict(width=0), "width"), (dict(width=8.0), "width"), (dict(width=True), "width"),
    (dict(num_blocks=-1), "num_blocks"), (dict(in_channels=0), "in_channels"),
])
def test_constructor_arguments_are_checked(cfg, name):
    with pytest.raises(ValueError, match=f"^{name} must be an int"):
        create_model("hyperres", **cfg)


@pytest.mark.parametrize("cfg,name", [(dict(crop_size=0), "crop_size"), (dict(crop_size=48), "crop_size"),
                                      (dict(width=-1), "width"), (dict(in_channels=True), "in_channels"),
                                      (dict(architecture="resnet"), "architecture"), (dict(crop="left"), "crop"),
                                      (dict(clamp_negative=1), "clamp_negative")])
def test_estimator_constructor_arguments_are_checked(cfg, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        create_model("hyperres_level_estimator", **cfg)


def test_default_config_is_the_paper():
    with torch.device("meta"):
        model = create_model("hyperres")
    assert isinstance(model, HyperRes) and len(model.blocks) == 16
    assert model.head.stride == (2, 2) and model.head.out_channels == 64
