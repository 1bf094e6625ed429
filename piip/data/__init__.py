"""LightningDataModules, one per on-disk format, and the embedded "shapes" data written in those formats."""

from piip.data.ade20k import Ade20kDataModule
from piip.data.coco import CocoDataModule
from piip.data.imagenet import ImageFolderDataModule

__all__ = ["Ade20kDataModule", "CocoDataModule", "ImageFolderDataModule"]
