"""UFPNet's encoder (AdaRevD's default): kernel-attention block, flow kernel prior, sizes.
The whole encoder against the released forward: tests/weights/test_adarevd_weights.py."""
import pytest
import torch
import torch.nn.functional as F

import restorenet
from restorenet.models.kernel_prior import KernelPrior
from restorenet.models.ufpnet import KernelNAFBlock, UFPNetEncoder
from restorenet.registry import count_parameters

SMALL = dict(width=4, enc_blocks=(1, 1, 1, 1), middle_blocks=1, kernel_size=3, estimator_width=4)


def randomise(module, seed=0, scale=0.5):
    """Every parameter random (the zero-initialised beta/gamma would hide branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def test_paper_size_parameter_count():
    with torch.device("meta"):
        encoder = UFPNetEncoder()  # width 64, [1, 1, 1, 28] + 1 middle, 19x19 kernels
    assert count_parameters(encoder) == 74_044_562  # the released UFPNet encoder's


def ln2d(x, w, b, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def test_kernel_attention_block_equals_its_formula_float64():
    c, ks = 6, 3
    block = randomise(KernelNAFBlock(c, ks)).double()
    x = torch.randn(2, c, 5, 7, dtype=torch.float64)
    kern = torch.rand(2, ks * ks, 5, 7, dtype=torch.float64)
    ka = block.kernel_attention
    a = F.gelu(F.conv2d(x, ka.feature.weight, ka.feature.bias, padding=1))
    e = F.gelu(F.conv2d(kern, ka.kernel_embed[0].weight, ka.kernel_embed[0].bias, padding=1))
    e = F.gelu(F.conv2d(e, ka.kernel_embed[2].weight, ka.kernel_embed[2].bias, padding=1))
    t = x + a * torch.sigmoid(F.conv2d(torch.cat([a, e], 1), ka.gate.weight, ka.gate.bias, padding=1))
    u = F.conv2d(ln2d(t, block.norm1.weight, block.norm1.bias), block.expand.weight, block.expand.bias)
    u = F.conv2d(u, block.dwconv.weight, block.dwconv.bias, padding=1, groups=2 * c)
    g1, g2 = u.chunk(2, 1)
    u = g1 * g2
    u = u * F.conv2d(u.mean((2, 3), keepdim=True), block.sca.proj.weight, block.sca.proj.bias)
    y = x + block.beta * F.conv2d(u, block.project.weight, block.project.bias)  # residual on x, not t
    v = F.conv2d(ln2d(y, block.norm2.weight, block.norm2.bias), block.ffn_expand.weight, block.ffn_expand.bias)
    v1, v2 = v.chunk(2, 1)
    want = y + block.gamma * F.conv2d(v1 * v2, block.ffn_project.weight, block.ffn_project.bias)
    torch.testing.assert_close(block(x, kern), want, rtol=1e-12, atol=1e-12)


def test_kernel_prior_inverts_the_released_flow_direction():
    # The released flow's forward (kernel -> code, RealNVP couplings and batch norms in eval
    # mode), written out here; the prior maps its output back to sigmoid-squashed kernels.
    prior = randomise(KernelPrior(kernel_size=3, num_blocks=2, hidden=5), scale=0.3).double()
    with torch.no_grad():
        for step in prior.steps[1::2]:
            step.running_mean.normal_()
            step.running_var.uniform_(0.5, 2.0)
    z = torch.randn(7, 9, dtype=torch.float64)
    u = z
    for step in prior.steps:
        if hasattr(step, "mask"):
            m = step.mask
            mu = u * m
            u = mu + (1 - m) * (u - step.shift_net(mu)) * torch.exp(-step.scale_net(mu))
        else:
            u = (u - step.running_mean) / torch.sqrt(step.running_var + 1e-5) * step.log_gamma.exp() + step.beta
    a = prior.alpha
    want = ((torch.sigmoid(z) - a) / (1 - 2 * a)).view(7, 3, 3)
    torch.testing.assert_close(prior(u), want, rtol=1e-10, atol=1e-10)
    assert [s.mask.tolist() for s in prior.steps[::2]] == [[0, 1] * 4 + [0], [1, 0] * 4 + [1]]


def test_encoder_features_shapes_noise_and_freezing():
    torch.manual_seed(0)
    model = restorenet.create_model("adarevd", num_decoders=1, **SMALL)
    assert model.encoder_name == "ufpnet" and isinstance(model.encoder, UFPNetEncoder)
    assert all(not p.requires_grad for p in model.encoder.parameters())
    img = torch.rand(1, 3, 16, 16)
    feats = model.encoder(img)
    assert [f.shape[1:] for f in feats] == [(4 * 2 ** i, 16 >> i, 16 >> i) for i in range(5)]
    kernels = model.encoder.kernel_map(img)
    assert kernels.shape == (1, 9, 16, 16)
    assert not torch.equal(kernels, model.encoder.kernel_map(img))  # released: noise at every forward
    model.train()
    assert not model.encoder.training  # frozen: always in eval mode
    sum(o.mean() for o in model(img)).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.eval().restore(torch.rand(1, 3, 20, 36), tile=16, overlap=0).shape == (1, 3, 20, 36)
    quiet = restorenet.create_model("adarevd", num_decoders=1, kernel_noise=False, **SMALL).encoder
    torch.testing.assert_close(quiet.kernel_map(img), quiet.kernel_map(img), rtol=0, atol=0)


def test_invalid_configurations_are_named():
    with pytest.raises(ValueError, match="^enc_blocks"):
        UFPNetEncoder(width=4, enc_blocks=(1, 2, 1, 1), kernel_size=3, estimator_width=4)
    with pytest.raises(ValueError, match="^enc_blocks"):
        UFPNetEncoder(width=4, enc_blocks=(1, 1), kernel_size=3, estimator_width=4)
    with pytest.raises(TypeError, match="^kernel_noise"):
        UFPNetEncoder(kernel_noise=1, **SMALL)
    with pytest.raises(ValueError, match="^kernel_size"):
        UFPNetEncoder(**{**SMALL, "kernel_size": 0})
    with pytest.raises(ValueError, match="^encoder"):
        restorenet.create_model("adarevd", encoder="unet", **SMALL)
    with pytest.raises(ValueError, match="^nafnet"):
        restorenet.create_model("adarevd", **SMALL).inherit_encoder(None)
