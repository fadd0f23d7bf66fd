"""LightningDataModules yielding ``(images in [-1, 1], int labels)``."""

from .base import ImageDataModule, TensorImageDataset, to_numpy_uint8
from .butterflies import ButterfliesDataModule
from .imagenet64 import ImageNet64DataModule, open_split, prepare_imagenet64
from .images import ArrayImageDataset, decode_image, find_images, resize_center_crop
from .mnist import MNISTDataModule, load_mnist, read_idx

__all__ = [
    "ArrayImageDataset",
    "ButterfliesDataModule",
    "ImageDataModule",
    "ImageNet64DataModule",
    "MNISTDataModule",
    "TensorImageDataset",
    "decode_image",
    "find_images",
    "load_mnist",
    "open_split",
    "prepare_imagenet64",
    "read_idx",
    "resize_center_crop",
    "to_numpy_uint8",
]
