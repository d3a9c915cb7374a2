import pytest
import torch

from restorenet.data import heldout_images
from restorenet.data.degradations import (
    add_gaussian_noise,
    bicubic_down_up,
    jpeg_compress,
    motion_blur,
    random_motion_blur,
    random_motion_kernel,
)
from restorenet.metrics import psnr


@pytest.fixture(scope="module")
def photos():
    return heldout_images(64)  # [2, 3, 64, 64] real photos


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Gaussian noise

@pytest.mark.parametrize("sigma", [5, 25, 75])
def test_noise_std_matches_sigma(photos, sigma):
    noisy = add_gaussian_noise(photos, sigma, gen())
    residual = (noisy - photos) * 255
    assert residual.std().item() == pytest.approx(sigma, rel=0.03)
    assert abs(residual.mean().item()) < 0.05 * sigma


def test_noise_is_deterministic_per_generator_and_keeps_shape(photos):
    a = add_gaussian_noise(photos[0], 25, gen(1))
    b = add_gaussian_noise(photos[0], 25, gen(1))
    c = add_gaussian_noise(photos[0], 25, gen(2))
    assert a.shape == photos[0].shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_noise_sigma_zero_is_identity(photos):
    assert torch.equal(add_gaussian_noise(photos, 0, gen()), photos)


# ---------------------------------------------------------------- JPEG

def test_jpeg_lower_quality_is_worse_and_changes_image(photos):
    scores = [psnr(jpeg_compress(photos, q), photos).mean().item() for q in (10, 50, 95)]
    assert scores[0] < scores[1] < scores[2]
    assert scores[0] < 35  # quality 10 visibly changes the image


def test_jpeg_quality_100_is_close_to_identity(photos):
    out = jpeg_compress(photos, 100)
    assert out.shape == photos.shape and out.dtype == photos.dtype
    assert psnr(out, photos).min().item() > 38
    assert out.min() >= 0 and out.max() <= 1


def test_jpeg_single_image_matches_batch(photos):
    assert torch.equal(jpeg_compress(photos[1], 30), jpeg_compress(photos, 30)[1])


# ---------------------------------------------------------------- bicubic SR

@pytest.mark.parametrize("scale", [2, 3, 4.5])
def test_sr_keeps_size_and_loses_detail(photos, scale):
    out = bicubic_down_up(photos, scale)
    assert out.shape == photos.shape
    assert out.min() >= 0 and out.max() <= 1
    assert psnr(out, photos).max().item() < 40


def test_sr_larger_scale_is_worse(photos):
    scores = [psnr(bicubic_down_up(photos, s), photos).mean().item() for s in (2, 3, 4, 5)]
    assert scores == sorted(scores, reverse=True)


def test_sr_scale_one_is_identity(photos):
    torch.testing.assert_close(bicubic_down_up(photos, 1), photos, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- motion blur

@pytest.mark.parametrize("size", [3, 9, 21])
def test_motion_kernel_sums_to_one_and_is_a_streak(size):
    k = random_motion_kernel(size, gen(size))
    assert k.shape == (size, size)
    assert k.min() >= 0
    assert k.sum().item() == pytest.approx(1.0, abs=1e-6)
    # The trajectory spans the kernel ...
    rows, cols = (k > 0).any(1).nonzero(), (k > 0).any(0).nonzero()
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) >= size - 2
    if size >= 9:  # ... along a thin path, not a filled square (3x3 is all splat)
        assert (k > 1e-4).float().mean() < 0.5


def test_motion_kernel_is_deterministic_per_generator():
    assert torch.equal(random_motion_kernel(15, gen(3)), random_motion_kernel(15, gen(3)))
    assert not torch.equal(random_motion_kernel(15, gen(3)), random_motion_kernel(15, gen(4)))


def test_motion_blur_delta_kernel_is_identity_and_shift_is_a_convolution(photos):
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    torch.testing.assert_close(motion_blur(photos, delta), photos)
    # A kernel with its mass one pixel right of centre shifts the image right
    # (true convolution, not correlation).
    shift = torch.zeros(5, 5)
    shift[2, 3] = 1
    out = motion_blur(photos, shift)
    torch.testing.assert_close(out[..., 1:], photos[..., :-1])


def test_motion_blur_keeps_brightness_and_blurs(photos):
    out = random_motion_blur(photos, 15, gen())
    assert out.shape == photos.shape
    torch.testing.assert_close(out.mean(), photos.mean(), atol=5e-3, rtol=0)
    assert psnr(out, photos).max().item() < 35
    # Each image in a batch gets its own kernel.
    single = random_motion_blur(photos[:1], 15, gen())
    torch.testing.assert_close(out[:1], single)


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("call, name", [
    (lambda x: add_gaussian_noise(x, -1.0), "sigma"),
    (lambda x: jpeg_compress(x, 0), "quality"),
    (lambda x: jpeg_compress(x, 101), "quality"),
    (lambda x: bicubic_down_up(x, 0.5), "scale"),
    (lambda x: random_motion_blur(x, 4), "size"),
    (lambda x: random_motion_blur(x, 1), "size"),
    (lambda x: random_motion_kernel(8), "size"),
    (lambda x: motion_blur(x, torch.ones(4, 4) / 16), "kernel"),
    (lambda x: add_gaussian_noise(x[0, 0], 10.0), "img"),
])
def test_bad_arguments_raise_naming_the_argument(photos, call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call(photos)


@pytest.mark.parametrize("call, name", [
    (lambda x: jpeg_compress(x, 50.5), "quality"),
    (lambda x: add_gaussian_noise(x.numpy(), 10.0), "img"),
    (lambda x: add_gaussian_noise((x * 255).to(torch.uint8), 10.0), "img"),
])
def test_bad_types_raise_naming_the_argument(photos, call, name):
    with pytest.raises(TypeError, match=f"^{name}"):
        call(photos)
