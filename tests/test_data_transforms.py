"""clipjax.data.transforms: decode, open_clip train / eval transforms, DCT-downscaled decode, bad input.

Real photos only: the four colour photos scikit-image ships and scikit-learn's two sample images,
re-encoded in memory as JPEG (quality 90) and PNG. Tolerances:
  * simplejpeg vs PIL full-size decode, train and eval transforms vs open_clip: exact (0 ulp after
    the same float32 normalisation; both sides make the same PIL calls on the same pixels).
  * DCT-downscaled train decode vs the full decode (same crop), uint8 levels, measured in exactly
    the configurations of `test_dct_train_decode_close_to_full_decode` (57 downscaled crops):
    mean |diff| per image 0.34-2.22 (0.84 averaged), max |diff| 39 (47 seen with more seeds), at
    sharp edges: the 1/f DCT acts as a box prefilter before the bicubic resize (blurred by a 1.5 px
    Gaussian the two differ by 0.27 on average, and no sub-pixel shift aligns them better).
    Asserted: 3.0 per image, 1.2 averaged, 64 max.
  * DCT eval decode (off by default) vs exact: mean |diff| 0.6-2.5, max <= 48; asserted <= 3 / 64.
"""

import io
import pickle
import struct
import types
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from clipjax.config import PreprocessConfig
from clipjax.data import transforms as T
from clipjax.data.errors import BadExample
from clipjax.preprocess import normalize

MEAN, STD = PreprocessConfig().mean, PreprocessConfig().std


def _encode(arr, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90, **kw} if fmt == "JPEG" else kw))
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {n: getattr(skimage.data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")}
    out.update(zip(("china", "flower"), load_sample_images().images))
    return out


@pytest.fixture(scope="module")
def jpegs(photos):
    return {n: _encode(a) for n, a in photos.items()}


class _Spy:
    """Stands in for the simplejpeg module inside clipjax.data.transforms and records decoded shapes."""

    def __init__(self):
        self.shapes = []
        self.decode_jpeg_header = simplejpeg.decode_jpeg_header

    def decode_jpeg(self, data, **kw):
        out = simplejpeg.decode_jpeg(data, **kw)
        self.shapes.append(out.shape[:2])
        return out


# ----------------------------------------------------------------------------- decoding


def test_simplejpeg_full_decode_is_bit_identical_to_pil(photos, monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(T, "simplejpeg", spy)
    variants = [{}, {"subsampling": 0}, {"subsampling": 1}, {"progressive": True}, {"optimize": True, "quality": 75}]
    for n, arr in photos.items():
        for kw in variants:
            data = _encode(arr, **kw)
            ref = Image.open(io.BytesIO(data))
            got = T.decode_image(data)
            assert got.mode == ref.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=f"{n} {kw}")
    assert len(spy.shapes) == len(photos) * len(variants)  # every one went through simplejpeg
    grey = _encode(np.asarray(Image.fromarray(photos["chelsea"]).convert("L")))
    got = T.decode_image(grey)
    assert got.mode == "L" and len(spy.shapes) == len(photos) * len(variants) + 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(io.BytesIO(grey))))
    # CMYK: simplejpeg's CMYK->RGB is off by one from PIL's, so PIL decodes it (mode kept as open_clip sees it)
    cmyk = io.BytesIO()
    Image.fromarray(photos["coffee"]).convert("CMYK").save(cmyk, "JPEG", quality=90)
    got = T.decode_image(cmyk.getvalue())
    assert got.mode == "CMYK" and len(spy.shapes) == len(photos) * len(variants) + 1
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(cmyk)))


def test_png_goes_through_pil_in_its_mode(photos):
    rgba = np.concatenate([photos["rocket"], np.full(photos["rocket"].shape[:2] + (1,), 200, np.uint8)], -1)
    got = T.decode_image(_encode(rgba, "PNG"))
    assert got.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(got), rgba)


def test_dct_decode_sizes_are_powers_of_two(jpegs):
    data = jpegs["rocket"]  # 427 x 640
    for min_size, shape in [((50, 50), (54, 80)), ((100, 100), (107, 160)), ((200, 200), (214, 320)),
                            ((214, 10), (214, 320)), ((10, 320), (214, 320)), ((215, 10), (427, 640)),
                            ((300, 300), (427, 640)), ((427, 640), (427, 640)), ((1000, 1000), (427, 640))]:
        assert np.asarray(T.decode_image(data, min_size=min_size)).shape[:2] == shape, min_size
    # simplejpeg alone picks a 6/8 scale there, which decodes slower than full size: not used
    assert simplejpeg.decode_jpeg(data, min_height=300, min_width=300).shape[:2] == (321, 480)
    # a downscaled decode is simplejpeg's own 1/4 decode
    np.testing.assert_array_equal(np.asarray(T.decode_image(data, min_size=(100, 100))),
                                  simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=107, min_width=160))


# ----------------------------------------------------------------------------- open_clip parity


@pytest.mark.parity
def test_random_resized_crop_params_replayed_through_torchvision(monkeypatch):
    """Our draws (values and the ranges they were drawn from) are replayed through torchvision's own
    `get_params`, whose torch RNG calls are replaced: it must ask for the same ranges in the same order
    and return the same crop. A wrong ratio sampling (linear instead of log, or no exp), a wrong scale
    range, other integer ranges, another number of tries or a different fallback all fail here."""
    import torch
    import torchvision.transforms.transforms as tvt

    class Recorder:
        def __init__(self, seed):
            self.g, self.log = np.random.default_rng(seed), []

        def uniform(self, lo, hi):
            v = float(self.g.uniform(lo, hi))
            self.log.append(("uniform", lo, hi, v))
            return v

        def integers(self, lo, hi):
            v = int(self.g.integers(lo, hi))
            self.log.append(("integers", lo, hi, v))
            return v

    class TorchReplay:
        def __init__(self, log):
            self.records = list(log)  # (not `log`: torch.log must still resolve to torch)

        def __getattr__(self, name):
            return getattr(torch, name)

        def empty(self, *size):
            replay = self

            class Uniform:
                def uniform_(self, a, b):
                    kind, lo, hi, v = replay.records.pop(0)
                    assert kind == "uniform" and np.allclose([float(a), float(b)], [lo, hi], rtol=1e-6, atol=1e-7)
                    return torch.tensor([v], dtype=torch.float64)

            return Uniform()

        def randint(self, low, high, size):
            kind, lo, hi, v = self.records.pop(0)
            assert kind == "integers" and (low, high) == (lo, hi)
            return torch.tensor([v])

    outcomes = {"first try": 0, "after rejections": 0, "fallback": 0}
    cases = [(512, 512, (0.9, 1.0), (3 / 4, 4 / 3)), (427, 640, (0.5, 1.0), (3 / 4, 4 / 3)),
             (300, 451, (0.08, 1.0), (3 / 4, 4 / 3)), (1000, 100, (0.9, 1.0), (3 / 4, 4 / 3)),
             (100, 1000, (0.9, 1.0), (3 / 4, 4 / 3)), (60, 50, (0.3, 1.0), (0.2, 5.0)), (7, 9, (0.9, 1.0), (1.0, 1.0))]
    for h, w, scale, ratio in cases:
        for seed in range(50):
            rec = Recorder(seed)
            ours = T.random_resized_crop_params(rec, h, w, scale, ratio)
            replay = TorchReplay(rec.log)
            monkeypatch.setattr(tvt, "torch", replay)
            theirs = tvt.RandomResizedCrop.get_params(Image.new("L", (w, h)), list(scale), list(ratio))
            monkeypatch.setattr(tvt, "torch", torch)
            assert ours == tuple(theirs) and not replay.records, (h, w, scale, ratio, seed)
            top, left, ch, cw = ours
            assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
            n_uniform = sum(r[0] == "uniform" for r in rec.log)
            outcomes["fallback" if n_uniform == 20 and len(rec.log) == 20 else
                     "first try" if n_uniform == 2 else "after rejections"] += 1
    assert all(outcomes.values()), outcomes


def _patch_open_clip_randomness(monkeypatch, rng):
    """open_clip's crop and grey-scale coin drawn from `rng` through our functions, in its call order."""
    import open_clip.transform as oct
    from torchvision.transforms import RandomResizedCrop

    seen = []

    def get_params(img, scale, ratio):
        seen.append((tuple(scale), tuple(ratio)))
        return T.random_resized_crop_params(rng, img.height, img.width, scale, ratio)

    monkeypatch.setattr(RandomResizedCrop, "get_params", staticmethod(get_params))
    monkeypatch.setattr(oct, "random", types.SimpleNamespace(random=lambda: float(rng.random())))
    return seen


@pytest.mark.parity
# open_clip warns about gray_scale_prob, then uses it
@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")
@pytest.mark.parametrize("aug", [{}, {"scale": (0.08, 1.0), "gray_scale_prob": 0.5}])
def test_train_transform_equals_open_clip(photos, jpegs, monkeypatch, aug):
    import open_clip

    ref = open_clip.image_transform(224, is_train=True, aug_cfg=open_clip.AugmentationCfg(**aug))
    ours = T.AugmentConfig.from_open_clip(aug)
    images = {n: T.decode_image(d) for n, d in jpegs.items()}
    images["chelsea_L"] = Image.fromarray(photos["chelsea"]).convert("L")
    images["rocket_P"] = Image.fromarray(photos["rocket"]).convert("P")
    grey = 0
    for n, im in images.items():
        for seed in range(3):
            seen = _patch_open_clip_randomness(monkeypatch, np.random.default_rng(seed))
            want = ref(im).permute(1, 2, 0).numpy()
            got = T.train_transform(im, 224, np.random.default_rng(seed), ours)
            assert got.shape == (224, 224, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(normalize(got, MEAN, STD), want, err_msg=f"{n} seed {seed}")
            assert seen == [(ours.scale, (3 / 4, 4 / 3))]  # open_clip passes `scale`, keeps the default ratio
            grey += bool((got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all())
            if n in jpegs:  # decode + transform from bytes, DCT off: the same
                again = T.decode_for_train(jpegs[n], 224, np.random.default_rng(seed), ours, dct=False)
                np.testing.assert_array_equal(again, got)
    if aug:  # the coin turned some colour photos grey, not all
        assert 0 < grey - 3 < 3 * (len(images) - 1), grey
    else:  # only the greyscale photo
        assert grey == 3, grey


@pytest.mark.parity
def test_eval_transform_equals_open_clip(photos, jpegs):
    import open_clip

    for size, mode in ((224, "shortest"), (160, "squash")):
        ref = open_clip.image_transform(size, is_train=False, resize_mode=mode)
        for n, data in jpegs.items():
            want = ref(Image.open(io.BytesIO(data))).permute(1, 2, 0).numpy()
            got = T.decode_for_eval(data, size, mode)
            np.testing.assert_array_equal(normalize(got, MEAN, STD), want, err_msg=f"{n} {mode}")
    np.testing.assert_array_equal(T.eval_transform(photos["coffee"], 224), T.decode_for_eval(_encode(
        photos["coffee"], "PNG"), 224))


# ----------------------------------------------------------------------------- DCT downscale


def _upsampled_jpeg(arr, long_side):
    im = Image.fromarray(arr)
    s = long_side / max(im.size)
    return _encode(np.asarray(im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)))


def test_dct_train_decode_close_to_full_decode(photos, jpegs, monkeypatch):
    """Same crop (same seed), DCT-downscaled decode vs full decode: the factor follows the rule
    (largest f in 8, 4, 2 with min(crop h, crop w) >= f * S), f = 1 is exact, f > 1 stays close.
    Native photos at S = 224 (mostly too small: f = 1), 112, 32; photos upsampled (PIL bicubic) to a
    1024 px longer side at S = 224."""
    spy = _Spy()
    monkeypatch.setattr(T, "simplejpeg", spy)
    big = {n: _upsampled_jpeg(a, 1024) for n, a in photos.items()}
    means, factors = [], []
    for size, sources in ((224, jpegs), (112, jpegs), (32, jpegs), (224, big)):
        for n, data in sources.items():
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
            for seed in range(3):
                spy.shapes.clear()
                fast = T.decode_for_train(data, size, np.random.default_rng(seed), dct=True).astype(np.int16)
                full = T.decode_for_train(data, size, np.random.default_rng(seed), dct=False).astype(np.int16)
                _, _, ch, cw = T.random_resized_crop_params(np.random.default_rng(seed), h, w, (0.9, 1.0),
                                                            (3 / 4, 4 / 3))
                f = max((f for f in (2, 4, 8) if min(ch, cw) >= f * size), default=1)
                assert spy.shapes == [(-(-h // f), -(-w // f)), (h, w)], (n, size, seed)
                factors.append(f)
                if f == 1:  # source smaller than twice the crop's need: exactly the full decode
                    np.testing.assert_array_equal(fast, full)
                    continue
                diff = np.abs(fast - full)
                assert diff.mean() <= 3.0 and diff.max() <= 64, (n, size, seed, diff.mean(), diff.max())
                means.append(diff.mean())
    assert set(factors) == {1, 2, 4, 8}, factors
    assert np.mean(means) <= 1.2, np.mean(means)


def test_dct_eval_decode_close_and_off_by_default(jpegs, monkeypatch):
    spy = _Spy()
    monkeypatch.setattr(T, "simplejpeg", spy)
    exact = T.decode_for_eval(jpegs["astronaut"], 224)  # 512 x 512
    fast = T.decode_for_eval(jpegs["astronaut"], 224, dct=True)
    assert spy.shapes == [(512, 512), (256, 256)]
    assert not np.array_equal(fast, exact)
    for n, data in jpegs.items():  # at S = 112 every photo is downscaled (by 2, or 4 for astronaut)
        diff = np.abs(T.decode_for_eval(data, 112, dct=True).astype(int) - T.decode_for_eval(data, 112))
        assert diff.mean() <= 3.0 and diff.max() <= 64, (n, diff.mean(), diff.max())
    assert len(spy.shapes) == 2 + 2 * len(jpegs) and min(spy.shapes[2::2]) < (256, 256)


# ----------------------------------------------------------------------------- bad input, config, determinism


def _flip_byte(data: bytes, crc_flip_at: int) -> bytes:
    return data[:crc_flip_at] + bytes([data[crc_flip_at] ^ 0xFF]) + data[crc_flip_at + 1:]


@pytest.fixture(scope="module")
def bad_inputs(photos, jpegs):
    jpeg, png = jpegs["chelsea"], _encode(photos["chelsea"][:64, :64], "PNG")
    sof = jpeg.find(b"\xff\xc0")
    ihdr_crc = 8 + 4 + 4 + 13  # signature, length, type, IHDR data: the CRC follows
    empty_ihdr = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    zero_png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + empty_ihdr
                + struct.pack(">I", zlib.crc32(b"IHDR" + empty_ihdr)))
    return {
        "truncated_jpeg": ("corrupt_image", jpeg[: len(jpeg) // 2]),
        "jpeg_magic_then_garbage": ("corrupt_image", b"\xff\xd8\xff" + np.random.default_rng(1).bytes(500)),
        "garbage": ("corrupt_image", np.random.default_rng(0).bytes(2000)),
        "zero_height_jpeg": ("corrupt_image", jpeg[: sof + 5] + b"\x00\x00" + jpeg[sof + 7:]),
        "png_bad_crc": ("corrupt_image", _flip_byte(png, ihdr_crc + 1)),
        "truncated_png": ("corrupt_image", png[: len(png) // 2]),
        "zero_width_png": ("corrupt_image", zero_png),
        "empty": ("missing_image", b""),
        "none": ("missing_image", None),
    }


def test_bad_input_raises_bad_example(bad_inputs, monkeypatch):
    calls = {
        "decode_image": lambda d, n: T.decode_image(d, name=n),
        "decode_image_dct": lambda d, n: T.decode_image(d, min_size=(16, 16), name=n),
        "train_dct": lambda d, n: T.decode_for_train(d, 32, np.random.default_rng(0), name=n),
        "train_full": lambda d, n: T.decode_for_train(d, 32, np.random.default_rng(0), dct=False, name=n),
        "eval": lambda d, n: T.decode_for_eval(d, 32, name=n),
    }
    for case, (kind, data) in bad_inputs.items():
        for call, fn in calls.items():
            with pytest.raises(BadExample) as info:
                fn(data, f"shard-3/{case}")
            assert info.value.kind == kind and f"shard-3/{case}" in str(info.value), (case, call, info.value)


def test_decompression_bomb(jpegs, photos, monkeypatch):
    png = _encode(photos["coffee"], "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for data in (jpegs["coffee"], png):  # simplejpeg path and PIL path
        for fn in (lambda: T.decode_image(data, name="bomb"),
                   lambda: T.decode_for_train(data, 32, np.random.default_rng(0), name="bomb")):
            with pytest.raises(BadExample, match="bomb.*(decompression bomb|DecompressionBomb)") as info:
                fn()
            assert info.value.kind == "corrupt_image"


@pytest.mark.parametrize("kwargs, field", [
    ({"use_timm": True}, "use_timm"), ({"color_jitter": (0.4, 0.4, 0.4, 0.1)}, "color_jitter"),
    ({"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8}, "color_jitter_prob"),
    ({"re_prob": 0.25}, "re_prob"), ({"re_count": 1}, "re_count"), ({"scale": (1.0, 0.5)}, "scale"),
    ({"ratio": (0.0, 1.0)}, "ratio"), ({"interpolation": "nearest"}, "interpolation"),
    ({"gray_scale_prob": 1.5}, "gray_scale_prob"),
])
def test_augment_config_refusals_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"AugmentConfig\.{field}\b"):
        T.AugmentConfig(**kwargs)


def test_augment_config_from_open_clip_and_pickle():
    import open_clip

    assert T.AugmentConfig.from_open_clip(open_clip.AugmentationCfg()) == T.AugmentConfig()
    assert T.AugmentConfig.from_open_clip({"scale": [0.4, 1]}).scale == (0.4, 1.0)
    with pytest.raises(ValueError, match="AugmentConfig.use_timm"):
        T.AugmentConfig.from_open_clip(open_clip.AugmentationCfg(use_timm=True))
    aug = T.AugmentConfig(scale=(0.5, 1.0), gray_scale_prob=0.2)
    assert pickle.loads(pickle.dumps(aug)) == aug
    assert pickle.loads(pickle.dumps(T.decode_for_train)) is T.decode_for_train


def test_same_seed_same_output_and_draws_independent_of_dct(jpegs):
    data, aug = jpegs["astronaut"], T.AugmentConfig(scale=(0.3, 1.0), gray_scale_prob=0.3)
    for dct in (True, False):
        a = T.decode_for_train(data, 128, np.random.default_rng(7), aug, dct=dct)
        b = T.decode_for_train(data, 128, np.random.default_rng(7), aug, dct=dct)
        c = T.decode_for_train(data, 128, np.random.default_rng(8), aug, dct=dct)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
    # the random stream after one example is the same with and without DCT (draws in original coordinates)
    after = []
    for dct in (True, False):
        rng = np.random.default_rng(7)
        T.decode_for_train(data, 64, rng, aug, dct=dct)
        after.append(rng.random(4))
    np.testing.assert_array_equal(*after)
