"""The host-side layouts the conv kernels read (kernels/conv_core.py): 16-bit
activations channels-innermost in 16-channel rows, weights packed in padded rows.
What the kernels compute from them is tested per op (tests/ops); that their
loads become cp.async is tested on the compiled code (test_aot.py)."""
from __future__ import annotations

import pytest
import torch

from restorenet_kernels.conv_core import index64, pack_weight, pixel_strides, vector_layout


def _nchw(dtype, c=5, n=2, h=3, w=7):
    return torch.randn(n, c, h, w).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c,channels_last", [(5, False), (5, True), (32, False), (17, True)])
def test_16bit_activations_are_copied_into_padded_channel_rows(dtype, c, channels_last):
    x = _nchw(dtype, c)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    staged, c_alloc = vector_layout(x)
    assert c_alloc % 16 == 0 and c_alloc >= c and c_alloc - c < 16
    assert staged.shape == x.shape and torch.equal(staged, x)
    n, _, h, w = x.shape
    assert staged.stride() == (h * w * c_alloc, 1, w * c_alloc, c_alloc)
    assert pixel_strides(staged) == (h * w * c_alloc, 1, c_alloc)
    assert staged.data_ptr() % 32 == 0
    # The padding channels are zeros: the kernels read them as whole vectors.
    buffer = torch.as_strided(staged, (n, h, w, c_alloc), (h * w * c_alloc, w * c_alloc, c_alloc, 1))
    assert torch.all(buffer[..., c:] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aligned_16bit_layouts_are_used_in_place(dtype):
    x = _nchw(dtype, 32).contiguous(memory_format=torch.channels_last)
    same, c_alloc = vector_layout(x)
    assert same is x and c_alloc == 32
    staged, c_alloc = vector_layout(_nchw(dtype, 20))
    again, c_again = vector_layout(staged)  # the backward stages dy once for both gradients
    assert again is staged and c_again == c_alloc == 32


def test_misaligned_16bit_views_are_copied():
    base = _nchw(torch.float16, 33).contiguous(memory_format=torch.channels_last)
    view = base[:, 1:]  # 16 channels per row is not enough: the rows start 2 bytes in
    staged, c_alloc = vector_layout(view)
    assert staged is not view and c_alloc == 32 and torch.equal(staged, view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_wider_elements_are_read_in_their_own_layout(dtype, channels_last):
    x = _nchw(dtype, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    same, c_alloc = vector_layout(x)
    assert same is x and c_alloc == 5


@pytest.mark.parametrize("contiguous_dim", [0, 1])
def test_packed_weights_keep_their_values_in_padded_aligned_rows(contiguous_dim):
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float16)
    packed = pack_weight(weight, contiguous_dim)
    assert torch.equal(packed, weight)
    assert packed.stride(contiguous_dim) == 1
    other = 1 - contiguous_dim
    assert packed.stride(other) == 16  # 6 or 5 channels, stored 16 apart
    assert packed.stride(3) == 16 * weight.shape[other] and packed.stride(2) == 3 * packed.stride(3)


def test_64bit_offsets_are_chosen_on_the_padded_rows():
    """3 channels padded to 16 make a sample's offsets 5.3x longer: a 2**27-pixel
    image needs int64 offsets in the 16-bit layout although its NCHW copy does not
    (meta tensors: shapes and strides only, nothing is allocated)."""
    h, w = 2 ** 14, 2 ** 13 + 1
    dense = torch.empty((1, 3, h, w), dtype=torch.float16, device="meta")
    padded = torch.empty_strided((1, 3, h, w), (h * w * 16, 1, w * 16, 16), dtype=torch.float16, device="meta")
    assert not index64(dense) and index64(padded)
    assert index64(torch.empty((1, 2, 2 ** 15, 2 ** 15), device="meta"))  # exactly 2**31 elements a sample
    assert not index64(torch.empty((1, 2, 2 ** 15, 2 ** 15 - 1), device="meta"))
