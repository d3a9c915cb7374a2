import pytest
import torch

from restorenet.models.mhnet import AFFM, MHNet, TopKChannelAttention, tap_upsampler
from restorenet.registry import count_parameters, create_model, list_models

TINY = dict(width=8, enc_blocks=(1, 1, 1, 1), dec_blocks=(1, 1, 1, 1), cabg_blocks=1)


def tiny_model():
    torch.manual_seed(0)
    return create_model("mhnet", **TINY)


def test_registered():
    assert "mhnet" in list_models()
    assert isinstance(tiny_model(), MHNet)


def test_paper_size_parameter_count():
    with torch.device("meta"):
        m = create_model("mhnet")
    # The released 67,543,311 less the 15,747 its forward never uses (tests/weights).
    assert count_parameters(m) == 67_527_564
    # The paper-size middle block is the 8-head top-k attention over 1024 channels.
    assert m.stage1.middle.heads == 8
    assert m.stage1.middle.qkv.in_channels == 1024
    assert len(m.stage2.cabgs) == 4 and all(len(g) == 8 for g in m.stage2.cabgs)


@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (1, 3, 35, 41)])
def test_forward_backward(shape):
    m = tiny_model()
    torch.manual_seed(1)
    img = torch.randn(*shape, requires_grad=True)
    out = m(img)
    assert out.shape == img.shape
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    # Every parameter takes part (no dead branch): all get a finite gradient.
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_global_residual_and_crop():
    # With the head conv zeroed the network must return exactly its (cropped) input.
    m = tiny_model().eval()
    with torch.no_grad():
        m.ending.weight.zero_()
        img = torch.rand(1, 3, 17, 31)
        torch.testing.assert_close(m(img), img)


def test_padding_does_not_leak_into_crop_shape():
    m = tiny_model().eval()
    img = torch.rand(1, 3, 17, 31)
    with torch.no_grad():
        out = m(img)
    assert out.shape == (1, 3, 17, 31)


@pytest.mark.parametrize("bad", [torch.rand(1, 1, 16, 16), torch.rand(3, 16, 16)])
def test_wrong_input_names_img(bad):
    with pytest.raises(ValueError, match="^img"):
        tiny_model()(bad)


def test_mismatched_block_lists():
    with pytest.raises(ValueError, match="enc_blocks"):
        MHNet(width=8, enc_blocks=(1, 1, 1), dec_blocks=(1, 1))


# ---- top-k masked channel attention, in isolation ----------------------------------------

@pytest.mark.parametrize("channels,heads,expected", [
    (240, 8, [15, 20, 22, 24]),     # C/heads = 30: 30/2, 30*2/3 (exact), floor(22.5), 30*4/5
    (1024, 8, [64, 85, 96, 102]),   # paper size: 128 per head
    (16, 8, [1, 1, 1, 1]),          # 2 per head: floor(2/2)=1, floor(4/3)=1, ... never 0
])
def test_topk_counts(channels, heads, expected):
    att = TopKChannelAttention(channels, heads)
    assert att.topk == expected


def test_topk_masks_keep_exactly_k_largest_per_row():
    torch.manual_seed(0)
    att = TopKChannelAttention(240, heads=8)
    attn = torch.randn(2, 8, 30, 30)
    masks = att.topk_masks(attn)
    assert len(masks) == 4
    for mask, k in zip(masks, [15, 20, 22, 24]):
        assert mask.dtype == torch.bool
        assert (mask.sum(-1) == k).all()
        # The kept entries are the k largest: every kept value >= every dropped value.
        kept_min = attn.masked_fill(~mask, float("inf")).amin(-1)
        dropped_max = attn.masked_fill(mask, float("-inf")).amax(-1)
        assert (kept_min >= dropped_max).all()
    # Masks are nested: a larger k keeps a superset.
    for small, large in zip(masks, masks[1:]):
        assert (large | ~small).all()


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    c, heads = 16, 2
    att = TopKChannelAttention(c, heads)
    with torch.no_grad():
        att.mix_weights.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        att.temperature.copy_(torch.tensor([[[1.5]], [[0.5]]]))
    x = torch.randn(2, c, 5, 6)
    out = att(x)
    assert out.shape == x.shape

    # Reference: four separate masked softmaxes, each multiplied by v, then summed.
    q, k, v = att.qkv_dwconv(att.qkv(x)).chunk(3, dim=1)
    q, k, v = (t.reshape(2, heads, c // heads, 30) for t in (q, k, v))
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    a = q @ k.transpose(-2, -1) * att.temperature
    ref = 0
    for wj, kj in zip(att.mix_weights, att.topk):
        thresh = a.sort(dim=-1, descending=True).values[..., kj - 1:kj]
        ref = ref + wj * (a.masked_fill(a < thresh, float("-inf")).softmax(-1) @ v)
    ref = att.project_out(ref.reshape(2, c, 5, 6))
    torch.testing.assert_close(out, ref)


def test_mix_weights_start_at_0_2_and_learn():
    att = TopKChannelAttention(16, 2)
    torch.testing.assert_close(att.mix_weights.detach(), torch.full((4,), 0.2))
    att(torch.randn(1, 16, 4, 4)).sum().backward()
    assert att.mix_weights.grad is not None and att.mix_weights.grad.abs().sum() > 0


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="channels"):
        TopKChannelAttention(20, heads=8)


@pytest.mark.parametrize("cfg,name", [
    (dict(width=-8), "width"), (dict(width=True), "width"), (dict(heads=0), "heads"), (dict(heads=3), "heads"),
    (dict(cabg_blocks=-1), "cabg_blocks"), (dict(enc_blocks=()), "enc_blocks"), (dict(in_channels=2.0), "in_channels"),
    (dict(stage2_residual="pre"), "stage2_residual"), (dict(decoder_tap_convs=4), "decoder_tap_convs"),
])
def test_constructor_arguments_are_checked(cfg, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        create_model("mhnet", **{**dict(width=4, enc_blocks=(1,), dec_blocks=(1,), heads=2, cabg_blocks=1), **cfg})


def test_affm_squeeze_is_even_for_any_width():
    """SimpleGate halves the squeeze: width 40 (40 // 8 = 5) used to build and then fail
    in forward; widths whose squeeze was even keep it (64 -> 8: paper size unchanged)."""
    assert AFFM(64).squeeze[0].out_channels == 8 and AFFM(48).squeeze[0].out_channels == 6
    assert AFFM(40).squeeze[0].out_channels == 4
    model = create_model("mhnet", width=40, enc_blocks=(1,), dec_blocks=(1,), heads=8, cabg_blocks=1)
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


def test_empty_batch_names_img():
    with pytest.raises(ValueError, match="^img must hold at least one image"):
        create_model("mhnet", width=4, enc_blocks=(1,), dec_blocks=(1,), heads=2, cabg_blocks=1)(
            torch.rand(0, 3, 8, 8))


# ---- fusion pieces --------------------------------------------------------------------

def test_affm_weights_are_channel_softmaxes():
    torch.manual_seed(0)
    affm = AFFM(16)
    f = torch.ones(1, 16, 3, 3)
    # With all three inputs equal to 1, the output is the sum of the three weights
    # per channel; each weight is a softmax over channels, so it sums to 3 over C.
    out = affm(f, f, f)
    torch.testing.assert_close(out.sum(dim=1), torch.full((1, 3, 3), 3.0))


def test_tap_upsampler_shapes():
    up = tap_upsampler(32, 2)
    assert up(torch.randn(1, 32, 4, 5)).shape == (1, 8, 16, 20)
    assert isinstance(tap_upsampler(8, 0), torch.nn.Identity)
