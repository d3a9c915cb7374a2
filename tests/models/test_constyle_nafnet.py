import pytest
import torch

from restorenet.models.constyle_nafnet import (
    ConStyleEncoder, ConStyleMoCoLoss, ConStyleNAFNet, StyleCode, gram_matrix)
from restorenet.registry import count_parameters, create_model, list_models

TINY = dict(width=8, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1))


def tiny_model():
    torch.manual_seed(0)
    return create_model("constyle_nafnet", **TINY)


def test_registered():
    assert "constyle_nafnet" in list_models()
    assert isinstance(tiny_model(), ConStyleNAFNet)


def test_paper_size_parameter_count():
    with torch.device("meta"):
        m = create_model("constyle_nafnet")
    assert count_parameters(m) == pytest.approx(12.7e6, rel=0.05)
    # Levels grow by the injected width: 48, 96, 144, bottom 192; decoder 192, 144, 96.
    assert [s[0].norm1.weight.numel() for s in m.enc_stages] == [48, 96, 144]
    assert m.middle[0].norm1.weight.numel() == 192
    assert [s[0].norm1.weight.numel() for s in m.dec_stages] == [192, 144, 96]
    assert [len(s) for s in m.enc_stages] == [7, 8, 9] and len(m.middle) == 9
    assert [len(s) for s in m.dec_stages] == [9, 8, 7]


def test_style_encoder_shapes():
    torch.manual_seed(0)
    enc = ConStyleEncoder().eval()
    code = enc(torch.rand(1, 3, 32, 48))
    assert isinstance(code, StyleCode)
    assert code.latent.shape == (1, 128)
    assert [tuple(f.shape[1:]) for f in code.features] == [
        (32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
    assert all(m.bias is None for m in enc.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (2, 3, 35, 41)])
def test_forward_backward_train_mode(shape):
    m = tiny_model().train()
    torch.manual_seed(1)
    img = torch.randn(*shape, requires_grad=True)
    out = m(img)
    assert out.shape == img.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    # The style encoder is trained through the restoration loss in phase 1.
    assert m.style_encoder.stages[0][0][0].weight.grad.abs().sum() > 0


def test_batch_one_eval_forward_backward():
    m = tiny_model().eval()
    img = torch.randn(1, 3, 35, 41, requires_grad=True)
    out = m(img)
    assert out.shape == (1, 3, 35, 41) and torch.isfinite(out).all()
    out.mean().backward()
    assert torch.isfinite(img.grad).all()


def test_batch_one_while_encoder_trains_names_img():
    with pytest.raises(ValueError, match="^img"):
        tiny_model().train()(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("bad", [torch.rand(2, 4, 16, 16), torch.rand(3, 16, 16)])
def test_wrong_input_names_img(bad):
    with pytest.raises(ValueError, match="^img"):
        tiny_model()(bad)


def test_bad_config():
    with pytest.raises(ValueError, match="width"):
        ConStyleNAFNet(width=6)
    with pytest.raises(ValueError, match="enc_blocks"):
        ConStyleNAFNet(width=8, enc_blocks=(1, 1))


@pytest.mark.parametrize("cfg,name", [
    (dict(width=-8), "width"), (dict(width=8.0), "width"), (dict(in_channels=0), "in_channels"),
    (dict(latent_dim=-8), "latent_dim"), (dict(middle_blocks=-1), "middle_blocks"),
    (dict(enc_blocks=(1, -1, 1)), "enc_blocks"), (dict(dec_blocks=3), "dec_blocks"),
])
def test_constructor_arguments_are_checked(cfg, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        ConStyleNAFNet(**cfg)


@pytest.mark.parametrize("train", [False, True])
def test_empty_batch_names_img(train):
    """Eval used to fail deep in a concat, train in BatchNorm: one rule for both."""
    with pytest.raises(ValueError, match=r"^img must hold at least one image \(N >= 1"):
        tiny_model().train(train)(torch.rand(0, 3, 16, 16))


def test_global_residual_and_crop():
    m = tiny_model().eval()
    with torch.no_grad():
        m.ending.weight.zero_()
        img = torch.rand(1, 3, 17, 31)
        torch.testing.assert_close(m(img), img)


def test_latent_modulates_the_bottom():
    # b' = conv1x1([b, b * Linear(q)]): changing the latent mapping changes the output.
    m = tiny_model().eval()
    img = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for s in m.middle:  # make the bottom non-trivial so it reaches the output
            s.beta.fill_(1.0)
        base = m(img)
        m.modulation.to_scale.bias.add_(1.0)
        assert not torch.allclose(base, m(img))


# ---- two-phase training ---------------------------------------------------------------

def test_freeze_style_encoder_keeps_batch_norm_in_the_models_mode_as_released():
    m = tiny_model()
    m.freeze_style_encoder()
    m.train()
    assert m.style_encoder.training  # batch statistics, running statistics still updated
    before = m.style_encoder.mlp[0][1].running_mean.clone()
    m(torch.randn(2, 3, 16, 16)).square().mean().backward()
    assert not torch.equal(before, m.style_encoder.mlp[0][1].running_mean)
    assert all(p.grad is None and not p.requires_grad for p in m.style_encoder.parameters())
    assert not m.eval().style_encoder.training
    with pytest.raises(ValueError, match="^batch_norm must be one of"):
        m.freeze_style_encoder(batch_norm="eval")


def test_freeze_style_encoder_stops_its_grads():
    m = tiny_model()
    m.freeze_style_encoder(batch_norm="frozen")
    m.train()
    assert not m.style_encoder.training  # BatchNorm stays in eval mode
    assert m.intro.training
    # Frozen encoder uses running statistics, so batch 1 trains fine in phase 2.
    out = m(torch.randn(1, 3, 32, 32))
    out.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in m.style_encoder.parameters())
    assert m.intro.weight.grad is not None and m.intro.weight.grad.abs().sum() > 0
    assert m.injects[0][0].weight.grad is not None
    m.freeze_style_encoder(False)
    assert m.style_encoder.training
    assert all(p.requires_grad for p in m.style_encoder.parameters())


# ---- MoCo loss ------------------------------------------------------------------------

def make_loss(m, queue_size=8, **kw):
    torch.manual_seed(2)
    return ConStyleMoCoLoss(m.style_encoder, queue_size=queue_size, **kw)


def test_moco_loss_forward_backward_and_queue():
    # The earlier objective, now a named variant: the queue holds normalised keys.
    m = tiny_model().train()
    loss = make_loss(m, queue_size=8, variant="normalized")
    assert loss.queue.shape == (8, 128)
    lq, gt = torch.randn(3, 3, 35, 41), torch.randn(3, 3, 35, 41)

    out, style = m(lq, return_style=True)
    queue_before = loss.queue.clone()
    parts = loss(gt, query=style)
    assert set(parts) == {"loss", "infonce", "content", "style"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in parts.values())
    torch.testing.assert_close(parts["loss"], parts["infonce"] + parts["content"] + parts["style"])
    (out.abs().mean() + parts["loss"]).backward()

    # Pointer advanced by the batch size, and exactly those rows now hold the keys.
    assert int(loss.queue_ptr) == 3
    changed = (loss.queue != queue_before).any(dim=1)
    assert changed.tolist() == [True] * 3 + [False] * 5
    with torch.no_grad():
        keys = torch.nn.functional.normalize(loss.key_encoder(
            torch.nn.functional.pad(gt, (0, 7, 0, 5))).latent, dim=1)
    torch.testing.assert_close(loss.queue[:3], keys)

    # Gradients reach the query encoder, never the key encoder.
    assert m.style_encoder.mlp[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in loss.key_encoder.parameters())

    # The pointer wraps around the queue.
    loss(gt, degraded=lq)
    loss(gt, degraded=lq)
    assert int(loss.queue_ptr) == 9 % 8


def test_moco_loss_parts_respond_to_inputs():
    m = tiny_model().train()
    loss = make_loss(m, queue_size=16, momentum=0.0, variant="normalized")
    torch.manual_seed(3)
    gt = torch.rand(4, 3, 32, 32)
    # momentum 0: the key encoder becomes the query encoder, so the same image on
    # both sides gives zero content and style loss.
    same = loss(gt, degraded=gt)
    assert same["content"] < 1e-10 and same["style"] < 1e-10
    other = loss(gt, degraded=gt + 0.5 * torch.randn_like(gt))
    assert other["content"] > 0 and other["style"] > 0


def released_moco_truth(q, h, k, queue_cols, ptr, temperature):
    """The released ConStyle.train_forward + ConStyleModel.optimize_parameters, written
    out: a [D, K] queue of raw latents, the query latents enqueued, and the style term
    against the overwritten slice and the one after it."""
    bs, K = q.shape[0], queue_cols.shape[1]
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_cols], 1) / temperature
    infonce = torch.nn.functional.cross_entropy(logits, torch.zeros(bs, dtype=torch.long))
    old, following = queue_cols[:, ptr:ptr + bs].T, queue_cols[:, (ptr + bs) % K:(ptr + bs) % K + bs].T
    n = h.shape[-1] * h.shape[-2]
    style = -(torch.square(h @ h.T / n - following @ following.T / n).mean()
              + torch.square(q @ q.T / n - old @ old.T / n).mean())
    return {"infonce": infonce, "content": torch.square(q - k).mean(), "style": style}


def test_released_moco_loss_matches_the_released_training_code():
    m = tiny_model().train()
    loss = make_loss(m, queue_size=8, temperature=0.5)
    assert loss.variant == "released"
    lq, gt = torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    for step in range(3):  # pointer 0, 4, then wrapped to 0
        ptr, queue_cols = int(loss.queue_ptr), loss.queue.T.clone()
        out, style = m(lq, return_style=True)
        parts = loss(gt, query=style)
        with torch.no_grad():
            k = loss.key_encoder(gt).latent
        truth = released_moco_truth(style.latent, style.hidden, k, queue_cols, ptr, 0.5)
        for name in truth:
            torch.testing.assert_close(parts[name], truth[name])
        # The query latents (raw, not the keys) were enqueued at the old pointer.
        torch.testing.assert_close(loss.queue[ptr:ptr + 4], style.latent.detach())
        assert int(loss.queue_ptr) == (ptr + 4) % 8
    parts["loss"].backward()
    assert m.style_encoder.mlp[0][0].weight.grad.abs().sum() > 0


def test_released_moco_defaults():
    m = tiny_model()
    loss = ConStyleMoCoLoss(m.style_encoder)
    assert loss.queue.shape == (65_760, 128)
    assert not torch.allclose(loss.queue.norm(dim=1), torch.ones(65_760))  # raw N(0, 1), not normalised
    with pytest.raises(ValueError, match="^variant must be one of"):
        ConStyleMoCoLoss(m.style_encoder, queue_size=4, variant="moco")


def test_momentum_update_is_ema():
    m = tiny_model()
    loss = make_loss(m, momentum=0.9)
    for pk, pq in zip(loss.key_encoder.parameters(), m.style_encoder.parameters()):
        torch.testing.assert_close(pk, pq.detach())  # starts as a copy
    with torch.no_grad():
        for p in m.style_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in loss.key_encoder.parameters()]
    loss.momentum_update()
    for pk, pk0, pq in zip(loss.key_encoder.parameters(), before, m.style_encoder.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq.detach())
    # Default momentum is the paper's 0.999 and the temperature 0.07.
    default = ConStyleMoCoLoss(m.style_encoder, queue_size=4)
    assert default.momentum == 0.999 and default.temperature == 0.07


def test_moco_loss_is_not_a_second_owner_of_the_query_encoder():
    m = tiny_model()
    loss = make_loss(m)
    query_ids = {id(p) for p in m.style_encoder.parameters()}
    assert not query_ids & {id(p) for p in loss.parameters()}
    assert loss.query_encoder is m.style_encoder


def test_moco_loss_bad_inputs():
    m = tiny_model()
    loss = make_loss(m)
    with pytest.raises(ValueError, match="^clean"):
        loss(torch.rand(2, 1, 16, 16), degraded=torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="^degraded"):
        loss(torch.rand(2, 3, 16, 16), degraded=torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="degraded"):
        loss(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="queue_size"):
        ConStyleMoCoLoss(m.style_encoder, queue_size=0)


def test_gram_matrix():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # N=1, C=2, H=1, W=2
    torch.testing.assert_close(gram_matrix(f), torch.tensor([[[2.5, 1.5], [1.5, 4.5]]]))


def test_latent_dim_and_queue_size_are_configurable():
    torch.manual_seed(0)
    m = create_model("constyle_nafnet", latent_dim=16, **TINY).train()
    loss = ConStyleMoCoLoss(m.style_encoder, queue_size=5)
    assert loss.queue.shape == (5, 16)
    assert m.modulation.to_scale.in_features == 16
    out, style = m(torch.rand(2, 3, 16, 16), return_style=True)
    assert style.latent.shape == (2, 16)
    loss(torch.rand(2, 3, 16, 16), query=style)["loss"].backward()
    assert int(loss.queue_ptr) == 2
