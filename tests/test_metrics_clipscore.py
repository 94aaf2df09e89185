"""CLIPScore / RefCLIPScore / CLIP-I against Hessel's formulas, torchmetrics end to end, and numpy.

Tolerances:
- Hessel CLIP-S / RefCLIP-S vs a float64 numpy transcription of
  `jmhessel/clipscore:clipscore.py` (`get_clip_score`, `get_refonlyclipscore`, the
  harmonic mean in `main`): float32 inputs, so atol 1e-6 on scores in [0, 2.5], on every row
  (rows whose CLIP-S clips to 0 included); a 0/0 row must be NaN on both sides.
- torchmetrics `CLIPScore` (module, end to end with a random-init transformers CLIP on
  real skimage photos): both sides are float32 cosines times 100 from the same
  features, atol 1e-4 on a score in [0, 100] (float32 ulp at 100 is 8e-6; the
  normalise/dot order differs).
- CLIP-I vs the explicit all-pairs numpy mean in float64: atol 1e-6.
"""

import gzip

import jax
import numpy as np
import pytest

from clipjax import metrics


def _hessel_oracle(img, cand, refs):
    """float64 transcription of Hessel's code: per-instance CLIP-S, RefCLIP-S and the best reference cosine b.

    RefCLIP-S = 2 a b / (a + b) is 0/0 (NaN, with numpy's warning silenced) where a = b = 0."""
    img = img / np.sqrt(np.sum(img ** 2, axis=1, keepdims=True))
    cand = cand / np.sqrt(np.sum(cand ** 2, axis=1, keepdims=True))
    per = 2.5 * np.clip(np.sum(img * cand, axis=1), 0, None)
    text_text = []
    for c, r in zip(cand, refs):
        r = r / np.sqrt(np.sum(r ** 2, axis=1, keepdims=True))
        text_text.append(np.max(c.dot(r.T)))
    text_text = np.array(text_text)
    with np.errstate(invalid="ignore"):
        return per, 2 * per * text_text / (per + text_text), text_text


def test_clip_score_and_ref_clip_score_match_hessel():
    """Every row is compared with the oracle (atol 1e-6), the rows where CLIP-S clips to 0 included (expected
    RefCLIP-S 0); only the genuinely undefined 0/0 row (CLIP-S 0 and best reference cosine exactly 0, built from
    basis vectors in row 0) is left out of the value comparison, and must be NaN as the reference code gives."""
    rng = np.random.default_rng(0)
    n, d, r = 40, 16, 4
    img = rng.normal(size=(n, d)).astype(np.float32)
    cand = (0.2 * img + rng.normal(size=(n, d))).astype(np.float32)  # about a quarter of CLIP-S clip to 0
    refs = (cand[:, None] + 1.5 * rng.normal(size=(n, r, d))).astype(np.float32)
    n_refs = rng.integers(1, r + 1, n)  # varying numbers of references, padded to r
    eye = np.eye(d, dtype=np.float32)
    img[0], cand[0], refs[0, 0], n_refs[0] = eye[0], eye[1], eye[2], 1  # cos(img, cand) = cos(cand, ref) = 0
    mask = np.arange(r)[None, :] < n_refs[:, None]
    per, ref_per, best_ref = _hessel_oracle(img.astype(np.float64), cand.astype(np.float64),
                                            [refs[i, :n_refs[i]].astype(np.float64) for i in range(n)])
    undefined = (per == 0) & (best_ref == 0)
    assert np.flatnonzero(undefined).tolist() == [0]
    assert (per > 0).sum() >= 5 and ((per == 0) & ~undefined).sum() >= 5  # both branches of the clip, compared
    np.testing.assert_allclose(np.asarray(metrics.clip_score(img, cand)), per, atol=1e-6)
    padded = np.where(mask[..., None], refs, np.nan)  # padding is never read
    got = np.asarray(metrics.ref_clip_score(img, cand, np.nan_to_num(padded, nan=7.0), mask))
    assert np.isnan(got[undefined]).all() and np.isfinite(got[~undefined]).all()
    np.testing.assert_allclose(got[~undefined], ref_per[~undefined], atol=1e-6)
    np.testing.assert_array_equal(got[(per == 0) & ~undefined], 0.0)  # clipped CLIP-S: RefCLIP-S is 0
    # jit
    np.testing.assert_allclose(np.asarray(jax.jit(metrics.clip_score)(img, cand)), per, atol=1e-6)


def test_ref_clip_score_quirks():
    img = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    cand = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    refs = np.array([[[-1.0, 0.0]], [[0.0, 1.0]]], np.float32)  # cos(cand, ref) = -1, 1
    # instance 0: a = 2.5, b = -1 (unclipped, as the code) -> 2ab/(a+b) = -5/1.5
    # instance 1: a = 0, b = 1 -> 0
    got = np.asarray(metrics.ref_clip_score(img, cand, refs))
    np.testing.assert_allclose(got, [-5 / 1.5, 0.0], atol=1e-6)
    got = np.asarray(metrics.ref_clip_score(img, cand, refs, clip_reference=True))
    np.testing.assert_allclose(got[0], 0.0, atol=1e-6)  # paper formula: b clipped to 0
    assert metrics.clipscore_prompts(["a dog"]) == ["A photo depicts a dog"]
    assert metrics.clipscore_prompts(["x"], prefix="Look:") == ["Look: x"]


def _tiny_hf_clip(seed=0):
    """A random-init transformers CLIPModel, its CLIPProcessor, offline (OpenAI BPE from open_clip)."""
    import torch
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config).eval()

    class PooledCLIP(torch.nn.Module):
        """transformers 5 returns model outputs from get_*_features; torchmetrics 1.9 wants tensors."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def get_image_features(self, *args, **kwargs):
            return self.inner.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.inner.get_text_features(*args, **kwargs).pooler_output

    return PooledCLIP(model), processor


def _photos():
    import torch
    from skimage import data, transform

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        im = transform.resize(getattr(data, name)(), (48, 48), anti_aliasing=True, preserve_range=True)
        out.append(torch.from_numpy(im.astype(np.uint8)).permute(2, 0, 1))  # uint8 [3, H, W]
    return out


@pytest.mark.parity
def test_torchmetrics_clip_score_end_to_end():
    import torch
    from torchmetrics.multimodal import CLIPScore

    # seed 2: on these three pairs the cosines have mixed signs (0.03, 0.16, -0.02) and a positive
    # mean, so torchmetrics' clamp-the-mean (not each pair) and Hessel's per-pair clip both matter
    model, processor = _tiny_hf_clip(seed=2)
    images = [_photos()[i] for i in (0, 1, 3)]
    captions = ["an astronaut in a suit", "a cat", "a rocket on the launch pad"]
    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    metric.update(images[:2], captions[:2])
    metric.update(images[2:], captions[2:])
    ref = float(metric.compute())
    with torch.no_grad():  # the same features, computed on the torch side as torchmetrics does
        pix = processor(images=images, return_tensors="pt")["pixel_values"]
        tok = processor(text=captions, return_tensors="pt", padding=True)
        img_f = model.get_image_features(pix).numpy()
        txt_f = model.get_text_features(tok["input_ids"], tok["attention_mask"]).numpy()
    cos = np.sum(img_f * txt_f, 1) / np.linalg.norm(img_f, axis=1) / np.linalg.norm(txt_f, axis=1)
    assert (cos < 0).any() and 100 * cos.mean() > 1.0, "the comparison must not be hidden by the clamp"
    ours = float(metrics.torchmetrics_clip_score(img_f, txt_f))
    assert abs(ours - ref) < 1e-4
    # Hessel's CLIP-S from the same features: 2.5 * max(cos, 0) per pair
    hessel = np.asarray(metrics.clip_score(img_f, txt_f))
    np.testing.assert_allclose(hessel, 2.5 * np.clip(cos, 0, None), atol=1e-6)
    # image-image mode (torchmetrics >= 1.7): paired cosines, the same function
    metric_ii = CLIPScore(model_name_or_path=lambda: (model, processor))
    metric_ii.update(images, images[::-1])
    ours_ii = float(metrics.torchmetrics_clip_score(img_f, img_f[::-1]))
    assert ours_ii > 1.0, "the comparison must not be hidden by the clamp"
    assert abs(ours_ii - float(metric_ii.compute())) < 1e-4


def test_clip_i_all_pairs_identity():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(30, 12)).astype(np.float32) + 0.5
    r = rng.normal(size=(17, 12)).astype(np.float32) + 0.5
    gh = g / np.linalg.norm(g, axis=1, keepdims=True)
    rh = r / np.linalg.norm(r, axis=1, keepdims=True)
    expect = np.mean(gh.astype(np.float64) @ rh.T.astype(np.float64))
    assert abs(float(metrics.clip_i(g, r)) - expect) < 1e-6
    assert abs(float(jax.jit(metrics.clip_i)(g, r)) - expect) < 1e-6


def test_bad_input_errors():
    a = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="different lengths"):
        metrics.clip_score(a, a[:3])
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        metrics.torchmetrics_clip_score(a, a[:, :4])
    z = a.copy()
    z[1] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        metrics.clip_score(z, a)
    n = a.copy()
    n[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.clip_i(n, a)
    with pytest.raises(ValueError, match="empty"):
        metrics.clip_i(a[:0], a)
    with pytest.raises(ValueError, match=r"\[N, R, D\]"):
        metrics.ref_clip_score(a, a, np.ones((3, 2, 8), np.float32))
    with pytest.raises(ValueError, match="at least one reference"):
        metrics.ref_clip_score(a, a, np.ones((4, 2, 8), np.float32), np.zeros((4, 2), bool))
    with pytest.raises(TypeError, match="single string"):
        metrics.clipscore_prompts("a dog")
