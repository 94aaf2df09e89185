"""Modality gap, shift and sweep against float64 numpy oracles of `Weixin-Liang/Modality-Gap`.

The oracle transcribes `shift_features.ipynb:move_features` (delta = mean image - mean text, d = delta /
||delta||, text + 0.5 lam d and image - 0.5 lam d, each renormalised; gap distance ||mean y' - mean x'||;
predictions argmax(image' @ text'^T)) and `evaluate_retrieval`'s "Text R@1" (image i retrieves text i).

Tolerances: float64 (`jax.enable_x64`) rel/abs 1e-12; float32 abs 1e-6 (embedding scale 1); top-1
accuracy exactly (the data has no near-ties: the margins are checked).
"""

import importlib

import jax
import numpy as np
import pytest

# the module (clipjax.metrics exports the function of the same name)
mg = importlib.import_module("clipjax.metrics.modality_gap")


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _pairs(n=64, e=32, offset=0.8, noise=0.7, seed=0):
    """Paired unit embeddings sharing content z_i, pushed apart along a random direction (a gap)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, e))
    u = _unit(rng.normal(size=e)) * offset * np.sqrt(e)
    image = _unit(z + u + noise * rng.normal(size=(n, e)))
    text = _unit(z - u + noise * rng.normal(size=(n, e)))
    return image, text


def _move_features_oracle(image, text, lambdas, direction=None):
    if direction is None:
        delta = image.mean(axis=0) - text.mean(axis=0)
        direction = delta / np.linalg.norm(delta)
    gaps, accs, margins = [], [], []
    for lam in lambdas:
        t = text + 0.5 * lam * direction
        t = t / np.linalg.norm(t, axis=-1, keepdims=True)
        x = image - 0.5 * lam * direction
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        sim = x @ t.T
        preds = sim.argsort(axis=-1)
        accs.append(np.mean([i in preds[i, -1:] for i in range(len(preds))]))
        top2 = np.sort(sim, axis=-1)[:, -2:]
        margins.append(np.min(top2[:, 1] - top2[:, 0]))
        gaps.append(np.linalg.norm(t.mean(axis=0) - x.mean(axis=0)))
    return np.array(gaps), np.array(accs), min(margins)


def test_gap_matches_oracle_and_behaves():
    image, text = _pairs()
    ref = image.mean(axis=0) - text.mean(axis=0)
    with jax.enable_x64(True):
        delta, norm = mg.modality_gap(image, text)
        np.testing.assert_allclose(np.asarray(delta), ref, rtol=0, atol=1e-12)
        assert float(norm) == pytest.approx(np.linalg.norm(ref), rel=1e-12)
    d32, n32 = mg.modality_gap(image.astype(np.float32), text.astype(np.float32))
    np.testing.assert_allclose(np.asarray(d32), ref, atol=1e-6)
    assert float(n32) == pytest.approx(np.linalg.norm(ref), abs=1e-6)
    assert 0.5 < float(n32) < 1.5  # a clear gap
    swapped, n_swapped = mg.modality_gap(text.astype(np.float32), image.astype(np.float32))
    np.testing.assert_allclose(np.asarray(swapped), -ref, atol=1e-6)
    assert float(n_swapped) == pytest.approx(float(n32), abs=1e-6)
    same_delta, same_norm = mg.modality_gap(image.astype(np.float32), image.astype(np.float32))
    assert float(same_norm) == 0.0 and not np.any(np.asarray(same_delta))


def test_normalize_option():
    image, text = _pairs(seed=1)
    rng = np.random.default_rng(2)
    raw_i, raw_t = image * rng.uniform(0.5, 3, (64, 1)), text * rng.uniform(0.5, 3, (64, 1))
    with pytest.raises(ValueError, match="image_embeddings must be L2-normalised.*or pass normalize=True"):
        mg.modality_gap(raw_i.astype(np.float32), raw_t.astype(np.float32))
    delta, _ = mg.modality_gap(raw_i.astype(np.float32), raw_t.astype(np.float32), normalize=True)
    np.testing.assert_allclose(np.asarray(delta), image.mean(0) - text.mean(0), atol=1e-6)


@pytest.mark.parametrize("lam", [-2.0, 0.0, 0.75, 3.5])
def test_shift_matches_move_features(lam):
    image, text = _pairs(seed=3)
    delta = image.mean(0) - text.mean(0)
    d = delta / np.linalg.norm(delta)
    ref_x = _unit(image - 0.5 * lam * d)
    ref_y = _unit(text + 0.5 * lam * d)
    with jax.enable_x64(True):
        x, y = mg.shift_modalities(image, text, lam)
        np.testing.assert_allclose(np.asarray(x), ref_x, atol=1e-12)
        np.testing.assert_allclose(np.asarray(y), ref_y, atol=1e-12)
    x32, y32 = mg.shift_modalities(image.astype(np.float32), text.astype(np.float32), lam)
    np.testing.assert_allclose(np.asarray(x32), ref_x, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y32), ref_y, atol=1e-6)


def test_shift_with_given_direction():
    """The notebook applies a direction from another dataset (COCO -> SVHN): used as given."""
    image, text = _pairs(seed=4)
    other = _unit(np.random.default_rng(5).normal(size=32))
    x, y = mg.shift_modalities(image.astype(np.float32), text.astype(np.float32), 1.5, direction=other)
    np.testing.assert_allclose(np.asarray(x), _unit(image - 0.75 * other), atol=1e-6)
    np.testing.assert_allclose(np.asarray(y), _unit(text + 0.75 * other), atol=1e-6)


def test_sweep_matches_oracle():
    """The default sweep is the notebook's `for delta in np.arange(-5, 5, 0.25)` (`move_features`), built here
    independently and compared exactly; `gap_sweep` without `lambdas` runs it and matches the oracle."""
    image, text = _pairs(seed=6)
    lambdas = np.arange(-5, 5, 0.25)  # shift_features.ipynb:move_features
    np.testing.assert_array_equal(mg.DEFAULT_LAMBDAS, lambdas)
    assert len(lambdas) == 40 and lambdas[0] == -5.0 and lambdas[-1] == 4.75
    ref_gap, ref_acc, margin = _move_features_oracle(image, text, lambdas)
    assert margin > 1e-6  # no near-ties, so float32 and float64 agree on every argmax
    with jax.enable_x64(True):
        out = mg.gap_sweep(image, text)  # the default grid
        np.testing.assert_array_equal(np.asarray(out["lambda"]), lambdas)
        np.testing.assert_allclose(np.asarray(out["gap"]), ref_gap, rtol=1e-12)
        np.testing.assert_array_equal(np.asarray(out["accuracy"]), ref_acc)
    out32 = mg.gap_sweep(image.astype(np.float32), text.astype(np.float32), lambdas, lambda_batch=7)
    np.testing.assert_allclose(np.asarray(out32["gap"]), ref_gap, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out32["accuracy"]), ref_acc)
    np.testing.assert_allclose(np.asarray(out32["lambda"]), lambdas)
    # the experiment's shape: at lambda = 0 the gap is ||delta||, and shifting by about ||delta|| closes it
    norm = np.linalg.norm(image.mean(0) - text.mean(0))
    assert ref_gap[lambdas == 0.0][0] == pytest.approx(norm, rel=1e-12)
    assert ref_gap.min() < 0.3 * norm and ref_acc.max() > ref_acc.min()


def test_sweep_under_jit():
    image, text = _pairs(seed=7)
    f = jax.jit(lambda a, b: mg.gap_sweep(a, b, np.array([0.0, 1.0]), validate=False)["gap"])
    ref_gap, _, _ = _move_features_oracle(image, text, [0.0, 1.0])
    np.testing.assert_allclose(np.asarray(f(image.astype(np.float32), text.astype(np.float32))), ref_gap, atol=1e-6)


def test_bad_input():
    image, text = _pairs(n=16, seed=8)
    image, text = image.astype(np.float32), text.astype(np.float32)
    with pytest.raises(ValueError, match="paired inputs have different lengths"):
        mg.modality_gap(image, text[:-1])
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        mg.shift_modalities(image, text[:, :-1], 1.0)
    with pytest.raises(ValueError, match="image_embeddings is empty"):
        mg.gap_sweep(image[:0], text[:0])
    bad = text.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="text_embeddings has 1 non-finite"):
        mg.gap_sweep(image, bad)
    with pytest.raises(ValueError, match="modality gap.*all-zero"):
        mg.shift_modalities(image, image, 1.0)
    with pytest.raises(ValueError, match="direction must have shape"):
        mg.shift_modalities(image, text, 1.0, direction=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="lambdas has 1 non-finite"):
        mg.gap_sweep(image, text, np.array([0.0, np.nan]))
