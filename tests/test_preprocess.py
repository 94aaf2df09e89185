"""clipjax.preprocess against open_clip's eval transforms on the real photos scikit-image ships.

Tolerance: exact (`assert_array_equal`, 0 ulp). Both sides make the same PIL
resize/crop calls in the same mode and order, and then compute
`(x / 255 - mean) / std` in float32 with the same operation order; IEEE float32
division and subtraction are correctly rounded in numpy and torch alike, so
there is nothing to tolerate. clipjax returns NHWC, open_clip CHW: the
reference is transposed before comparing.
"""

import glob
import os

import numpy as np
import pytest
from PIL import Image

from clipjax.config import HALF, PreprocessConfig
from clipjax.preprocess import iter_preprocessed, load_image, preprocess

pytestmark = pytest.mark.parity

# Every real photo skimage ships without a download: colour, then greyscale.
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "motorcycle_left", "motorcycle_right")
GREY = ("camera", "moon", "coins", "page", "text", "clock", "brick", "grass", "gravel")
SIGLIP = PreprocessConfig(mean=HALF, std=HALF, resize_mode="squash", interpolation="bicubic")


def _skimage_photo(name):
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


@pytest.fixture(scope="module")
def photos():
    return {n: _skimage_photo(n) for n in COLOUR + GREY}


def _open_clip(size, config=PreprocessConfig()):
    import open_clip

    return open_clip.image_transform(size, is_train=False, mean=config.mean, std=config.std,
                                     resize_mode=config.resize_mode, interpolation=config.interpolation)


def _reference(transform, images):
    return np.stack([transform(im).permute(1, 2, 0).numpy() for im in images])


@pytest.mark.parametrize("size", [224, 336])
def test_photos_equal_open_clip_shortest(photos, size):
    names = list(photos)
    pil = [Image.fromarray(photos[n]) for n in names]
    want = _reference(_open_clip(size), pil)
    got = preprocess(pil, PreprocessConfig(), size)
    assert got.shape == (len(names), size, size, 3) and got.dtype == np.float32
    for n, g, w in zip(names, got, want):
        np.testing.assert_array_equal(g, w, err_msg=n)
    # uint8 arrays go through the same path ([H, W] grey, [H, W, 3] colour).
    np.testing.assert_array_equal(preprocess([photos[n] for n in names], PreprocessConfig(), size), want)


@pytest.mark.parametrize("size", [224, 384])
def test_photos_equal_open_clip_siglip_squash(photos, size):
    """`squash` against the transform open_clip builds from ViT-B-16-SigLIP's pretrained config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    import open_clip

    cfg = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")
    ref_cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(size=size), cfg))
    assert (ref_cfg.resize_mode, ref_cfg.mean, ref_cfg.std) == ("squash", HALF, HALF)
    transform = image_transform_v2(ref_cfg, is_train=False)
    pil = [Image.fromarray(photos[n]) for n in ("chelsea", "coffee", "page", "camera", "hubble_deep_field")]
    np.testing.assert_array_equal(preprocess(pil, SIGLIP, size), _reference(transform, pil))


def test_bilinear_and_other_mean_std(photos):
    config = PreprocessConfig(mean=(0.1, 0.2, 0.3), std=(0.9, 0.5, 0.25), interpolation="bilinear")
    pil = [Image.fromarray(photos[n]) for n in ("rocket", "coins", "text")]
    np.testing.assert_array_equal(preprocess(pil, config, 160), _reference(_open_clip(160, config), pil))


def _skimage_files():
    import skimage.data

    root = os.path.dirname(skimage.data.__file__)
    files = []
    for path in sorted(glob.glob(os.path.join(root, "*.*"))):
        try:
            load_image(path)
        except Exception:  # not an image (.py, .npy, .xml) or a format PIL cannot read
            continue
        files.append(path)
    return files


def test_stored_files_in_their_own_modes():
    """Files as stored: RGBA (logo, horse), palette GIF, greyscale, tiny TIFF, up- and down-scaling."""
    files = _skimage_files()
    images = [load_image(f) for f in files]
    modes = {im.mode for im in images}
    assert {"RGB", "RGBA", "L", "P"} <= modes, modes
    assert min(min(im.size) for im in images) < 224 < max(max(im.size) for im in images)
    for config in (PreprocessConfig(), SIGLIP):
        want = _reference(_open_clip(224, config), images)
        got = preprocess(images, config, 224)
        for f, g, w in zip(files, got, want):
            np.testing.assert_array_equal(g, w, err_msg=os.path.basename(f))


def test_rgba_and_grey_arrays(photos):
    rng = np.random.default_rng(0)
    rgb = photos["chelsea"]
    rgba = np.concatenate([rgb, rng.integers(0, 256, rgb.shape[:2] + (1,), dtype=np.uint8)], axis=-1)
    grey = photos["coins"]
    items = [rgba, grey, grey[..., None], Image.fromarray(grey).convert("LA"), Image.fromarray(rgb).convert("P")]
    want = _reference(_open_clip(224), [im if isinstance(im, Image.Image) else Image.fromarray(
        im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im) for im in items])
    np.testing.assert_array_equal(preprocess(items, PreprocessConfig(), 224), want)
    # Premultiplied-alpha resizing makes RGBA differ from its RGB part: that path was really taken.
    assert not np.array_equal(want[0], _reference(_open_clip(224), [Image.fromarray(rgb)])[0])


def test_batch_forms_and_threads_agree(photos):
    crops = [photos[n][:200, :300] for n in ("astronaut", "coffee", "rocket")]
    stacked = np.stack(crops)
    one_by_one = np.concatenate([preprocess([c]) for c in crops])
    np.testing.assert_array_equal(preprocess(stacked), one_by_one)
    np.testing.assert_array_equal(preprocess(list(stacked), num_workers=2), one_by_one)
    np.testing.assert_array_equal(preprocess(Image.fromarray(crops[0])), one_by_one[:1])


def test_iter_preprocessed_paths_and_batches():
    files = _skimage_files()[:5]
    batches = list(iter_preprocessed(files, batch_size=2, image_size=64))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), preprocess([load_image(f) for f in files], None, 64))


@pytest.mark.parametrize("images, kind, match", [
    ([np.zeros((8, 8, 3), np.float32)], TypeError, "dtype float32; expected uint8"),
    ([np.zeros((8, 8, 3), bool)], TypeError, "expected uint8"),
    ([np.zeros((2, 8, 8, 3), np.uint8)], ValueError, r"shape \(2, 8, 8, 3\); expected \[H, W\]"),
    ([np.zeros((8, 8, 2), np.uint8)], ValueError, "expected"),
    ([np.zeros((0, 8, 3), np.uint8)], ValueError, "empty"),
    ([np.zeros((8,), np.uint8)], ValueError, "expected"),
    (np.zeros((8, 8, 3), np.uint8), ValueError, r"\[B, H, W, C\]"),
    ([], ValueError, "empty"),
    (None, TypeError, "images must be"),
    (["not an image"], TypeError, "PIL image"),
    ([Image.new("RGB", (0, 5))], ValueError, "empty"),
])
def test_bad_images(images, kind, match):
    with pytest.raises(kind, match=match):
        preprocess(images)


def test_bad_arguments():
    img = [np.zeros((8, 8, 3), np.uint8)]
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        preprocess(img, None, 0)
    with pytest.raises(TypeError, match="PreprocessConfig"):
        preprocess(img, {"mean": HALF}, 224)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_preprocessed(img, 0))
