"""The authors' released layouts, written out for the weight tests.

Each ``*_keys`` function is the table ``released key -> shape`` of a released
architecture (read from the authors' public code, written here by hand), and each
``*_forward`` applies such a state dict with plain PyTorch formulas, independently of
restorenet's modules, so a converted checkpoint can be checked output against output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_state(table: dict[str, tuple], seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Random values for every key (none zero-initialised: a zero beta would hide a block)."""
    g = torch.Generator().manual_seed(seed)
    return {k: std * torch.randn(shape, generator=g) for k, shape in table.items()}


def conv(sd, name, x, **kw):
    return F.conv2d(x, sd[name + ".weight"], sd.get(name + ".bias"), **kw)


# --- NAFNet (megvii-research/NAFNet, basicsr/models/archs/NAFNet_arch.py) -------------

def nafblock_keys(p: str, c: int) -> dict[str, tuple]:
    return {
        p + "conv1.weight": (2 * c, c, 1, 1), p + "conv1.bias": (2 * c,),
        p + "conv2.weight": (2 * c, 1, 3, 3), p + "conv2.bias": (2 * c,),
        p + "conv3.weight": (c, c, 1, 1), p + "conv3.bias": (c,),
        p + "sca.1.weight": (c, c, 1, 1), p + "sca.1.bias": (c,),
        p + "conv4.weight": (2 * c, c, 1, 1), p + "conv4.bias": (2 * c,),
        p + "conv5.weight": (c, c, 1, 1), p + "conv5.bias": (c,),
        p + "norm1.weight": (c,), p + "norm1.bias": (c,),
        p + "norm2.weight": (c,), p + "norm2.bias": (c,),
        p + "beta": (1, c, 1, 1), p + "gamma": (1, c, 1, 1),
    }


def nafnet_keys(p: str = "", img: int = 3, width: int = 8, enc=(1, 1), middle: int = 1,
                dec=(1, 1)) -> dict[str, tuple]:
    t = {p + "intro.weight": (width, img, 3, 3), p + "intro.bias": (width,),
         p + "ending.weight": (img, width, 3, 3), p + "ending.bias": (img,)}
    c = width
    for i, n in enumerate(enc):
        for j in range(n):
            t |= nafblock_keys(f"{p}encoders.{i}.{j}.", c)
        t |= {f"{p}downs.{i}.weight": (2 * c, c, 2, 2), f"{p}downs.{i}.bias": (2 * c,)}
        c *= 2
    for j in range(middle):
        t |= nafblock_keys(f"{p}middle_blks.{j}.", c)
    for i, n in enumerate(dec):
        t[f"{p}ups.{i}.0.weight"] = (2 * c, c, 1, 1)
        c //= 2
        for j in range(n):
            t |= nafblock_keys(f"{p}decoders.{i}.{j}.", c)
    return t


def layer_norm2d(x, w, b, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return w.view(1, -1, 1, 1) * (x - mu) / (var + eps).sqrt() + b.view(1, -1, 1, 1)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return a * b


def nafblock_forward(sd, p, inp):
    x = layer_norm2d(inp, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    x = conv(sd, p + "conv2", conv(sd, p + "conv1", x), padding=1, groups=x.shape[1] * 2)
    x = gate(x)
    x = x * conv(sd, p + "sca.1", x.mean((2, 3), keepdim=True))
    y = inp + conv(sd, p + "conv3", x) * sd[p + "beta"]
    x = conv(sd, p + "conv4", layer_norm2d(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"]))
    return y + conv(sd, p + "conv5", gate(x)) * sd[p + "gamma"]


def _blocks(sd, p, x):
    j = 0
    while f"{p}{j}.beta" in sd:
        x = nafblock_forward(sd, f"{p}{j}.", x)
        j += 1
    return x


def nafnet_forward(sd, inp, p: str = ""):
    """Released NAFNet.forward (H, W already multiples of 2**levels)."""
    x, skips, i = conv(sd, p + "intro", inp, padding=1), [], 0
    while f"{p}downs.{i}.weight" in sd:
        x = _blocks(sd, f"{p}encoders.{i}.", x)
        skips.append(x)
        x = conv(sd, f"{p}downs.{i}", x, stride=2)
        i += 1
    x = _blocks(sd, f"{p}middle_blks.", x)
    for i, skip in enumerate(reversed(skips)):
        x = F.pixel_shuffle(conv(sd, f"{p}ups.{i}.0", x), 2) + skip
        x = _blocks(sd, f"{p}decoders.{i}.", x)
    return conv(sd, p + "ending", x, padding=1) + inp


# --- MHNet (github.com/Tombs98/MHNet, top-level MHNet.py) ------------------------------

def mhnet_keys(width: int = 8, enc=(1, 1, 1, 1), dec=(1, 1, 1, 1), num_cab: int = 1,
               heads: int = 8) -> dict[str, tuple]:
    w, bottom = width, width * 16
    t = {"intro.weight": (w, 3, 3, 3), "intro2.weight": (w, 3, 3, 3),
         "concat12.weight": (w, 2 * w, 1, 1), "ending.weight": (3, w, 3, 3)}
    t |= nafnet_keys("stage1.", 3, w, enc, 0, dec)
    t |= {"stage1.middle_blks.0.temperature": (heads, 1, 1),
          "stage1.middle_blks.0.qkv.weight": (3 * bottom, bottom, 1, 1),
          "stage1.middle_blks.0.qkv_dwconv.weight": (3 * bottom, 1, 3, 3),
          "stage1.middle_blks.0.project_out.weight": (bottom, bottom, 1, 1),
          **{f"stage1.middle_blks.0.attn{j}": (1,) for j in range(1, 5)}}
    d = max(int(w / 8), 4)
    for n in range(1, 5):
        for j in range(num_cab):
            t |= nafblock_keys(f"stage2.CABG{n}.{j}.", w)
        t |= {f"stage2.norm{n}.weight": (w,), f"stage2.norm{n}.bias": (w,),
              f"stage2.conv_enc{n}.weight": (w, w, 1, 1), f"stage2.conv_dnc{n}.weight": (w, w, 1, 1),
              f"stage2.skff{n}.conv_du.0.weight": (d, w, 1, 1),
              **{f"stage2.skff{n}.fcs.{k}.weight": (w, d // 2, 1, 1) for k in range(3)}}
    for tap in ("enc", "dec"):
        t[f"stage2.up_{tap}1.up.0.weight"] = (4 * w, 2 * w, 1, 1)
        for i in (2, 3):
            for j in range(i):
                c = w * 2 ** (i - j)
                t[f"stage2.up_{tap}{i}.{j}.up.0.weight"] = (2 * c, c, 1, 1)
    return t


def topk_attention_forward(sd, p, x, heads):
    """The released Attention: four separately top-k-masked softmaxes, each times v,
    mixed by the scalars attn1..attn4."""
    b, c, h, w = x.shape
    qkv = conv(sd, p + "qkv_dwconv", conv(sd, p + "qkv", x), padding=1, groups=3 * c)
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in qkv.chunk(3, dim=1))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * sd[p + "temperature"]
    C = c // heads
    out = 0
    for j, kj in enumerate([int(C / 2), int(C * 2 / 3), int(C * 3 / 4), int(C * 4 / 5)], 1):
        mask = torch.zeros_like(attn).scatter_(-1, attn.topk(kj, dim=-1).indices, 1.0)
        masked = torch.where(mask > 0, attn, torch.full_like(attn, float("-inf")))
        out = out + (masked.softmax(dim=-1) @ v) * sd[f"{p}attn{j}"]
    return conv(sd, p + "project_out", out.reshape(b, c, h, w))


def affm_forward(sd, p, f, f_e, f_d):
    z = gate(conv(sd, p + "conv_du.0", (f + f_e + f_d).mean((2, 3), keepdim=True)))
    a, a_e, a_d = (conv(sd, f"{p}fcs.{k}", z).softmax(dim=1) for k in range(3))
    return a * f + a_e * f_e + a_d * f_d


def mhnet_forward(sd, img, heads=8):
    """Released MHNet.forward (H, W multiples of 16; the unused intro/ending skipped)."""
    p = "stage1."
    x, encs, decs = conv(sd, p + "intro", img, padding=1), [], []
    for i in range(4):
        x = _blocks(sd, f"{p}encoders.{i}.", x)
        encs.append(x)
        x = conv(sd, f"{p}downs.{i}", x, stride=2)
    x = topk_attention_forward(sd, p + "middle_blks.0.", x, heads)
    for i in range(4):
        x = F.pixel_shuffle(conv(sd, f"{p}ups.{i}.0", x), 2) + encs[3 - i]
        x = _blocks(sd, f"{p}decoders.{i}.", x)
        decs.append(x)

    def up(name, t):
        return F.pixel_shuffle(conv(sd, name + ".up.0", t), 2)

    def taps(tap, feats):
        return [feats[0], up(f"stage2.up_{tap}1", feats[1]),
                up(f"stage2.up_{tap}2.1", up(f"stage2.up_{tap}2.0", feats[2])),
                up(f"stage2.up_{tap}3.2", up(f"stage2.up_{tap}3.1", up(f"stage2.up_{tap}3.0", feats[3])))]

    enc_taps, dec_taps = taps("enc", encs), taps("dec", decs[::-1])
    x = conv(sd, "concat12", torch.cat([conv(sd, "intro2", img, padding=1), decs[3]], 1))
    for n in range(1, 5):
        x = layer_norm2d(x, sd[f"stage2.norm{n}.weight"], sd[f"stage2.norm{n}.bias"])
        x = _blocks(sd, f"stage2.CABG{n}.", x) + x
        x = affm_forward(sd, f"stage2.skff{n}.", x, conv(sd, f"stage2.conv_enc{n}", enc_taps[n - 1]),
                         conv(sd, "stage2.conv_dnc1", dec_taps[n - 1]))
    return conv(sd, "ending", x, padding=1) + img


# --- HyperRes (github.com/ifryed/HyperRes, models/HyperRes.py, models/NoiseNet.py) -----

def hyperres_keys(meta_blocks: int = 1, channels: int = 3) -> dict[str, tuple]:
    w = 64  # the released HyperRes hard-codes 64 channels
    p = w * (w * 9 + 1)
    t = {"conv1.module.weight": (w, channels, 3, 3), "conv1.module.bias": (w,),
         "conv2.module.weight": (w, w, 3, 3), "conv2.module.bias": (w,),
         "conv3.module.weight": (4 * w, w, 3, 3), "conv3.module.bias": (4 * w,),
         "conv4.module.weight": (w, w, 3, 3), "conv4.module.bias": (w,),
         "conv5.module.weight": (channels, w, 3, 3), "conv5.module.bias": (channels,)}
    for n in range(1, meta_blocks + 1):
        for k in (1, 2):
            t |= {f"res_blocks_meta.{n}.hy_conv{k}.fc.weight": (p, 1),
                  f"res_blocks_meta.{n}.hy_conv{k}.fc.bias": (p,)}
    return t


def hyperres_forward(sd, images, levels, norm_factor=255):
    """Released HyperRes.forward: one image batch per level; the levels divided by
    ``norm_factor`` only when the smallest is >= 1."""
    if min(levels) >= 1:
        levels = [lv / norm_factor for lv in levels]
    outs = []
    for x, c in zip(images, levels):
        f0 = conv(sd, "conv1.module", x, stride=2, padding=1)
        f, n = f0, 1
        while f"res_blocks_meta.{n}.hy_conv1.fc.weight" in sd:
            h = f
            for k in (1, 2):
                fc = f"res_blocks_meta.{n}.hy_conv{k}.fc"
                generated = sd[fc + ".weight"][:, 0] * c + sd[fc + ".bias"]
                cout = f.shape[1]
                kernel = generated[:cout * cout * 9].reshape(cout, cout, 3, 3)
                h = F.conv2d(h, kernel, generated[cout * cout * 9:], padding=1)
                h = F.relu(h) if k == 1 else h + f
            f, n = h, n + 1
        x = conv(sd, "conv2.module", f, padding=1) + f0
        x = F.relu(F.pixel_shuffle(conv(sd, "conv3.module", x, padding=1), 2))
        x = F.relu(conv(sd, "conv4.module", x, padding=1))
        outs.append(conv(sd, "conv5.module", x, padding=1))
    return outs


def noisenet_keys(width: int = 64, crop: int = 128) -> dict[str, tuple]:
    t = {"conv1.weight": (width, 3, 3, 3), "conv1.bias": (width,)}
    for i in (0, 2, 4, 6):
        for k in (1, 2):
            t |= {f"conv_seq.{i}.conv{k}.weight": (width, width, 3, 3), f"conv_seq.{i}.conv{k}.bias": (width,)}
    t |= {"fc_seq.0.weight": (32, width * (crop // 32) ** 2), "fc_seq.0.bias": (32,),
          "fc_seq.2.weight": (16, 32), "fc_seq.2.bias": (16,),
          "fc_seq.4.weight": (1, 16), "fc_seq.4.bias": (1,)}
    return t


def noisenet_forward(sd, crop):
    """Released NoiseNet.forward on an already cropped batch: [N, 1]."""
    x = conv(sd, "conv1", crop, stride=2, padding=1)
    for i in (0, 2, 4, 6):
        p = f"conv_seq.{i}."
        x = F.max_pool2d(conv(sd, p + "conv2", F.relu(conv(sd, p + "conv1", x, padding=1)), padding=1) + x, 2)
    x = x.flatten(1)
    x = F.relu(F.linear(x, sd["fc_seq.0.weight"], sd["fc_seq.0.bias"]))
    x = F.relu(F.linear(x, sd["fc_seq.2.weight"], sd["fc_seq.2.bias"]))
    return F.linear(x, sd["fc_seq.4.weight"], sd["fc_seq.4.bias"])


# --- ConStyle-NAFNet (github.com/Dongqi-Fan/IRConStyle, archs/ConStyle*_arch.py) ------

_STYLE_CONVS = {1: [(3, 16, 1), (16, 16, 1), (16, 32, 2)], 2: [(32, 32, 1), (32, 64, 2)],
                3: [(64, 128, 1), (128, 128, 2)], 4: [(128, 256, 1), (256, 256, 2)]}


def constyle_encoder_keys(p: str = "ConStyle.encoder_q.") -> dict[str, tuple]:
    t = {f"{p}stage{n}.{j}.0.weight": (cout, cin, 3, 3)
         for n, convs in _STYLE_CONVS.items() for j, (cin, cout, _) in enumerate(convs)}
    for n, fan_in in ((1, 256), (2, 128)):
        t |= {f"{p}mlp{n}.0.weight": (128, fan_in), f"{p}mlp{n}.0.bias": (128,),
              **{f"{p}mlp{n}.1.{b}": (128,) for b in ("weight", "bias", "running_mean", "running_var")},
              f"{p}mlp{n}.1.num_batches_tracked": ()}
    return t


def constyle_nafnet_keys(dim: int = 8, left=(1, 1, 1), bottom: int = 1, right=(1, 1, 1),
                         train: bool = False) -> dict[str, tuple]:
    t = constyle_encoder_keys()
    if train:
        t |= constyle_encoder_keys("ConStyle.encoder_k.")
        t |= {"ConStyle.queue": (128, 65760), "ConStyle.queue_ptr": (1,)}
    t |= {"Preprocess_Module.0.weight": (dim, 3, 3, 3), "local_fusion.weight": (3 * dim, 8 * dim, 1, 1),
          "Finetune_Module.0.weight": (3, 2 * dim, 3, 3),
          "mlp.0.weight": (4 * dim, 128), "mlp.0.bias": (4 * dim,),
          "AffineTransform0.0.weight": (dim, 32, 1, 1), "AffineTransform1.0.weight": (dim, 64, 1, 1),
          "AffineTransform2.0.weight": (dim, 128, 1, 1)}
    for n in (1, 2, 3):
        c = n * dim
        t[f"DC{n}.down.0.weight"] = (c // 4, c, 3, 3)
        for j in range(left[n - 1]):
            t |= nafblock_keys(f"Process_Module_l{n}.{j}.", c)
        for j in range(right[n - 1]):
            t |= nafblock_keys(f"Process_Module_r{n}.{j}.", (n + 1) * dim)
    for j in range(bottom):
        t |= nafblock_keys(f"Process_Module_bottom.{j}.", 4 * dim)
    # UC(n_feat, down_in, down_out): up conv n_feat -> 4 n_feat, then a 1x1 down_in -> down_out
    for n, (feat, down_in, down_out) in {3: (3, 6, 4), 2: (4, 6, 3), 1: (3, 4, 2)}.items():
        t |= {f"UC{n}.up.0.weight": (4 * feat * dim, feat * dim, 3, 3),
              f"UC{n}.down.weight": (down_out * dim, down_in * dim, 1, 1)}
    return t


def constyle_state(table, seed=0, std=0.2):
    """Random values, with BatchNorm statistics a BatchNorm can hold."""
    sd = random_state(table, seed, std)
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = sd[k].abs() + 0.5
        elif k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
    return sd


def constyle_encoder_forward(sd, img, p="ConStyle.encoder_q."):
    feas, x = [], img
    for n, convs in _STYLE_CONVS.items():
        for j, (_, _, stride) in enumerate(convs):
            x = F.leaky_relu(conv(sd, f"{p}stage{n}.{j}.0", x, stride=stride, padding=1), 0.1)
        feas.append(x)
    x, out = x.mean((2, 3)), []
    for n in (1, 2):
        x = F.linear(x, sd[f"{p}mlp{n}.0.weight"], sd[f"{p}mlp{n}.0.bias"])
        b = f"{p}mlp{n}.1."
        x = F.gelu(F.batch_norm(x, sd[b + "running_mean"], sd[b + "running_var"], sd[b + "weight"],
                                sd[b + "bias"], training=False, eps=1e-5))
        out.append(x)
    return out, feas[:3]


def constyle_nafnet_forward(sd, img):
    """The released test path: query, feas = ConStyle.encoder_q(lq); net(lq, query[1], feas)."""
    (_, q), feas = constyle_encoder_forward(sd, img)
    q = F.linear(q, sd["mlp.0.weight"], sd["mlp.0.bias"])[..., None, None]
    injected = [F.leaky_relu(conv(sd, f"AffineTransform{i}.0", f), 0.1) for i, f in enumerate(feas)]
    x, skips = conv(sd, "Preprocess_Module.0", img, padding=1), []
    for n in (1, 2, 3):
        x = _blocks(sd, f"Process_Module_l{n}.", x)
        skips.append(x)
        x = torch.cat([F.pixel_unshuffle(conv(sd, f"DC{n}.down.0", x, padding=1), 2), injected[n - 1]], 1)
    x = _blocks(sd, "Process_Module_bottom.", x)
    x = conv(sd, "local_fusion", torch.cat([x, x * q], 1))
    for n in (3, 2, 1):
        x = F.pixel_shuffle(conv(sd, f"UC{n}.up.0", x, padding=1), 2)
        x = conv(sd, f"UC{n}.down", torch.cat([x, skips[n - 1]], 1))
        x = _blocks(sd, f"Process_Module_r{n}.", x)
    return conv(sd, "Finetune_Module.0", x, padding=1) + img
