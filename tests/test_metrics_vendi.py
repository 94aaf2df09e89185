"""Vendi score against the vendi-score package (0.0.3), kernel and dual forms, sharded.

Tolerances:
- float32 dual form vs `vendi.score_dual` in float64: rtol 1e-5 (a d x d float32 eigen-
  problem of a well-conditioned Gram matrix; measured errors are ~1e-7).
- float32 kernel form vs `vendi.score_K` on a full-rank kernel (n <= d): rtol 1e-4
  (n x n float32 eigenvalues; noise ~1e-7 * n on values ~1/n).
- float64 (`jax.enable_x64`) vs the package on a low-rank kernel, all q: rtol 1e-9. In
  float32 the near-zero eigenvalues of a low-rank K are noise that biases q < 1, which is
  why the library recommends the dual form; see vendi.py.
- README examples: 4 decimals for 2.1573; the second example vs the package at rtol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import metrics

QS = (0.5, 1, 2, "inf")


def _x(n, d, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    if rank is None:
        x = rng.normal(size=(n, d)) + 0.3
    else:
        x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    return x.astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("q", QS)
def test_dual_matches_vendi_score_dual(q):
    from vendi_score import vendi

    x = _x(1500, 24)
    ref = vendi.score_dual(x.astype(np.float64), q=q)
    for block in (256, 1500, 700):  # 700 leaves a partial last block
        got = float(metrics.vendi_score(x, q, form="dual", block_size=block))
        assert got == pytest.approx(ref, rel=1e-5)
    assert float(metrics.vendi_score(x, q)) == pytest.approx(ref, rel=1e-5)  # auto picks dual: n > d


@pytest.mark.parity
@pytest.mark.parametrize("q", QS)
def test_kernel_form_matches_vendi_score_K(q):
    from sklearn.preprocessing import normalize
    from vendi_score import vendi

    x = _x(40, 64, seed=1)  # n <= d: auto picks the kernel form, K full rank
    xn = normalize(x.astype(np.float64))
    ref = vendi.score_K(xn @ xn.T, q=q)
    assert float(metrics.vendi_score(x, q)) == pytest.approx(ref, rel=1e-4)
    assert float(metrics.vendi_score_from_kernel(xn @ xn.T, q)) == pytest.approx(ref, rel=1e-4)
    # an RBF kernel (not linear) through the kernel entry point, with normalize=True rescaling
    d2 = np.sum((x[:, None] - x[None]) ** 2, -1)
    k = np.exp(-d2 / d2.mean()) * 3.0  # diagonal 3: normalize=True must undo it
    assert float(metrics.vendi_score_from_kernel(k.astype(np.float32), q, normalize=True)) == pytest.approx(
        vendi.score_K(k, q=q, normalize=True), rel=1e-4)


@pytest.mark.parity
def test_float64_low_rank_kernel_and_score_x_quirk():
    from sklearn.preprocessing import normalize
    from vendi_score import vendi

    x = _x(120, 32, seed=2, rank=6).astype(np.float64)
    xn = normalize(x)
    with jax.enable_x64(True):
        for q in QS:
            # q < 1 weights the float64 noise eigenvalues (~1e-17) of a low-rank K as ~1e-9 each, so
            # even the package's score_K and score_dual differ by 1.3e-7 here: rtol 1e-6 for q = 0.5
            rel = 1e-6 if q == 0.5 else 1e-9
            ref_k, ref_d = vendi.score_K(xn @ xn.T, q=q), vendi.score_dual(x, q=q)
            assert float(metrics.vendi_score(x, q, form="kernel")) == pytest.approx(ref_k, rel=rel)
            assert float(metrics.vendi_score(x, q, form="dual")) == pytest.approx(ref_d, rel=rel)
        # the package's score_X ignores q and always returns q = 1
        assert vendi.score_X(x, q=2) == pytest.approx(float(metrics.vendi_score(x, 1)), rel=1e-9)


@pytest.mark.parity
def test_readme_examples():
    from vendi_score import vendi

    k = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert round(float(metrics.vendi_score_from_kernel(k)), 4) == 2.1573
    samples = np.array([0, 0, 10, 10, 20, 20], np.float64)
    rbf = np.exp(-np.abs(samples[:, None] - samples[None, :]))
    # the README prints 2.9999; the package computes 2.99999999588 (the README truncates)
    assert float(metrics.vendi_score_from_kernel(rbf)) == pytest.approx(2.99999999588, rel=1e-6)
    assert float(metrics.vendi_score_from_kernel(rbf)) == pytest.approx(
        vendi.score(samples, lambda a, b: np.exp(-np.abs(a - b))), rel=1e-5)


def test_sharded_dual_equals_unsharded(mesh8):
    x = _x(1000, 16, seed=3)
    ref = metrics.vendi_score(x, 1, block_size=200)
    xs = jax.device_put(x, NamedSharding(mesh8, P("data", None)))
    got = jax.jit(lambda a: metrics.vendi_score(a, 1, block_size=200))(xs)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    gram = jax.jit(lambda a: metrics.gram_dual(a, block_size=128))(xs)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(gram), xn.T @ xn / len(x), atol=1e-6)


def test_entropy_limits():
    lam = jnp.array([0.5, 0.25, 0.25, 0.0, -1e-9])
    assert float(metrics.entropy_q(lam, 1)) == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)))
    assert float(metrics.entropy_q(lam, 2)) == pytest.approx(-np.log(0.25 + 2 * 0.0625))
    assert float(metrics.entropy_q(lam, "inf")) == pytest.approx(np.log(2))
    # identical points -> 1; orthogonal points -> n
    assert float(metrics.vendi_score(np.ones((50, 8), np.float32))) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics.vendi_score(np.eye(8, dtype=np.float32), 2)) == pytest.approx(8.0, rel=1e-5)


def test_bad_input_errors():
    x = _x(20, 8)
    with pytest.raises(ValueError, match="q must be"):
        metrics.vendi_score(x, 0)
    with pytest.raises(ValueError, match="q must be"):
        metrics.vendi_score(x, "two")
    with pytest.raises(ValueError, match="form must be"):
        metrics.vendi_score(x, form="primal")
    with pytest.raises(ValueError, match="empty"):
        metrics.vendi_score(x[:0])
    bad = x.copy()
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.vendi_score(bad)
    with pytest.raises(ValueError, match="L2-normalised"):
        metrics.vendi_score(x, normalize=False)
    with pytest.raises(ValueError, match="all-zero row"):
        metrics.vendi_score(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="unit diagonal"):
        metrics.vendi_score_from_kernel(2 * np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="square"):
        metrics.vendi_score_from_kernel(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="symmetric"):
        metrics.vendi_score_from_kernel(np.array([[1.0, 0.5], [0.0, 1.0]], np.float32))


def test_vmap_over_sets():
    xs = np.stack([_x(300, 16, seed=s) for s in range(3)])  # three [n, d] sets
    got = jax.vmap(lambda a: metrics.vendi_score(a, 2, block_size=128))(xs)
    want = [float(metrics.vendi_score(x, 2, block_size=128)) for x in xs]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
