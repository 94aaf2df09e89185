"""Calibration metrics and the GREAT Score against torchmetrics, torch, scipy and float64 numpy oracles.

References and tolerances:
- ECE: torchmetrics `MulticlassCalibrationError(num_classes=C, n_bins=n, norm='l1')` on the same float32
  logits (random, tied top logits, constant rows, saturated rows with confidence exactly 1.0): abs 1e-6
  (float32 sums in another order; measured <= 6e-8). The float32 bin edges equal `torch.linspace`
  exactly.
- NLL: `torch.nn.functional.cross_entropy` in float64 (rel 1e-12 under `jax.enable_x64`) and float32
  (rel 1e-6).
- temperature: `scipy.optimize.minimize_scalar` (Brent, tol 1e-12) of the float64 numpy NLL over log T;
  T to rel 1e-4 from float32 logits (measured ~1e-8) and rel 1e-7 in float64.
- GREAT: numpy float64 closed form sqrt(pi/2) * max(p_y - max_{k != y} p_k, 0): abs 1e-12 in float64,
  1e-6 in float32.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp, softmax

from clipjax.metrics import calibration as cal

pytestmark = pytest.mark.parity


def _logits(n=600, c=10, seed=0, hard=True):
    """Random float32 logits with the awkward rows: constant, tied top-2, saturated (confidence 1.0)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = 3.0 * rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 2.0  # better than chance, still miscalibrated
    if hard:
        logits[:20] = 0.0  # every class tied: confidence 1 / C
        logits[20:40, :2] = 6.0  # two-way tie at the top
        logits[40:50, 0] = 300.0  # softmax saturates to exactly 1.0 (torchmetrics' extra bin)
    return logits.astype(np.float32), labels


def _torchmetrics_ece(logits, labels, n_bins=15):
    import torch
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(torch.tensor(logits), torch.tensor(labels)))


def _nll64(logits, labels):
    z = np.asarray(logits, np.float64)
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


def _scipy_temperature(logits, labels):
    z = np.asarray(logits, np.float64)
    res = minimize_scalar(lambda u: _nll64(z / np.exp(u), labels), bracket=(-1.0, 1.0), tol=1e-12)
    return float(np.exp(res.x))


def test_bin_edges_equal_torch_linspace():
    import torch

    for n in list(range(1, 41)) + [100, 255]:
        np.testing.assert_array_equal(cal.bin_edges(n), torch.linspace(0, 1, n + 1, dtype=torch.float32).numpy())


@pytest.mark.parametrize("c, n_bins, seed", [(10, 15, 0), (15, 15, 1), (2, 15, 2), (5, 10, 3), (100, 15, 4)])
def test_ece_matches_torchmetrics(c, n_bins, seed):
    logits, labels = _logits(c=c, seed=seed)
    ref = _torchmetrics_ece(logits, labels, n_bins)
    got = cal.expected_calibration_error(logits, labels, n_bins)
    assert float(got) == pytest.approx(ref, abs=1e-6)
    assert ref > 0.01  # a non-trivial miscalibration
    jitted = jax.jit(lambda a, b: cal.expected_calibration_error(a, b, n_bins, validate=False))(logits, labels)
    assert float(jitted) == pytest.approx(ref, abs=1e-6)


def test_ece_confidence_on_bin_edges_and_at_one():
    """Confidences exactly on edges (2 classes: 0.5, 1.0) go to the upper bin, as torch.bucketize(right=True);
    a tie predicts the first class (both tied rows are labelled 0, so the other choice would change acc)."""
    logits = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 400.0], [400.0, 0.0], [1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1, 1, 0])
    ref = _torchmetrics_ece(logits, labels, 2)
    assert float(cal.expected_calibration_error(logits, labels, 2)) == pytest.approx(ref, abs=1e-7)
    # by hand: bin [0.5, 1): confidences 0.5, 0.5, 0.731, all correct -> 3/5 * |1 - 0.577|; bin {1.0}: acc 1/2
    p = 1 / (1 + math.exp(-1))
    by_hand = 3 / 5 * abs(1.0 - (1 + p) / 3) + 2 / 5 * abs(0.5 - 1.0)
    assert ref == pytest.approx(by_hand, abs=1e-6)


def test_ece_float64_logits_match_torchmetrics():
    logits, labels = _logits(seed=5, hard=False)
    with jax.enable_x64(True):
        got = float(cal.expected_calibration_error(logits.astype(np.float64), labels))
    assert got == pytest.approx(_torchmetrics_ece(logits.astype(np.float64), labels), abs=1e-6)


def test_nll_matches_torch_cross_entropy():
    import torch

    logits, labels = _logits(seed=6)
    z64 = logits.astype(np.float64) * 1.7
    ref64 = float(torch.nn.functional.cross_entropy(torch.tensor(z64), torch.tensor(labels)))
    with jax.enable_x64(True):
        got64 = float(cal.negative_log_likelihood(z64, labels))
    assert got64 == pytest.approx(ref64, rel=1e-12)
    ref32 = float(torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)))
    assert float(cal.negative_log_likelihood(logits, labels)) == pytest.approx(ref32, rel=1e-6)


@pytest.mark.parametrize("scale", [3.0, 0.1])  # overconfident (T > 1) and underconfident (T < 1)
def test_fit_temperature_matches_scipy(scale):
    logits, labels = _logits(n=400, seed=7, hard=False)
    logits = (logits * scale).astype(np.float32)
    ref = _scipy_temperature(logits, labels)
    assert (ref > 1.5) if scale > 1 else (ref < 0.7)
    got = float(cal.fit_temperature(logits, labels))
    assert got == pytest.approx(ref, rel=1e-4)
    with jax.enable_x64(True):
        got64 = float(cal.fit_temperature(logits.astype(np.float64), labels))
    assert got64 == pytest.approx(ref, rel=1e-7)
    # the fitted T is a minimum of the float64 NLL
    assert _nll64(logits / got, labels) <= min(_nll64(logits / (got * 1.01), labels),
                                               _nll64(logits / (got * 0.99), labels))


def test_fit_temperature_returns_bracket_end_when_optimum_is_outside():
    """Separable logits: NLL falls as T -> 0, so the smallest allowed temperature comes back."""
    labels = np.arange(6) % 3
    logits = np.eye(3, dtype=np.float32)[labels] * 4.0
    assert float(cal.fit_temperature(logits, labels, t_min=0.05)) == pytest.approx(0.05, rel=1e-5)


def test_calibration_report_against_references():
    logits, labels = _logits(seed=8)
    report = cal.calibration_report(logits, labels)
    t = _scipy_temperature(logits, labels)
    scaled = (logits.astype(np.float64) / t).astype(np.float32)
    assert float(report["temperature"]) == pytest.approx(t, rel=1e-4)
    assert float(report["ece"]) == pytest.approx(_torchmetrics_ece(logits, labels), abs=1e-6)
    assert float(report["ece_scaled"]) == pytest.approx(_torchmetrics_ece(scaled, labels), abs=1e-4)
    assert float(report["nll"]) == pytest.approx(_nll64(logits, labels), rel=1e-6)
    assert float(report["nll_scaled"]) == pytest.approx(_nll64(scaled, labels), rel=1e-5)
    assert float(report["nll_scaled"]) < float(report["nll"])
    assert float(report["ece_scaled"]) < float(report["ece"])
    assert float(report["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, 1) == labels))


def _great_oracle(logits, labels, temperature):
    p = softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    n = len(labels)
    p_true = p[np.arange(n), labels]
    others = p.copy()
    others[np.arange(n), labels] = -np.inf
    g = np.sqrt(np.pi / 2) * np.maximum(p_true - others.max(axis=1), 0.0)
    return g.mean(), g


@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.4])
def test_great_score_matches_closed_form(temperature):
    logits, labels = _logits(seed=9)
    ref_mean, ref_g = _great_oracle(logits, labels, temperature)
    mean, g = cal.great_score(logits, labels, temperature=temperature)
    np.testing.assert_allclose(np.asarray(g), ref_g, atol=1e-6)
    assert float(mean) == pytest.approx(ref_mean, abs=1e-6)
    with jax.enable_x64(True):
        mean64, g64 = cal.great_score(logits.astype(np.float64), labels, temperature=temperature)
        np.testing.assert_allclose(np.asarray(g64), ref_g, atol=1e-12)
    wrong = np.argmax(logits, 1) != labels
    assert wrong.any() and np.all(np.asarray(g)[wrong] == 0.0) and np.asarray(g).max() > 0.5
    # saturated correct rows reach the bound's maximum sqrt(pi/2)
    assert np.asarray(g)[40:50][labels[40:50] == 0] == pytest.approx(math.sqrt(math.pi / 2), abs=1e-6)


def test_great_score_traced_temperature():
    logits, labels = _logits(seed=10)
    f = jax.jit(lambda t: cal.great_score(logits, labels, temperature=t, validate=False)[0])
    assert float(f(jnp.float32(2.0))) == pytest.approx(_great_oracle(logits, labels, 2.0)[0], abs=1e-6)


def test_bad_input():
    logits, labels = _logits(n=30, seed=11, hard=False)
    with pytest.raises(ValueError, match="labels"):
        cal.expected_calibration_error(logits, labels[:-1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        cal.negative_log_likelihood(logits, np.where(labels == 0, 10, labels))
    with pytest.raises(ValueError, match="labels must lie"):
        cal.great_score(logits, -np.ones_like(labels))
    bad = logits.copy()
    bad[3, 2] = np.nan
    for fn in (cal.expected_calibration_error, cal.negative_log_likelihood, cal.fit_temperature,
               cal.calibration_report):
        with pytest.raises(ValueError, match="logits has 1 non-finite"):
            fn(bad, labels)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cal.great_score(logits[:, :1], np.zeros(30, int))
    with pytest.raises(ValueError, match="logits is empty"):
        cal.expected_calibration_error(np.zeros((0, 3), np.float32), np.zeros(0, int))
    with pytest.raises(TypeError, match="labels must be an integer"):
        cal.negative_log_likelihood(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match="t_max must be larger"):
        cal.fit_temperature(logits, labels, t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        cal.great_score(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="n_bins must be a positive"):
        cal.expected_calibration_error(logits, labels, 0)
