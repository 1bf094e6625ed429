"""Dense prediction over images of any size: sliding-window ("slide") and whole-image ("whole") inference.

`slide` is mmseg's `slide_inference`: crop-sized windows every `stride` pixels, the last window of a row or
column shifted back inside the image, logits averaged where windows overlap. Images smaller than the crop
are padded (bottom/right, with 0 = the mean colour after normalisation) and the padding is cut off again.
`predict` is any function from a (B, 3, h, w) batch to logits (B, C, h', w') at any stride.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from piip.models.heads.upernet import resize

Predict = Callable[[torch.Tensor], torch.Tensor]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one axis: every `stride`, the last one moved back so it ends at `length`."""
    if length <= crop:
        return [0]
    count = (length - crop + stride - 1) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each window; windows never leave the image (smaller images: one)."""
    if not 0 < stride <= crop:
        raise ValueError(f"slide stride must be in (0, crop={crop}], got {stride}: windows would skip pixels")
    return [
        (top, min(top + crop, height), left, min(left + crop, width))
        for top in window_starts(height, crop, stride)
        for left in window_starts(width, crop, stride)
    ]


def _padded_logits(predict: Predict, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at the images' own size, predicting on a zero-padded canvas of at least `size`."""
    height, width = images.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    logits = resize(predict(padded).float(), padded.shape[-2:])
    return logits[..., :height, :width]


def slide_inference(predict: Predict, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Average of the window logits, (B, C, H, W) at the input size; all windows run as one batch."""
    height, width = images.shape[-2:]
    windows = sliding_windows(height, width, crop, stride)
    crops = torch.cat([images[..., t:b, x0:x1] for t, b, x0, x1 in windows])
    logits = _padded_logits(predict, crops, (crop, crop)).unflatten(0, (len(windows), len(images)))
    total = logits.new_zeros(len(images), logits.shape[2], height, width)
    count = logits.new_zeros(1, 1, height, width)
    for (t, b, x0, x1), window in zip(windows, logits, strict=True):
        total[..., t:b, x0:x1] += window
        count[..., t:b, x0:x1] += 1
    return total / count


def whole_inference(predict: Predict, images: torch.Tensor, size_divisor: int = 32) -> torch.Tensor:
    """One pass over the whole image, padded up to a multiple of `size_divisor`; logits at the input size."""
    height, width = images.shape[-2:]
    size = (-(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor)
    return _padded_logits(predict, images, size)
