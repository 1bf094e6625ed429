"""LightningDataModules per on-disk format and the embedded-data generator."""

from piip.data.ade20k import Ade20kDataModule
from piip.data.coco import CocoDataModule
from piip.data.imagenet import DataError, ImageFolderDataModule

__all__ = ["Ade20kDataModule", "CocoDataModule", "DataError", "ImageFolderDataModule"]
