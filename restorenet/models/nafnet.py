"""NAFNet (Chen et al. 2022): the U-Net of NAFBlocks that AdaRevD's encoder,
MHNet's first stage and ConStyle-NAFNet build on.

    img -> conv3x3 -> [NAFBlocks -> down] x L -> middle NAFBlocks
        -> [up -> + skip -> NAFBlocks] x L -> conv3x3 -> + img
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from restorenet._checks import check_image, check_int, check_int_sequence
from restorenet.models.blocks import NAFBlock, downsample, pad_to_multiple, upsample
from restorenet.registry import register_model


def naf_stage(channels: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*[NAFBlock(channels) for _ in range(num_blocks)])


class NAFNetEncoder(nn.Module):
    """The contracting half of NAFNet; returns the features of every level.

    ``forward`` returns ``[e0, ..., eL]``: ``e_l`` has ``width * 2**l`` channels
    at ``H / 2**l``; the last one is the middle blocks' output.
    """

    def __init__(self, in_channels: int = 3, width: int = 64,
                 enc_blocks: Sequence[int] = (1, 1, 1, 28), middle_blocks: int = 1):
        super().__init__()
        # Checked here, where NAFNet, MHNet and AdaRevD all pass their sizes first.
        check_int("in_channels", in_channels, 1)
        check_int("width", width, 1)
        enc_blocks = check_int_sequence("enc_blocks", enc_blocks, 0)
        check_int("middle_blocks", middle_blocks, 0)
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1)
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        c = width
        for n in enc_blocks:
            self.stages.append(naf_stage(c, n))
            self.downs.append(downsample(c))
            c *= 2
        self.middle = naf_stage(c, middle_blocks)
        self.channels = [width * 2**i for i in range(len(enc_blocks) + 1)]

    @property
    def size_multiple(self) -> int:
        return 2 ** len(self.stages)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.intro(img)
        for stage, down in zip(self.stages, self.downs):
            x = stage(x)
            feats.append(x)
            x = down(x)
        feats.append(self.middle(x))
        return feats


class NAFNetDecoder(nn.Module):
    """The expanding half: up, add the skip, NAFBlocks; coarsest level first."""

    def __init__(self, width: int = 64, dec_blocks: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        check_int("width", width, 1)
        dec_blocks = check_int_sequence("dec_blocks", dec_blocks, 0)
        levels = len(dec_blocks)
        self.ups = nn.ModuleList()
        self.stages = nn.ModuleList()
        c = width * 2**levels
        for n in dec_blocks:
            self.ups.append(upsample(c))
            c //= 2
            self.stages.append(naf_stage(c, n))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.levels(feats)[0]

    def levels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every decoder level's output, finest first (level i at H / 2**i)."""
        x, out = feats[-1], []
        for up, stage, skip in zip(self.ups, self.stages, reversed(feats[:-1])):
            x = stage(up(x) + skip)
            out.append(x)
        return out[::-1]


class NAFNet(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64,
                 enc_blocks: Sequence[int] = (1, 1, 1, 28), middle_blocks: int = 1,
                 dec_blocks: Sequence[int] = (1, 1, 1, 1)):
        super().__init__()
        # At least one level: the decoder's finest output is the image's.
        enc_blocks = check_int_sequence("enc_blocks", enc_blocks, 0, min_length=1)
        dec_blocks = check_int_sequence("dec_blocks", dec_blocks, 0)
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks and dec_blocks must have the same length, "
                             f"got {len(enc_blocks)} and {len(dec_blocks)}")
        self.in_channels = in_channels
        self.encoder = NAFNetEncoder(in_channels, width, enc_blocks, middle_blocks)
        self.decoder = NAFNetDecoder(width, dec_blocks)
        self.ending = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_image("img", img, self.in_channels)
        h, w = img.shape[-2:]
        x = pad_to_multiple(img, self.encoder.size_multiple)
        out = self.ending(self.decoder(self.encoder(x))) + x
        return out[..., :h, :w]


@register_model("nafnet")
def nafnet(**cfg) -> NAFNet:
    """NAFNet-width64 for GoPro deblurring (enc [1,1,1,28], middle 1, dec [1,1,1,1])."""
    return NAFNet(**cfg)
