"""Per-example image decode and CLIP train / eval transforms for the input pipeline's worker processes.

Everything here is a top-level function or a frozen dataclass (picklable for grain workers) with no
global state; randomness comes from the `np.random.Generator` passed in (grain's `random_map` rng).

Shapes and units: images are PIL images in their stored mode (or uint8 `[H, W]` / `[H, W, 1|3|4]`
arrays) with sizes in pixels; crop parameters `(top, left, h, w)` are integer pixels of the image
they were drawn for; the transforms return uint8 `[S, S, 3]` RGB pixels in [0, 255]. open_clip's
`ToTensor` (/255) and `Normalize` are left to the device (`clipjax.preprocess.normalize` does them
bit-equal to torch).

Decoding (`decode_image`): JPEGs (recognised by their magic bytes `FF D8 FF`) in YCbCr, RGB or
greyscale are decoded by libjpeg-turbo through `simplejpeg` (accurate integer DCT, fancy
upsampling); CMYK/YCCK JPEGs, JPEGs simplejpeg refuses (unusual subsampling, recoverable damage that
its strict mode rejects) and every other format go through PIL. Measured with simplejpeg 1.9 and
pillow 12.3 (libjpeg-turbo 3.1.4): simplejpeg's full-size decode is bit-identical to PIL's on real
photos at 4:2:0, 4:2:2 and 4:4:4 subsampling, baseline, optimised and progressive, and for greyscale
(tests/test_data_transforms.py checks it); its CMYK->RGB differs from PIL's by 1, hence PIL there.
The result is a PIL image in the mode PIL itself would give ("RGB", "L", "CMYK", "P", "RGBA"...): the
transforms resize in that mode and convert to RGB afterwards, as open_clip does.

DCT-domain downscaling: libjpeg-turbo can decode at k/8 of the size (k = 1..8) for a fraction of the
cost. Only the power-of-two scales 1/2, 1/4, 1/8 are used: the others run the slow generic scaled IDCT
(measured on a 1024 px photo: 5/8, 6/8 and 7/8 take 1.4-2.2x the time of the full decode) and
simplejpeg's own `min_height`/`min_width` choice would pick them. The factor `f` is the largest of 8, 4,
2 with `ceil(side / f) >= minimum` on both sides (so only sources at least about twice the minimum are
downscaled); the decoded image is `ceil(H / f) x ceil(W / f)`.

Train transform: open_clip 3.3's non-timm train path, `RandomResizedCrop(S, scale, bicubic)` ->
`convert("RGB")` [-> `RandomGrayscale`], with the crop drawn by torchvision's algorithm from the numpy
Generator. `train_transform` takes a decoded image and equals open_clip bit for bit given the same crop
(and grey-scale draw). `decode_for_train` reads the JPEG header first, draws the crop in the ORIGINAL
image's coordinates (so the random stream does not depend on the decode scale), then decodes at the
largest factor f in {8, 4, 2} with `min(h, w) >= f * S`: the crop, mapped to the decoded image as the
fractional box `[left / f, (left + w) / f] x [top / f, (top + h) / f]`, still has at least S pixels
per side, so the final resize only ever shrinks. That output is close to, not equal to, the
full-decode output (bound measured in the tests); `dct=False` gives the exact one.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from clipjax.data.errors import BadExample
from clipjax.preprocess import resize_and_crop, to_pil

_JPEG_MAGIC = b"\xff\xd8\xff"
_SIMPLEJPEG_SPACES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}  # header colorspace -> decode colorspace
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
_DCT_FACTORS = (8, 4, 2)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, *, min_size: tuple[int, int] | None = None, name: str = "") -> Image.Image:
    """Decode image bytes to a PIL image in its stored mode (see the module docstring).

    Args:
      data: the file's bytes (bytes, bytearray or memoryview).
      min_size: `(min_h, min_w)`: a JPEG at least about twice that size is decoded DCT-downscaled by
        1/2, 1/4 or 1/8, never below the minimum on either side. None: full size.
      name: the example's key, quoted in errors.

    Raises:
      BadExample: `missing_image` for None/empty data; `corrupt_image` for anything that does not
        decode (truncated, garbage, unsupported format, zero-size, decompression bomb).
    """
    _require(data, name)
    header = _jpeg_header(data)
    if header is not None:
        factor = 1 if min_size is None else _factor_for_min_size(header[0], header[1], *min_size)
        decoded = _decode_jpeg(data, header, factor, name)
        if decoded is not None:
            return decoded[0]
    return _decode_pil(data, name)


def _require(data, name):
    if data is None or len(data) == 0:
        raise BadExample("missing_image", f"{name or '<unnamed>'}: no image bytes")


def _jpeg_header(data) -> tuple[int, int, str] | None:
    """`(height, width, decode colorspace)` of a JPEG simplejpeg decodes as PIL would; else None."""
    if bytes(data[:3]) != _JPEG_MAGIC:
        return None
    try:
        h, w, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # damaged or unusual: PIL decides, and reports what is wrong
        return None
    if space not in _SIMPLEJPEG_SPACES or h <= 0 or w <= 0:
        return None
    return h, w, _SIMPLEJPEG_SPACES[space]


def _check_pixels(h: int, w: int, name: str):
    limit = Image.MAX_IMAGE_PIXELS  # PIL's DecompressionBombError threshold is twice this
    if limit is not None and h * w > 2 * limit:
        raise BadExample("corrupt_image", f"{name or '<unnamed>'}: decompression bomb: {w}x{h} = {h * w} pixels "
                                          f"> 2 * PIL.Image.MAX_IMAGE_PIXELS ({limit})")


def _factor_for_min_size(h: int, w: int, min_h: int, min_w: int) -> int:
    for f in _DCT_FACTORS:
        if -(-h // f) >= min_h and -(-w // f) >= min_w:
            return f
    return 1


def _decode_jpeg(data, header, factor: int, name: str) -> tuple[Image.Image, int] | None:
    """(image, factor actually used) from simplejpeg, or None when strict libjpeg-turbo refuses the data."""
    h, w, space = header
    _check_pixels(h, w, name)
    want = (-(-h // factor), -(-w // factor))
    kwargs = {} if factor == 1 else {"min_height": want[0], "min_width": want[1]}
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace=space, **kwargs)
    except ValueError:  # truncated / corrupt, or only a libjpeg warning: PIL decides as open_clip's loader would
        return None
    if arr.shape[:2] != want:  # libjpeg chose another k/8 scale (tiny images): decode at full size
        return _decode_jpeg(data, header, 1, name) if factor != 1 else None
    return Image.fromarray(arr[..., 0] if space == "GRAY" else arr), factor


def _decode_pil(data, name: str) -> Image.Image:
    label = name or "<unnamed>"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError as e:
        raise BadExample("corrupt_image", f"{label}: not a readable image (PIL cannot identify the format "
                                          "or its header is damaged)") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error, ...
        raise BadExample("corrupt_image", f"{label}: {type(e).__name__}: {e}") from e
    if im.width == 0 or im.height == 0:
        raise BadExample("corrupt_image", f"{label}: zero-size image {im.size}")
    return im


# ----------------------------------------------------------------------------- train transform


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """open_clip 3.3 `AugmentationCfg` for its non-timm train path; what clipjax cannot do exactly it refuses.

    Attributes:
      scale: RandomResizedCrop area fraction range.
      ratio: aspect-ratio range (w / h), sampled log-uniformly. open_clip's non-timm path does not pass
        its `ratio` on (it warns "Unused augmentation cfg items") and always gets torchvision's default
        (3/4, 4/3), which is this default; another value here is honoured as torchvision would.
      interpolation: `bicubic` (open_clip's train path, whatever its `interpolation` argument) or
        `bilinear` (torchvision's `RandomResizedCrop` default).
      gray_scale_prob: probability of torchvision `Grayscale(3)` after the crop (None/0: off).
      color_jitter, color_jitter_prob: refused (torchvision ColorJitter is not implemented).
      re_prob, re_count, use_timm: refused (timm-only options).
    """

    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    gray_scale_prob: float | None = None
    color_jitter: object = None
    color_jitter_prob: float | None = None
    re_prob: float | None = None
    re_count: int | None = None
    use_timm: bool = False

    def __post_init__(self):
        for field in ("scale", "ratio"):
            lo, hi = (float(v) for v in getattr(self, field))
            if not 0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{field} must be (min, max) with 0 < min <= max, got {(lo, hi)}")
            object.__setattr__(self, field, (lo, hi))
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"AugmentConfig.interpolation must be one of {tuple(_RESAMPLE)}, "
                             f"got {self.interpolation!r}")
        if self.gray_scale_prob is not None and not 0 <= self.gray_scale_prob <= 1:
            raise ValueError(f"AugmentConfig.gray_scale_prob must be in [0, 1], got {self.gray_scale_prob}")
        if self.use_timm:
            raise ValueError("AugmentConfig.use_timm=True is not supported: clipjax implements open_clip's non-timm "
                             "train transform only (timm's create_transform is not reproduced)")
        if self.color_jitter is not None or self.color_jitter_prob:
            field = "color_jitter_prob" if self.color_jitter_prob else "color_jitter"
            raise ValueError(f"AugmentConfig.{field} is not supported: torchvision's ColorJitter is not implemented "
                             "exactly in clipjax, and it does not approximate it")
        for field in ("re_prob", "re_count"):
            if getattr(self, field):
                raise ValueError(f"AugmentConfig.{field} is not supported: random erasing is a timm-only option "
                                 "(open_clip's non-timm path ignores it)")

    @classmethod
    def from_open_clip(cls, cfg) -> "AugmentConfig":
        """From an open_clip `AugmentationCfg` or its dict (`ratio=None` means torchvision's default)."""
        d = dict(cfg) if isinstance(cfg, dict) else dataclasses.asdict(cfg)
        if d.get("ratio") is None:
            d.pop("ratio", None)
        if d.get("scale") is None:
            d.pop("scale", None)
        return cls(**d)


def random_resized_crop_params(rng: np.random.Generator, height: int, width: int,
                               scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision `RandomResizedCrop.get_params`, drawing from `rng`: `(top, left, h, w)` in pixels.

    Ten tries of an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`; the
    first that fits gets a uniform position. Otherwise the centre crop of the whole image clamped to
    the ratio range. Draws per try: `rng.uniform` (area), `rng.uniform` (log ratio), and on success
    `rng.integers` (top), `rng.integers` (left), in torchvision's order.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, params: tuple[int, int, int, int], image_size: int,
                 interpolation: str = "bicubic", factor: int = 1) -> Image.Image:
    """Crop `params = (top, left, h, w)` and resize to `image_size` square, in the image's own mode.

    `factor == 1`: torchvision's `F.resized_crop` on PIL (crop, then resize): exact. `factor > 1`:
    `image` is the DCT-downscaled decode (1/factor) and `params` are in original pixels: the crop is the
    fractional box `params / factor` (PIL resamples the box, clamped to the pixels it touches).
    """
    top, left, h, w = params
    resample = _RESAMPLE[interpolation]
    if factor == 1:
        return image.crop((left, top, left + w, top + h)).resize((image_size, image_size), resample)
    x0, y0, x1, y1 = left / factor, top / factor, (left + w) / factor, (top + h) / factor
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = min(math.ceil(x1), image.width), min(math.ceil(y1), image.height)
    region = image.crop((ix0, iy0, ix1, iy1))
    box = (x0 - ix0, y0 - iy0, min(x1, ix1) - ix0, min(y1, iy1) - iy0)
    return region.resize((image_size, image_size), resample, box=box)


def _finish_train(image: Image.Image, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    rgb = image.convert("RGB")  # open_clip's MaybeConvertMode
    if aug.gray_scale_prob and rng.random() < aug.gray_scale_prob:  # torchvision Grayscale(3): convert("L")
        grey = np.asarray(rgb.convert("L"), dtype=np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(rgb, dtype=np.uint8)


def train_transform(image, image_size: int, rng: np.random.Generator,
                    aug: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """open_clip's train transform up to `ToTensor`: uint8 `[image_size, image_size, 3]`.

    Args:
      image: a full-resolution PIL image (any mode) or uint8 `[H, W]` / `[H, W, 1|3|4]` array.
      image_size: output side S in pixels.
      rng: draws the crop (then the grey-scale coin when `aug.gray_scale_prob`).
      aug: augmentation settings.
    """
    image = to_pil(image)
    params = random_resized_crop_params(rng, image.height, image.width, aug.scale, aug.ratio)
    return _finish_train(resized_crop(image, params, image_size, aug.interpolation), rng, aug)


def decode_for_train(data: bytes, image_size: int, rng: np.random.Generator, aug: AugmentConfig = AugmentConfig(),
                     *, dct: bool = True, name: str = "") -> np.ndarray:
    """Decode + `train_transform`, with DCT downscaling chosen per crop (module docstring).

    The crop is drawn from the header's size before decoding, so for the same `rng` state the crop is
    the same with `dct` on or off; with `dct=False`, or for non-JPEG / CMYK inputs, the output equals
    `train_transform(decode_image(data), ...)` exactly.

    Raises:
      BadExample: as `decode_image`.
    """
    _require(data, name)
    header = _jpeg_header(data) if dct else None
    if header is None:
        return train_transform(decode_image(data, name=name), image_size, rng, aug)
    params = random_resized_crop_params(rng, header[0], header[1], aug.scale, aug.ratio)
    side = min(params[2], params[3])
    factor = next((f for f in _DCT_FACTORS if side >= f * image_size), 1)
    decoded = _decode_jpeg(data, header, factor, name)
    image, factor = decoded if decoded is not None else (_decode_pil(data, name), 1)
    if factor == 1 and image.size != (header[1], header[0]):  # PIL read another size than the header said
        raise BadExample("corrupt_image", f"{name or '<unnamed>'}: decoded size {image.size} differs from the "
                                          f"JPEG header's {(header[1], header[0])}")
    return _finish_train(resized_crop(image, params, image_size, aug.interpolation, factor), rng, aug)


# ----------------------------------------------------------------------------- eval transform


def eval_transform(image, image_size: int, resize_mode: str = "shortest", interpolation: str = "bicubic") -> np.ndarray:
    """open_clip's eval transform up to `ToTensor` (`clipjax.preprocess.resize_and_crop`): uint8 `[S, S, 3]`.

    Args:
      image: a PIL image (any mode) or uint8 `[H, W]` / `[H, W, 1|3|4]` array.
      image_size: output side S in pixels.
      resize_mode: `shortest` (resize the short side, centre crop) or `squash`.
      interpolation: `bicubic` or `bilinear`.
    """
    return resize_and_crop(to_pil(image), image_size, resize_mode, interpolation)


def decode_for_eval(data: bytes, image_size: int, resize_mode: str = "shortest", interpolation: str = "bicubic",
                    *, dct: bool = False, name: str = "") -> np.ndarray:
    """Decode + `eval_transform`. `dct=True` decodes JPEGs downscaled to no less than S on either side
    (an approximation, off by default: the resize then starts from a slightly different grid)."""
    image = decode_image(data, min_size=(image_size, image_size) if dct else None, name=name)
    return eval_transform(image, image_size, resize_mode, interpolation)
