"""CLIP's eval image transform in numpy + PIL, matching open_clip's `image_transform(is_train=False)`.

open_clip's eval pipeline is torchvision `Resize` -> `CenterCrop` ->
`convert("RGB")` -> `ToTensor` (/255) -> `Normalize(mean, std)`. On PIL images
torchvision's resize and crop are plain PIL calls, so this module makes the same
PIL calls in the same order (resize and crop in the image's own mode, RGB
conversion afterwards: PIL resizes RGBA with premultiplied alpha and palette
images with nearest-neighbour, exactly as open_clip then sees them) and does the
scaling and normalisation in float32 numpy with the same operation order as
torch. The result equals open_clip's tensor bit for bit, laid out NHWC.

Resize modes (`PreprocessConfig.resize_mode`):
  * `shortest`: scale the shorter side to `image_size` (the longer side becomes
    `int(image_size * long / short)`, torchvision's rounding), then centre-crop
    `image_size` x `image_size` with torchvision's offsets
    `int(round((side - image_size) / 2))`.
  * `squash`: resize both sides to `image_size`, no crop (SigLIP).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from clipjax.config import PreprocessConfig

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def load_image(path) -> Image.Image:
    """Open an image file fully into memory, in its stored mode (no EXIF rotation, as open_clip)."""
    with Image.open(path) as im:
        im.load()
        return im


def to_pil(image, index: int = 0) -> Image.Image:
    """A PIL image, or a uint8 `[H, W]`, `[H, W, 1]`, `[H, W, 3]` or `[H, W, 4]` array, as a PIL image.

    Args:
      image: the image.
      index: its position in the batch, used in error messages.

    Raises:
      TypeError: not a PIL image or array, or an array that is not uint8.
      ValueError: an array of another shape, or an empty image.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"images[{index}] is empty: size {image.size}")
        return image
    if not hasattr(image, "__array__"):
        raise TypeError(f"images[{index}] must be a PIL image or a uint8 HWC array, got {type(image).__name__}")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"images[{index}] has dtype {arr.dtype}; expected uint8 pixels in [0, 255] "
                        "(for floats in [0, 1] pass (x * 255).round().astype(np.uint8))")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in _ARRAY_MODES):
        raise ValueError(f"images[{index}] has shape {arr.shape}; expected [H, W] (grey), [H, W, 1], "
                         "[H, W, 3] (RGB) or [H, W, 4] (RGBA)")
    if arr.size == 0:
        raise ValueError(f"images[{index}] is empty: shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))  # 2-D: "L", 3 channels: "RGB", 4: "RGBA"


def resize_and_crop(image: Image.Image, image_size: int, resize_mode: str = "shortest",
                    interpolation: str = "bicubic") -> np.ndarray:
    """One image through torchvision's `Resize` (+ `CenterCrop`) and `convert("RGB")`.

    Args:
      image: a PIL image in any mode.
      image_size: output side in pixels.
      resize_mode: `shortest` or `squash` (see the module docstring).
      interpolation: `bicubic` or `bilinear` (PIL filters, always antialiased).

    Returns:
      `[image_size, image_size, 3]` uint8.
    """
    w, h = image.size
    resample = _RESAMPLE[interpolation]
    if resize_mode == "squash":
        if (w, h) != (image_size, image_size):
            image = image.resize((image_size, image_size), resample)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(image_size * long / short)
        new_w, new_h = (image_size, new_long) if w <= h else (new_long, image_size)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample)
        top = int(round((new_h - image_size) / 2.0))
        left = int(round((new_w - image_size) / 2.0))
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def normalize(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`[..., 3]` uint8 to float32 `(x / 255 - mean) / std`, in torch's op order (bit-equal)."""
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def standardize(pixels01, config: PreprocessConfig):
    """Pixels already in [0, 1] `[..., 3]` -> `(x - mean) / std` with `config`'s mean and std.

    numpy or jax input (a jax array stays one, and the function is traceable): the step after which
    the attacks of `clipjax.robust` and the train step's uint8 path hand images to the model.
    """
    return (pixels01 - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)


def preprocess(images, config: PreprocessConfig | None = None, image_size: int = 224,
               num_workers: int = 0) -> np.ndarray:
    """CLIP eval transform of a batch of images.

    Args:
      images: a list of PIL images (any mode: greyscale, RGBA, palette... are
        converted to RGB as open_clip does) and/or uint8 arrays `[H, W]`,
        `[H, W, 1|3|4]`; or one uint8 array `[B, H, W, C]`; or one PIL image.
      config: mean, std, resize mode and interpolation (default: OpenAI CLIP's).
      image_size: output side in pixels.
      num_workers: threads for decoding-free PIL work (0: in the caller's thread).

    Returns:
      `[B, image_size, image_size, 3]` float32, NHWC.

    Raises:
      TypeError: wrong container, item type or dtype.
      ValueError: wrong shapes, empty batch or image, bad `image_size`.
    """
    config = PreprocessConfig() if config is None else config
    if not isinstance(config, PreprocessConfig):
        raise TypeError(f"config must be a clipjax.config.PreprocessConfig, got {type(config).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    items = _as_image_list(images)
    pil = [to_pil(im, i) for i, im in enumerate(items)]

    def one(im):
        return resize_and_crop(im, int(image_size), config.resize_mode, config.interpolation)

    if num_workers and len(pil) > 1:
        with ThreadPoolExecutor(num_workers) as pool:
            crops = list(pool.map(one, pil))
    else:
        crops = [one(im) for im in pil]
    return normalize(np.stack(crops), config.mean, config.std)


def iter_preprocessed(images: Iterable, batch_size: int, config: PreprocessConfig | None = None,
                      image_size: int = 224, num_workers: int = 0) -> Iterator[np.ndarray]:
    """Yield `[b, image_size, image_size, 3]` float32 batches (the last may be short).

    Args:
      images: an iterable of PIL images, uint8 arrays or image file paths.
      batch_size: images per batch.
      config, image_size, num_workers: as in `preprocess`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch = []
    for item in images:
        batch.append(load_image(item) if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__") else item)
        if len(batch) == batch_size:
            yield preprocess(batch, config, image_size, num_workers)
            batch = []
    if batch:
        yield preprocess(batch, config, image_size, num_workers)


def _as_image_list(images) -> list:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an array of images must be [B, H, W, C], got shape {images.shape}; "
                             "wrap a single image in a list")
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        raise TypeError(f"images must be a list of PIL images / uint8 arrays or a [B, H, W, C] uint8 array, "
                        f"got {type(images).__name__}")
    if not items:
        raise ValueError("images is empty; expected at least one image")
    return items
