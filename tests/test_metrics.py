import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from restorenet.data import add_gaussian_noise, heldout_images, jpeg_compress
from restorenet.metrics import gaussian_window, psnr, ssim


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


def test_gaussian_window_is_normalised_and_symmetric():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and g.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(g, g.flip(0))
    assert g.argmax().item() == 5


@pytest.mark.parametrize("call, exc, name", [
    (lambda x: psnr(x, x[:1]), ValueError, "pred"),
    (lambda x: psnr(x[0], x[0]), ValueError, "pred"),
    (lambda x: psnr(x, x.numpy()), TypeError, "target"),
    (lambda x: psnr(x, x, data_range=0), ValueError, "data_range"),
    (lambda x: ssim(x[..., :8, :8], x[..., :8, :8]), ValueError, "pred"),
    (lambda x: ssim(x, x, window_size=4), ValueError, "window_size"),
    (lambda x: ssim((x * 255).byte(), x), TypeError, "pred"),
])
def test_bad_arguments_name_the_argument(photos, call, exc, name):
    with pytest.raises(exc, match=f"^{name}"):
        call(photos)
