"""Data for training and evaluation: degradations, real photos, your own folders, tasks.

    from restorenet.data import get_task, RandomCropSampler, heldout_images
    task = get_task("denoise")
    clean = RandomCropSampler(crop=64, seed=0).sample(8)
    noisy = task.degrade(clean, 25, torch.Generator().manual_seed(0))
"""
from restorenet.data.degradations import (
    add_gaussian_noise,
    bicubic_down_up,
    jpeg_compress,
    motion_blur,
    random_motion_blur,
    random_motion_kernel,
)
from restorenet.data.folders import (
    FolderCropSampler,
    PairedCropSampler,
    folder_images,
    match_pairs,
    paired_images,
)
from restorenet.data.images import IMAGE_EXTENSIONS, list_images, read_image, write_image
from restorenet.data.photos import (
    CropWindow,
    HELDOUT_PHOTOS,
    TRAIN_PHOTOS,
    RandomCropSampler,
    available_photos,
    center_crop,
    heldout_images,
    load_photo,
)
from restorenet.data.tasks import TASKS, Task, get_task

__all__ = [
    "add_gaussian_noise", "bicubic_down_up", "jpeg_compress", "motion_blur",
    "random_motion_blur", "random_motion_kernel",
    "HELDOUT_PHOTOS", "TRAIN_PHOTOS", "RandomCropSampler", "available_photos",
    "center_crop", "heldout_images", "load_photo",
    "TASKS", "Task", "get_task",
    "CropWindow", "FolderCropSampler", "PairedCropSampler", "folder_images", "match_pairs",
    "paired_images", "IMAGE_EXTENSIONS", "list_images", "read_image", "write_image",
]
