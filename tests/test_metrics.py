import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from restorenet.data import add_gaussian_noise, heldout_images, jpeg_compress
from restorenet.metrics import psnr, rgb_to_y, ssim


@pytest.fixture(scope="module")
def photos():
    return heldout_images(64)


def test_identical_images_give_inf_psnr_and_unit_ssim(photos):
    assert torch.isinf(psnr(photos, photos)).all()
    torch.testing.assert_close(ssim(photos, photos), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("mse, data_range", [(1e-2, 1.0), (1e-4, 1.0), (4.0, 255.0)])
def test_psnr_of_a_known_mse(mse, data_range):
    torch.manual_seed(0)
    target = torch.rand(3, 3, 16, 16, dtype=torch.float64) * data_range  # exact MSE
    # +-sqrt(mse) at every pixel: the MSE is exactly `mse`.
    signs = torch.randint(0, 2, target.shape) * 2 - 1
    pred = target + signs * math.sqrt(mse)
    expected = 10 * math.log10(data_range**2 / mse)
    torch.testing.assert_close(psnr(pred, target, data_range),
                               torch.full((3,), expected, dtype=torch.float64))


def test_psnr_is_per_image():
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[1] += 0.1  # only the second image is wrong
    out = psnr(pred, target)
    assert out.shape == (2,) and torch.isinf(out[0]) and out[1].item() == pytest.approx(20.0)


@pytest.mark.parametrize("degrade", [
    lambda x: add_gaussian_noise(x, 25, torch.Generator().manual_seed(0)).clamp(0, 1),
    lambda x: jpeg_compress(x, 20),
    lambda x: x * 0.8 + 0.1,
])
def test_ssim_matches_skimage(photos, degrade):
    pred = degrade(photos)
    ours = ssim(pred, photos)
    ref = [structural_similarity(p.numpy().astype(np.float64), t.numpy().astype(np.float64),
                                 channel_axis=0, data_range=1.0, gaussian_weights=True,
                                 sigma=1.5, use_sample_covariance=False)
           for p, t in zip(pred, photos)]
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (ours < 1).all()


def test_ssim_drops_with_noise(photos):
    g = torch.Generator().manual_seed(0)
    scores = [ssim(add_gaussian_noise(photos, s, g), photos).mean().item() for s in (5, 25, 50)]
    assert scores[0] > scores[1] > scores[2]


def bt601_y(img: torch.Tensor) -> torch.Tensor:
    """MATLAB's rgb2ycbcr luma for RGB in [0, 1], in [0, 1] (BasicSR's bgr2ycbcr y_only)."""
    r, g, b = img.double().unbind(1)
    return ((16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255).unsqueeze(1)


def test_y_channel_is_bt601_luma():
    black, white = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    assert torch.allclose(rgb_to_y(black), torch.full((1, 1, 2, 2), 16 / 255, dtype=torch.float64))
    assert torch.allclose(rgb_to_y(white), torch.full((1, 1, 2, 2), 235 / 255, dtype=torch.float64))
    img = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(rgb_to_y(img), bt601_y(img))


def test_y_channel_and_crop_border_metrics_match_skimage_on_the_cropped_luma(photos):
    pred = add_gaussian_noise(photos, 15, torch.Generator().manual_seed(0)).clamp(0, 1)
    b = 4
    y_pred, y_true = (bt601_y(t)[..., b:-b, b:-b] for t in (pred, photos))
    expected_psnr = [peak_signal_noise_ratio(t[0].numpy(), p[0].numpy(), data_range=1.0)
                     for p, t in zip(y_pred, y_true)]
    expected_ssim = [structural_similarity(t[0].numpy(), p[0].numpy(), data_range=1.0,
                                           gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False)
                     for p, t in zip(y_pred, y_true)]
    torch.testing.assert_close(psnr(pred, photos, y_channel=True, crop_border=b),
                               torch.tensor(expected_psnr, dtype=torch.float64))
    torch.testing.assert_close(ssim(pred, photos, y_channel=True, crop_border=b),
                               torch.tensor(expected_ssim, dtype=torch.float64))
    # Luma is smoother than colour noise: Y PSNR is higher than RGB PSNR.
    assert (psnr(pred, photos, y_channel=True) > psnr(pred, photos)).all()


def test_crop_border_leaves_the_border_out(photos):
    pred = photos.clone()
    pred[..., :3, :] = 0  # wrong only in the top 3 rows
    assert torch.isinf(psnr(pred, photos, crop_border=3)).all()
    assert torch.isfinite(psnr(pred, photos, crop_border=2)).all()


@pytest.mark.parametrize("call, exc, name", [
    (lambda x: psnr(x, x[:1]), ValueError, "pred"),
    (lambda x: psnr(x[0], x[0]), ValueError, "pred"),
    (lambda x: psnr(x, x.numpy()), TypeError, "target"),
    (lambda x: psnr(x, x, data_range=0), ValueError, "data_range"),
    (lambda x: ssim(x[..., :8, :8], x[..., :8, :8]), ValueError, "pred"),
    (lambda x: psnr(x, x, crop_border=32), ValueError, "crop_border"),
    (lambda x: psnr(x, x, crop_border=-1), ValueError, "crop_border"),
    (lambda x: rgb_to_y(x[:, :1]), ValueError, "img"),
    (lambda x: ssim((x * 255).byte(), x), TypeError, "pred"),
])
def test_bad_arguments_name_the_argument(photos, call, exc, name):
    with pytest.raises(exc, match=f"^{name}"):
        call(photos)
