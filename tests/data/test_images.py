import numpy as np
import pytest
import torch

from restorenet.data import heldout_images, list_images, read_image, write_image
from restorenet.data.images import image_size


@pytest.mark.parametrize("suffix, bits, exact", [(".png", 8, True), (".png", 16, True),
                                                 (".tif", 16, True), (".jpg", 8, False)])
def test_write_then_read_keeps_size_bit_depth_and_values(tmp_path, suffix, bits, exact):
    img = heldout_images(32)[0, :, :13, :21]  # a photo: JPEG keeps it close
    path = tmp_path / f"img{suffix}"
    write_image(path, img, bits)
    back, read_bits = read_image(path)
    assert read_bits == bits and back.shape == (3, 13, 21) and back.dtype == torch.float32
    scale = 2**bits - 1
    if exact:  # lossless: exactly the image rounded to the bit depth
        assert torch.equal(back, (img * scale).round() / scale)
    else:
        assert (back - img).abs().mean() < 0.02


def test_grayscale_and_alpha_become_rgb(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((4, 5), 200, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((4, 5, 4), 100, np.uint8)).save(tmp_path / "rgba.png")
    gray, _ = read_image(tmp_path / "gray.png")
    rgba, _ = read_image(tmp_path / "rgba.png")
    assert gray.shape == rgba.shape == (3, 4, 5)
    assert torch.all(gray == 200 / 255) and torch.all(rgba == 100 / 255)
    assert image_size(tmp_path / "gray.png") == (4, 5)


def test_unreadable_files_and_bad_folders_are_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for call in (lambda: read_image(bad), lambda: image_size(bad)):
        with pytest.raises(ValueError, match="broken.png: cannot read"):
            call()
    with pytest.raises(ValueError, match="^data: .* is not a folder"):
        list_images(tmp_path / "nope", "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="^val: .* holds no image files"):
        list_images(tmp_path / "empty", "val")
    with pytest.raises(ValueError, match="8-bit"):
        write_image(tmp_path / "x.jpg", torch.rand(3, 4, 4), 16)
