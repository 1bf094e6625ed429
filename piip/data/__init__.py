"""LightningDataModules per on-disk format and the embedded-data generator."""

from piip.data.coco import CocoDataModule
from piip.data.imagenet import DataError, ImageFolderDataModule

__all__ = ["CocoDataModule", "DataError", "ImageFolderDataModule"]
