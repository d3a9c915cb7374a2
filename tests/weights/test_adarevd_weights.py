"""AdaRevD's released layout (INVOKERer/AdaRevD, AdaRevID_arch.py + UFPNet/*) loads strictly
and computes the released forward, written here with plain PyTorch formulas."""
import pytest
import torch
import torch.nn.functional as F

import restorenet
from _released import conv, gate, layer_norm2d, nafblock_forward, nafblock_keys, nafnet_keys, random_state
from restorenet.weights import CheckpointMismatch, from_released
from restorenet.weights.adarevd import convert, from_released_parts, load_encoder

W, K, KS, EW = 4, 2, 3, 4  # width, columns, kernel size, kernel-estimator width
CFG = dict(width=W, enc_blocks=(1, 1, 1, 1), middle_blocks=1, num_decoders=K, kernel_size=KS,
           estimator_width=EW, kernel_noise=False)
FLOW_BLOCKS, FLOW_HIDDEN = 5, 25


# ------------------------------------------------------------------ key tables


def conv_keys(p, cout, cin, k, bias=True):
    return {p + "weight": (cout, cin, k, k), **({p + "bias": (cout,)} if bias else {})}


def encoder_keys(p, width, enc, encoder, kernel_size=KS, est_width=EW):
    """Released ``NAFNet`` (AdaRevID_arch, encoder only) or ``UFPNet`` (UFPNet_code_uncertainty_arch)."""
    t = {k: v for k, v in nafnet_keys(p, width=width, enc=enc, middle=1, dec=()).items()
         if "ending" not in k}
    if encoder == "nafnet":
        return t
    kk, w = kernel_size ** 2, est_width
    for i in range(3):
        c, q = width * 2 ** i, f"{p}encoders.{i}.0.kernel_atttion."
        t |= conv_keys(q + "conv_1.0.", c, c, 3) | conv_keys(q + "conv_kernel.0.", c, kk, 3)
        t |= conv_keys(q + "conv_kernel.2.", c, c, 3) | conv_keys(q + "conv_2.0.", c, 2 * c, 3)
    for i in range(2):
        t |= conv_keys(f"{p}kernel_down.{i}.", kk, kk, 2)
    f = p + "flow."
    t |= {f + "kernel_size": (1,), f + "alpha": (1,), f + "normalization": (1,),
          f + "base_dist_mean": (kk,), f + "base_dist_var": (kk,)}
    for b in range(FLOW_BLOCKS):
        q = f"{f}net.{2 * b}."
        t[q + "mask"] = (kk,)
        for net in ("s_net", "t_net"):
            t |= {f"{q}{net}.0.weight": (FLOW_HIDDEN, kk), f"{q}{net}.0.bias": (FLOW_HIDDEN,),
                  f"{q}{net}.2.weight": (FLOW_HIDDEN, FLOW_HIDDEN), f"{q}{net}.2.bias": (FLOW_HIDDEN,),
                  f"{q}{net}.4.weight": (kk, FLOW_HIDDEN), f"{q}{net}.4.bias": (kk,)}
        t |= {f"{f}net.{2 * b + 1}.{n}": (kk,) for n in ("log_gamma", "beta", "running_mean", "running_var")}
    e = p + "kernel_extra."
    for blk, cin, c in (("Encoding_Block1.", 3, w), ("Encoding_Block2.", w, 2 * w)):
        t |= conv_keys(e + blk + "Conv_head.", c, cin, 3) | conv_keys(e + blk + "downsample.", c, c, 3)
        for r in ("ResBlock1.body.", "ResBlock2.body."):
            t |= conv_keys(e + blk + r + "1.", c, c, 3) | conv_keys(e + blk + r + "3.", c, c, 3)
    t |= conv_keys(e + "Conv_mid.body.0.", 4 * w, 2 * w, 3)
    for j in (2, 4, 6, 8):
        t |= conv_keys(f"{e}Conv_mid.body.{j}.", 4 * w, 4 * w, 3)
    for blk, cin, c in (("Decoding_Block1.", 4 * w, 2 * w), ("Decoding_Block2.", 2 * w, w)):
        t |= {e + blk + "Conv_t.weight": (cin, c, 3, 3), e + blk + "Conv_t.bias": (c,)}  # ConvTranspose2d
        t |= conv_keys(e + blk + "Conv_head.", c, 2 * c, 3)
        for r in ("ResBlock1.body.", "ResBlock2.body."):
            t |= conv_keys(e + blk + r + "1.", c, c, 3) | conv_keys(e + blk + r + "3.", c, c, 3)
    for head in ("mean", "var"):
        t |= conv_keys(f"{e}Conv_tail.{head}.0.", w, w, 3) | conv_keys(f"{e}Conv_tail.{head}.2.", kk, w, 3)
    return t


def fcnaf_keys(p, c):
    t = {k.replace("sca.1.", "sca.0."): v for k, v in nafblock_keys(p, c).items()}
    for f in ("fft_block1.", "fft_block2."):
        t |= conv_keys(p + f + "complex_conv1.", 4 * c, 2 * c, 1) | conv_keys(p + f + "complex_conv2.", 2 * c, 4 * c, 1)
    return t


def adarevd_keys(width=W, num_decoders=K, enc=(1, 1, 1, 1), encoder="ufpnet", kernel_size=KS, est_width=EW):
    """Released ``AdaRevID`` (baseblock fcnaf, dx e3, hard_simple, 6 classes) state dict."""
    t = encoder_keys("encoder.", width, enc, encoder, kernel_size, est_width)
    chans = [width * 8, width * 4, width * 2, width]
    for lvl, c in enumerate([width, 2 * width, 4 * width, 8 * width, 16 * width]):
        t[f"conv_features.{lvl}"] = (1, c, 1, 1)
    for k in range(num_decoders):
        for i, c in enumerate(chans):
            p = f"subdenets.{k}.level{i}."
            t[f"subdenets.{k}.alpha{i}"] = (1, c, 1, 1)
            t[p + "fusion.up.0.weight"] = (4 * c, 2 * c, 1, 1)
            if i < 3:
                t |= conv_keys(p + "fusion.down.0.", c, chans[i + 1], 2)
                t |= {p + "fusion.down.1.body.weight": (c,), p + "fusion.down.1.body.bias": (c,)}
            t |= fcnaf_keys(p + "blocks.0.", c)
        t |= conv_keys(f"outputs.{k}.0.", 3, width, 3)
    c = 16 * width
    t |= conv_keys("ape.0.", c, c // 2, 2) | nafblock_keys("ape.1.", c)
    t |= {"ape.2.classifier.0.weight": (c,), "ape.2.classifier.0.bias": (c,),
          "ape.2.classifier.1.weight": (c // 2, c), "ape.2.classifier.1.bias": (c // 2,),
          "ape.2.classifier.3.weight": (6, c // 2), "ape.2.classifier.3.bias": (6,), "ape.2.alpha": (1, 6)}
    return t


def released_state(table, seed=0):
    """Random values; the flow's buffers and scales set so that its inverse stays finite."""
    sd = random_state(table, seed)
    for k in list(sd):
        if k.endswith(".mask"):
            b = int(k.split(".net.")[1].split(".")[0]) // 2
            sd[k] = ((torch.arange(sd[k].numel()) + b) % 2).float()
        elif "flow.net." in k and k.endswith(("weight", "bias", "log_gamma", ".beta")):
            sd[k] = 0.1 * sd[k]
        elif k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
    for k, v in (("alpha", 1e-6), ("normalization", 1.0), ("kernel_size", float(KS))):
        if f"encoder.flow.{k}" in sd:
            sd[f"encoder.flow.{k}"] = torch.full((1,), v)
    return sd


# --------------------------------------------------- the released forward, plainly


def kernel_map(sd, p, img, k, noise):
    """UFPNet.forward's kernel estimation (code_extra_mean_var -> normalise -> flow)."""
    relu = torch.relu

    def res(q, x):
        return x + conv(sd, q + "body.3", relu(conv(sd, q + "body.1", relu(x), padding=1)), padding=1)

    def down(q, x):
        skip = relu(res(q + "ResBlock2.", res(q + "ResBlock1.", conv(sd, q + "Conv_head", x, padding=1))))
        return conv(sd, q + "downsample", skip, stride=2, padding=1), skip

    def up(q, x, skip):
        pad = [s - (2 * n - 1) for s, n in zip(skip.shape[-2:], x.shape[-2:])]
        u = F.conv_transpose2d(x, sd[q + "Conv_t.weight"], sd[q + "Conv_t.bias"], stride=2, padding=1,
                               output_padding=pad)
        u = conv(sd, q + "Conv_head", torch.cat([u, skip], 1), padding=1)
        return relu(res(q + "ResBlock2.", res(q + "ResBlock1.", u)))

    e = p + "kernel_extra."
    x, s1 = down(e + "Encoding_Block1.", img)
    x, s2 = down(e + "Encoding_Block2.", x)
    for j in (0, 2, 4, 6, 8):
        x = relu(conv(sd, f"{e}Conv_mid.body.{j}", x, padding=1))
    x = up(e + "Decoding_Block2.", up(e + "Decoding_Block1.", x, s2), s1)
    tail = lambda h: conv(sd, f"{e}Conv_tail.{h}.2", relu(conv(sd, f"{e}Conv_tail.{h}.0", x, padding=1)), padding=1)
    b, _, hh, ww = img.shape
    code = torch.softmax(tail("mean"), dim=1).reshape(b, k, k, hh * ww).permute(0, 3, 1, 2)
    var = torch.sigmoid(tail("var")).reshape(b, k, k, hh * ww).permute(0, 3, 1, 2)
    var = var.mean(dim=[2, 3], keepdim=True).repeat(1, 1, k, k)
    code = (code - code.mean(dim=[2, 3], keepdim=True)) / code.std(dim=[2, 3], keepdim=True)
    code = code * torch.sqrt(1 - var.square()) + (torch.randn_like(code) * var if noise else 0)
    u, f = code.reshape(b * hh * ww, -1), p + "flow.net."
    for step in reversed(range(2 * FLOW_BLOCKS)):
        q = f"{f}{step}."
        if step % 2:  # BatchNorm.inverse, eval mode
            u = (u - sd[q + "beta"]) * torch.exp(-sd[q + "log_gamma"])
            u = u * torch.sqrt(sd[q + "running_var"] + 1e-5) + sd[q + "running_mean"]
        else:  # LinearMaskedCoupling.inverse
            m = sd[q + "mask"]
            mu = u * m

            def mlp(net, act):
                h = act(F.linear(mu, sd[f"{q}{net}.0.weight"], sd[f"{q}{net}.0.bias"]))
                h = act(F.linear(h, sd[f"{q}{net}.2.weight"], sd[f"{q}{net}.2.bias"]))
                return F.linear(h, sd[f"{q}{net}.4.weight"], sd[f"{q}{net}.4.bias"])

            u = mu + (1 - m) * (u * mlp("s_net", torch.tanh).exp() + mlp("t_net", torch.relu))
    a = sd[p + "flow.alpha"]
    kern = (torch.sigmoid(u) - a) / (1 - 2 * a) * sd[p + "flow.normalization"]
    return kern.reshape(b, hh * ww, k, k).permute(0, 2, 3, 1).reshape(b, k * k, hh, ww)


def kernel_nafblock(sd, p, inp, kern):
    """NAFBlock_kernel.forward: kernel attention, then NAFBlock with its residuals on ``inp``."""
    q = p + "kernel_atttion."
    a = F.gelu(conv(sd, q + "conv_1.0", inp, padding=1))
    e = F.gelu(conv(sd, q + "conv_kernel.2", F.gelu(conv(sd, q + "conv_kernel.0", kern, padding=1)), padding=1))
    x = a * torch.sigmoid(conv(sd, q + "conv_2.0", torch.cat([a, e], 1), padding=1)) + inp
    x = layer_norm2d(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    x = gate(conv(sd, p + "conv2", conv(sd, p + "conv1", x), padding=1, groups=x.shape[1] * 2))
    x = x * conv(sd, p + "sca.1", x.mean((2, 3), keepdim=True))
    y = inp + conv(sd, p + "conv3", x) * sd[p + "beta"]
    x = conv(sd, p + "conv4", layer_norm2d(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"]))
    return y + conv(sd, p + "conv5", gate(x)) * sd[p + "gamma"]


def encoder_forward(sd, p, img, encoder, noise=False):
    kern = kernel_map(sd, p, img, KS, noise) if encoder == "ufpnet" else None
    x, feats, i = conv(sd, p + "intro", img, padding=1), [], 0
    while f"{p}downs.{i}.weight" in sd:
        if kern is not None and i < 3:
            x = kernel_nafblock(sd, f"{p}encoders.{i}.0.", x, kern)
            if i < 2:
                kern = conv(sd, f"{p}kernel_down.{i}", kern, stride=2)
        else:
            j = 0
            while f"{p}encoders.{i}.{j}.beta" in sd:
                x = nafblock_forward(sd, f"{p}encoders.{i}.{j}.", x)
                j += 1
        feats.append(x)
        x = conv(sd, f"{p}downs.{i}", x, stride=2)
        i += 1
    return feats + [nafblock_forward(sd, p + "middle_blks.0.", x)]


def fcnaf_forward(sd, p, inp):
    def fft(q, t):
        y = torch.fft.rfft2(t)
        y = F.gelu(conv(sd, q + "complex_conv1", torch.cat([y.real, y.imag], 1)))
        re, im = conv(sd, q + "complex_conv2", y).chunk(2, 1)
        return torch.fft.irfft2(torch.complex(re, im), s=t.shape[-2:])

    u = layer_norm2d(inp, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    x = gate(conv(sd, p + "conv2", conv(sd, p + "conv1", u), padding=1, groups=2 * inp.shape[1]))
    x = conv(sd, p + "conv3", x * conv(sd, p + "sca.0", x.mean((2, 3), keepdim=True))) + fft(p + "fft_block1.", u)
    y = inp + x * sd[p + "beta"]
    v = layer_norm2d(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    return y + (fft(p + "fft_block2.", v) + conv(sd, p + "conv5", gate(conv(sd, p + "conv4", v)))) * sd[p + "gamma"]


def adarevd_forward(sd, img, encoder):
    """AdaRevID eval output of the last column (pretrain path), and the e3 classifier's logits."""
    feats = [f * sd[f"conv_features.{i}"] for i, f in enumerate(encoder_forward(sd, "encoder.", img, encoder))]
    x, states, k = feats[4], [feats[3], feats[2], feats[1], feats[0]], 0
    while f"subdenets.{k}.alpha0" in sd:
        for i in range(4):
            p, a = f"subdenets.{k}.level{i}.", sd[f"subdenets.{k}.alpha{i}"]
            a = torch.where(a < 0, -1.0, 1.0) * a.abs().clamp_min(1e-3)  # UniDecoder._clamp_abs
            t = F.pixel_shuffle(conv(sd, p + "fusion.up.0", x if i == 0 else states[i - 1]), 2)
            if i < 3:
                d = conv(sd, p + "fusion.down.0", states[i + 1], stride=2)
                t = t + layer_norm2d(d, sd[p + "fusion.down.1.body.weight"], sd[p + "fusion.down.1.body.bias"],
                                     eps=1e-5)
            states[i] = a * states[i] + fcnaf_forward(sd, p + "blocks.0.", t)
        k += 1
    out = conv(sd, f"outputs.{k - 1}.0", states[3], padding=1) + img
    t = nafblock_forward(sd, "ape.1.", conv(sd, "ape.0", feats[3], stride=2)).mean((2, 3))
    t = F.layer_norm(t, t.shape[-1:], sd["ape.2.classifier.0.weight"], sd["ape.2.classifier.0.bias"], 1e-6)
    t = F.gelu(F.linear(t, sd["ape.2.classifier.1.weight"], sd["ape.2.classifier.1.bias"]))
    logits = F.linear(t, sd["ape.2.classifier.3.weight"], sd["ape.2.classifier.3.bias"]) * sd["ape.2.alpha"]
    return out, logits


# ------------------------------------------------------------------------- tests


def f64(sd):
    return {k: v.double() for k, v in sd.items()}


@pytest.mark.parametrize("encoder", ["ufpnet", "nafnet"])
def test_released_adarevd_loads_and_matches_the_released_forward(encoder):
    sd = released_state(adarevd_keys(encoder=encoder))
    model = from_released("adarevd", {"params": sd}, **CFG, encoder=encoder).double()
    assert not model.training
    img = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out, logits = model(img), model.classify(img)
    want_out, want_logits = adarevd_forward(f64(sd), img, encoder)
    torch.testing.assert_close(out, want_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)


def test_the_kernel_noise_is_the_released_draw():
    # Released: code * sqrt(1 - s^2) + randn_like(code) * s, code laid out [B, HW, k, k];
    # the same seed gives the same kernels here.
    sd = released_state(encoder_keys("", W, (1, 1, 1, 1), "ufpnet"))
    model = restorenet.create_model("adarevd", **{**CFG, "kernel_noise": True}).double()
    load_encoder(model, sd)
    img = torch.rand(1, 3, 8, 12, dtype=torch.float64)
    torch.manual_seed(3)
    ours = model.encoder.kernel_map(img)
    torch.manual_seed(3)
    torch.testing.assert_close(ours, kernel_map(f64(sd), "", img, KS, noise=True), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ours, model.encoder.kernel_map(img))  # a fresh draw each call


def test_paper_size_key_table_matches_the_model():
    # AdaRevD-B (UFPNet encoder, K = 4): every released key and shape has its place (meta device).
    released = adarevd_keys(width=64, num_decoders=4, enc=(1, 1, 1, 28), kernel_size=19, est_width=64)
    with torch.device("meta"):
        model = restorenet.create_model("adarevd")
    ours = {k: v.shape for k, v in model.state_dict().items()}
    converted = convert({k: torch.empty(s, device="meta") for k, s in released.items()}, model)
    assert {k: v.shape for k, v in converted.items()} == ours


def test_wrong_checkpoints_are_listed():
    sd = released_state(adarevd_keys())
    broken = dict(sd)
    del broken["subdenets.1.alpha2"]
    broken["ape.3.weight"] = torch.zeros(1)
    broken["outputs.0.0.weight"] = torch.zeros(3, W, 5, 5)
    with pytest.raises(CheckpointMismatch) as err:
        from_released("adarevd", broken, **CFG)
    e = err.value
    assert e.missing == ["decoder.columns.1.alphas.2"] and e.unexpected == ["ape.3.weight"]
    assert e.wrong_shape == [("heads.0.weight", (3, W, 5, 5), (3, W, 3, 3))]
    with pytest.raises(CheckpointMismatch, match="missing keys"):  # a NAFNet checkpoint
        from_released("adarevd", random_state(nafnet_keys(width=W, enc=(1, 1, 1, 1), dec=(1, 1, 1, 1))), **CFG)
    with pytest.raises(CheckpointMismatch, match="unexpected keys"):  # UFPNet weights, NAFNet encoder
        from_released("adarevd", sd, **CFG, encoder="nafnet")


@pytest.mark.parametrize("encoder", ["nafnet", "ufpnet"])
def test_load_encoder_takes_a_whole_network_or_its_encoder(encoder):
    enc = encoder_keys("", W, (1, 1, 1, 1), encoder)
    whole = {**enc, **{k: v for k, v in nafnet_keys(width=W, enc=(1, 1, 1, 1), dec=(1, 1, 1, 1)).items()
                       if k.startswith(("decoders.", "ups.", "ending."))}}
    if encoder == "ufpnet":  # the whole UFPNet has a kernel downsampler after every level
        whole |= conv_keys("kernel_down.2.", KS * KS, KS * KS, 2) | conv_keys("kernel_down.3.", KS * KS, KS * KS, 2)
    img = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    for table in (enc, whole):
        sd = released_state(table)
        model = restorenet.create_model("adarevd", **CFG, encoder=encoder)
        load_encoder(model, {"params": sd})
        with torch.no_grad():
            feats = model.double().encoder(img)
        for got, want in zip(feats, encoder_forward(f64(sd), "", img, encoder)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    with pytest.raises(CheckpointMismatch, match="missing keys"):
        load_encoder(restorenet.create_model("adarevd", **CFG), released_state(encoder_keys("", W, (1, 1, 1, 1),
                                                                                            "nafnet")))


def test_body_and_classifier_files_load_together(tmp_path):
    # The released test options: the main body (pretrain run, no ape.*) and save_classifier.py's file.
    sd = released_state(adarevd_keys(encoder="nafnet"))
    body = {k: v for k, v in sd.items() if not k.startswith("ape.")}
    torch.save({"params": body}, tmp_path / "net_g.pth")
    torch.save({k[len("ape."):]: v for k, v in sd.items() if k.startswith("ape.")}, tmp_path / "GoPro.pth")
    cfg = dict(CFG, encoder="nafnet")
    parts = from_released_parts(tmp_path / "net_g.pth", tmp_path / "GoPro.pth", **cfg)
    whole = from_released("adarevd", sd, **cfg)
    assert not parts.training
    for (name, a), b in zip(parts.state_dict().items(), whole.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointMismatch, match="classifier.logit_scale"):  # the body alone
        from_released("adarevd", body, **cfg)
    with pytest.raises(ValueError, match="already holds a classifier"):
        from_released_parts(sd, tmp_path / "GoPro.pth", **cfg)
