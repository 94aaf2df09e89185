"""AUROC and FPR@TPR against scikit-learn and the reference repositories' numpy code.

Oracles (float64, numpy/sklearn/scipy, written from the reference code):
  * AUROC: `sklearn.metrics.roc_auc_score`.
  * "openood": OpenOOD `auc_and_fpr_recall` -- `roc_curve(is_ood, -conf)`, `fpr[argmax(tpr >= level)]`.
  * "nearest": Hendrycks `fpr_and_fdr_at_recall` as in the MCM/GL-MCM/NegLabel repositories.
  * "interpolated": CLIPN `cal_auc_fpr` -- `roc_curve(is_id, conf)`, `interp1d(tpr, fpr)(level)`.
    pip `ood-metrics` (also interpolating) requires numpy<2 and cannot be installed next to
    numpy 2.4, so the scipy oracle stands in for it.

Tolerance: the chosen ROC point must be the reference's exactly (both are ratios of integer
counts); the final float32 division / interpolation is compared at atol 1e-6 (float32 has
~6e-8 relative precision on values <= 1). Score sets include heavy ties (quantised scores) to
exercise sklearn's tie grouping and `drop_intermediate`.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import interpolate
from sklearn.metrics import roc_auc_score, roc_curve

from clipjax.ood import auroc, fpr_at_tpr, ood_metrics

ATOL = 1e-6


def ref_openood(id_s, ood_s, level):
    conf = np.concatenate([id_s, ood_s]).astype(np.float64)
    is_ood = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_ood, -conf)
    return fpr[np.argmax(tpr >= level)]


def _stable_cumsum(arr):
    return np.cumsum(arr, dtype=np.float64)


def ref_nearest(id_s, ood_s, level):
    """`fpr_and_fdr_at_recall(labels, examples, recall_level)` with ID labelled 1 (GL-MCM repo)."""
    y_score = np.concatenate([id_s, ood_s]).astype(np.float64)
    y_true = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))] == 1
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = _stable_cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - level))
    return fps[cutoff] / np.sum(np.logical_not(y_true))


def ref_interpolated(id_s, ood_s, level):
    conf = np.concatenate([id_s, ood_s]).astype(np.float64)
    is_id = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    fpr, tpr, _ = roc_curve(is_id, conf, pos_label=1)
    return float(interpolate.interp1d(tpr, fpr)(level))


REFS = {"openood": ref_openood, "nearest": ref_nearest, "interpolated": ref_interpolated}


def _draw(rng, n_in, n_out, quant):
    a = rng.normal(0.8, 1.0, n_in)
    b = rng.normal(0.0, 1.0, n_out)
    if quant:
        a, b = np.round(a * quant) / quant, np.round(b * quant) / quant
    return a.astype(np.float32), b.astype(np.float32)


# A few fixed shapes (each compiles once); many value draws per shape. 0.95 * 37 and 0.8 * 53
# are not exact, 0.95 * 200 = 190 and 0.8 * 60 = 48 are (so "tpr == level" points occur).
SHAPES = [(37, 53), (200, 113), (60, 41)]


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_auroc_and_fpr_match_references(n_in, n_out):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    for trial in range(12):
        quant = (0, 0, 2, 4, 10, 1)[trial % 6]  # continuous and tie-heavy score sets
        a, b = _draw(rng, n_in, n_out, quant)
        labels = np.r_[np.ones(n_in), np.zeros(n_out)]
        want_auc = roc_auc_score(labels, np.r_[a, b].astype(np.float64))
        np.testing.assert_allclose(float(auroc(a, b)), want_auc, rtol=0, atol=ATOL)
        for level in (0.95, 0.8):
            for conv, ref in REFS.items():
                got = float(fpr_at_tpr(a, b, level, conv))
                want = ref(a, b, level)
                assert abs(got - want) <= ATOL, (conv, level, quant, trial, got, want)


def test_conventions_differ_and_are_selected():
    """On one tied set the three conventions give three different values, each its reference's.

    (Without ties "nearest" and "interpolated" coincide: the segment crossing the level is vertical.)
    """
    rng = np.random.default_rng(0)
    a, b = _draw(rng, 37, 53, 4)
    got = {c: float(fpr_at_tpr(a, b, 0.95, c)) for c in REFS}
    for c, ref in REFS.items():
        assert abs(got[c] - ref(a, b, 0.95)) <= ATOL
    assert len({round(v, 6) for v in got.values()}) == 3, got


def test_perfect_and_inverted_separation():
    a = np.linspace(1.0, 2.0, 40, dtype=np.float32)
    b = np.linspace(-2.0, -1.0, 30, dtype=np.float32)
    assert float(auroc(a, b)) == 1.0 and float(auroc(b, a)) == 0.0
    for c in REFS:
        assert float(fpr_at_tpr(a, b, 0.95, c)) == pytest.approx(0.0, abs=ATOL)
        assert float(fpr_at_tpr(b, a, 0.95, c)) == pytest.approx(ref := REFS[c](b, a, 0.95), abs=ATOL), ref


def test_auroc_is_invariant_to_monotone_maps():
    rng = np.random.default_rng(5)
    a, b = _draw(rng, 37, 53, 0)
    base = float(auroc(a, b))
    np.testing.assert_allclose(float(auroc(np.exp(a), np.exp(b))), base, atol=ATOL)
    np.testing.assert_allclose(float(auroc(3 * a - 1, 3 * b - 1)), base, atol=ATOL)


def test_auroc_large_sets_exact_count_sum():
    """2e5 scores with ties: the integer win count is summed exactly (float32 mean would drift)."""
    rng = np.random.default_rng(7)
    a = np.round(rng.normal(0.3, 1, 120_000) * 50).astype(np.float32) / 50
    b = np.round(rng.normal(0.0, 1, 80_000) * 50).astype(np.float32) / 50
    want = roc_auc_score(np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b].astype(np.float64))
    np.testing.assert_allclose(float(auroc(a, b)), want, rtol=0, atol=2e-7)


def test_ood_metrics_summary_floats():
    rng = np.random.default_rng(9)
    a, b = _draw(rng, 37, 53, 0)
    out = ood_metrics(a, b, convention="nearest")
    assert out["convention"] == "nearest" and out["num_id"] == 37 and out["num_ood"] == 53
    assert isinstance(out["auroc"], float) and abs(out["fpr"] - ref_nearest(a, b, 0.95)) <= ATOL


def test_metrics_under_jit_with_sharded_inputs(mesh8):
    rng = np.random.default_rng(11)
    a, b = _draw(rng, 200, 120, 4)
    sharding = NamedSharding(mesh8, P("data"))
    a_s, b_s = jax.device_put(a, sharding), jax.device_put(b, sharding)
    assert len(a_s.sharding.device_set) == 8
    got_auc = jax.jit(lambda x, y: auroc(x, y))(a_s, b_s)
    got_fpr = jax.jit(lambda x, y: fpr_at_tpr(x, y, 0.95, "openood"))(a_s, b_s)
    assert float(got_auc) == float(auroc(a, b))
    assert float(got_fpr) == float(fpr_at_tpr(a, b, 0.95, "openood"))


@pytest.mark.parametrize("bad,err,match", [
    (dict(id_scores=np.zeros((0,), np.float32)), ValueError, "empty"),
    (dict(ood_scores=np.zeros((0,), np.float32)), ValueError, "empty"),
    (dict(id_scores=np.array([0.1, np.nan], np.float32)), ValueError, "NaN"),
    (dict(ood_scores=np.zeros((3, 2), np.float32)), ValueError, "rank 1"),
    (dict(id_scores=np.array([1, 2, 3])), TypeError, "floating"),
    (dict(tpr=1.5), ValueError, "tpr"),
    (dict(tpr=0.0), ValueError, "tpr"),
    (dict(convention="hendrycks"), ValueError, "convention"),
])
def test_bad_input(bad, err, match):
    kwargs = dict(id_scores=np.array([0.3, 0.9, 0.5], np.float32), ood_scores=np.array([0.1, 0.2], np.float32),
                  tpr=0.95, convention="openood")
    kwargs.update(bad)
    with pytest.raises(err, match=match):
        fpr_at_tpr(**kwargs)
    if not {"tpr", "convention"} & set(bad):
        with pytest.raises(err, match=match):
            auroc(kwargs["id_scores"], kwargs["ood_scores"])
