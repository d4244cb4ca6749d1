"""LightningDataModules: cluttered digits (the embedded default), ImageNet-style folders, synthetic tensors.

Every DataModule has ``num_classes``, ``img_size`` and ``in_chans`` (for sizing the model) and ``class_names``.
Batches are ``(images, labels)``, or ``(images, labels, patch_mask)`` where the digit's patches are known.
"""

from dynvit.data.digits import DIGITS_MEAN, DIGITS_STD, ClutteredDigitsDataModule
from dynvit.data.imagefolder import ImageFolderDataModule, write_image_folder
from dynvit.data.synthetic import SyntheticDataModule

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "ClutteredDigitsDataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "write_image_folder",
]
