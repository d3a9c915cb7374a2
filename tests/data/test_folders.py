import pytest
import torch

from restorenet.data import (CropWindow, FolderCropSampler, PairedCropSampler, folder_images,
                             match_pairs, paired_images, write_image)


def make_folder(path, sizes, offset=0.0, suffix=".png"):
    path.mkdir()
    g = torch.Generator().manual_seed(len(sizes))
    for i, (h, w) in enumerate(sizes):
        write_image(path / f"{i:02d}{suffix}", (torch.rand(3, h, w, generator=g) + offset).clamp(0, 1))
    return path


def test_folder_crops_are_windows_of_the_images_and_reproducible(tmp_path):
    folder = make_folder(tmp_path / "clean", [(20, 30), (24, 18)])
    a = FolderCropSampler(folder, crop=16, seed=3)
    crops = a.sample(5)
    assert crops.shape == (5, 3, 16, 16)
    assert torch.equal(crops, FolderCropSampler(folder, crop=16, seed=3).sample(5))
    # The draws are CropWindow's: replay them on the decoded images.
    images = [img[0] for _, img in folder_images(folder)]
    g = torch.Generator().manual_seed(3)
    for crop in crops:
        window = CropWindow.draw(g, [im.shape[-2:] for im in images], 16)
        assert torch.equal(crop, window.cut(images[window.index]))


def test_paired_crops_cut_the_same_window_of_both(tmp_path):
    gt = make_folder(tmp_path / "gt", [(20, 30), (24, 18)])
    lq = make_folder(tmp_path / "lq", [(20, 30), (24, 18)], suffix=".jpg")  # other extension
    lq_crops, gt_crops = PairedCropSampler(lq, gt, crop=12, seed=0).sample(6)
    assert lq_crops.shape == gt_crops.shape == (6, 3, 12, 12)
    # Same generator seed as the gt-only folder: the gt crops are the folder's crops.
    assert torch.equal(gt_crops, FolderCropSampler(gt, crop=12, seed=0).sample(6))
    names = [name for name, _, _ in paired_images(lq, gt)]
    assert names == ["00.png", "01.png"]


def test_pairs_are_matched_by_name_and_mismatches_are_named(tmp_path):
    gt = make_folder(tmp_path / "gt", [(20, 20), (20, 20)])
    lq = make_folder(tmp_path / "lq", [(20, 20)])
    with pytest.raises(ValueError, match=r"gt/01\.png: no image named 01\.\* in .*lq"):
        match_pairs(lq, gt)
    write_image(lq / "01.png", torch.rand(3, 20, 22))
    with pytest.raises(ValueError, match=r"lq/01\.png: size 20x22 differs from its pair .*gt/01\.png"):
        PairedCropSampler(lq, gt, crop=8)


def test_unreadable_or_too_small_images_are_named(tmp_path):
    folder = make_folder(tmp_path / "clean", [(20, 20), (8, 40)])
    with pytest.raises(ValueError, match=r"01\.png: 8x40 is smaller than the training crop 16"):
        FolderCropSampler(folder, crop=16)
    (folder / "01.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"01\.png: cannot read"):
        FolderCropSampler(folder, crop=4)
