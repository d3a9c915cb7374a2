import pytest
import torch

from restorenet.data import (
    HELDOUT_PHOTOS,
    TRAIN_PHOTOS,
    RandomCropSampler,
    center_crop,
    heldout_images,
    load_photo,
)


def test_split_is_disjoint_and_uses_distinct_pictures():
    assert set(TRAIN_PHOTOS).isdisjoint(HELDOUT_PHOTOS)
    assert len(HELDOUT_PHOTOS) >= 2 and len(TRAIN_PHOTOS) >= 2
    # No held-out picture hides in the training set under another name
    # (skimage's "cat" is "chelsea"): compare the pixels of equal-size photos.
    for a in TRAIN_PHOTOS:
        for b in HELDOUT_PHOTOS:
            pa, pb = load_photo(a), load_photo(b)
            assert pa.shape != pb.shape or not torch.equal(pa, pb)


@pytest.mark.parametrize("name", TRAIN_PHOTOS + HELDOUT_PHOTOS)
def test_photos_are_rgb_float_in_unit_range(name):
    img = load_photo(name)
    assert img.dtype == torch.float32 and img.dim() == 3 and img.shape[0] == 3
    assert img.min() >= 0 and img.max() <= 1
    assert min(img.shape[1:]) >= 256
    # A real colour photo: the channels differ.
    assert (img[0] - img[1]).abs().mean() > 0.01


def test_gray_photo_is_stacked_to_rgb():
    img = load_photo("camera")
    assert img.shape[0] == 3 and torch.equal(img[0], img[2])


def test_load_photo_returns_a_copy():
    load_photo("astronaut").zero_()
    assert load_photo("astronaut").max() > 0


def test_unknown_photo_names_the_argument():
    with pytest.raises(ValueError, match="^name"):
        load_photo("lena")


def test_crops_have_shape_range_and_come_from_training_photos():
    sampler = RandomCropSampler(crop=32, seed=0)
    batch = sampler.sample(6)
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    # Every crop is (a flip of) a window of some training photo: find the
    # positions whose pixel equals the window's corner, then compare windows.
    photos = [load_photo(n) for n in TRAIN_PHOTOS]

    def is_window_of(p, photo):
        ys, xs = (photo == p[:, :1, :1]).all(0).nonzero(as_tuple=True)
        return any(torch.equal(photo[:, y:y + 32, x:x + 32], p) for y, x in zip(ys, xs))

    for patch in batch:
        variants = [patch, patch.flip(-1), patch.flip(-2), patch.flip(-1, -2)]
        assert any(is_window_of(p, photo) for p in variants for photo in photos)


def test_sampler_is_deterministic_per_seed_and_varies():
    a = RandomCropSampler(crop=24, seed=3).sample(4)
    b = RandomCropSampler(crop=24, seed=3).sample(4)
    c = RandomCropSampler(crop=24, seed=4).sample(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_sampler_flips_some_crops():
    # With flips on, crops of a perfectly left-right asymmetric ramp show both
    # orientations: check on the sampler's own photo list.
    sampler = RandomCropSampler(crop=16, seed=0)
    ramp = torch.linspace(0, 1, 64).expand(3, 64, 64).contiguous()
    sampler.photos = [ramp]
    patches = sampler.sample(32)
    increasing = (patches[:, 0, 0, -1] > patches[:, 0, 0, 0])
    assert 0 < increasing.sum() < 32


def test_heldout_images_are_fixed_center_crops():
    imgs = heldout_images(96)
    assert imgs.shape == (len(HELDOUT_PHOTOS), 3, 96, 96)
    assert torch.equal(imgs, heldout_images(96))
    full = load_photo(HELDOUT_PHOTOS[0])
    h, w = full.shape[1:]
    assert torch.equal(imgs[0], full[:, (h - 96) // 2:(h - 96) // 2 + 96, (w - 96) // 2:(w - 96) // 2 + 96])


@pytest.mark.parametrize("call, name", [
    (lambda: RandomCropSampler(crop=0), "crop"),
    (lambda: RandomCropSampler(crop=5000), "crop"),
    (lambda: RandomCropSampler(crop=16).sample(0), "batch"),
    (lambda: center_crop(torch.zeros(3, 8, 8), 9), "size"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()
