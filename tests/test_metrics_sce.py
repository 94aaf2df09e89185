"""SCE against a float64 numpy oracle of the reference algorithm.

The oracle transcribes `aziksh-ospanov/scendi-score:scendi/metric/algorithm_utils.py`
(`cov_rff2`, `rff_schur_complement`, `schur_vendi_from_eigs`, `rff_sce_from_feats`)
line by line in float64 numpy, with its quirks: pinv of (C_xx + 1e-12 I) with an
explicit rtol, eigh of the unsymmetrised complement, eigenvalues clamped to 1e-10
and the unnormalised entropy exp(-sum l log(l / sum l)).

Tolerances:
- float64 (`jax.enable_x64`), primal and dual: rtol 1e-10 (same algorithm, measured ~1e-15).
- float32 inputs: rtol 1e-4 (float32 RFF features and eigenvalues; near-zero eigenvalues
  become noise of ~1e-8 instead of the 1e-10 clamp; measured <= 1e-6).
"""

import jax
import numpy as np
import pytest

from clipjax import metrics


def _oracle(x, y, omega, rtol):
    d_feat = omega.shape[1]
    n = x.shape[0]

    def cov_rff2(v):
        product = v @ omega
        return np.concatenate([np.cos(product), np.sin(product)], axis=1) / np.sqrt(d_feat)

    fx, fy = cov_rff2(x), cov_rff2(y)
    cov_yy = fy.T @ fy / n
    cov_xy = fx.T @ fy / n
    cov_xx = fx.T @ fx / n
    cov_xx = np.linalg.pinv(cov_xx + np.eye(cov_xx.shape[0]) * 1e-12, rtol=rtol)
    complement = cov_yy - cov_xy.T @ cov_xx @ cov_xy
    complement_difference = cov_xy.T @ cov_xx @ cov_xy

    def schur_vendi_from_eigs(e):
        e = np.maximum(e, 1e-10)
        return np.exp(-np.sum(e * np.log(e / np.sum(e))))

    return (schur_vendi_from_eigs(np.linalg.eigh(complement)[0]),
            schur_vendi_from_eigs(np.linalg.eigh(complement_difference)[0]))


def _data(n=96, d=16, n_feat=64, n_prompts=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = 2.0 * rng.normal(size=(n_prompts, d))
    x = prompts[rng.integers(0, n_prompts, n)]  # prompts repeat across images
    y = x + 1.5 * rng.normal(size=(n, d))
    omega = rng.normal(size=(d, n_feat)) / 3.5
    return x, y, omega


@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("case", [dict(), dict(n=200, n_prompts=40, seed=1)])
def test_float64_matches_oracle(form, case):
    x, y, omega = _data(**case)
    rtol = 1e-6
    ref = _oracle(x, y, omega, rtol)
    with jax.enable_x64(True):
        got = metrics.sce_score(x, y, omega, pinv_rtol=rtol, form=form, block_size=40)
    assert float(got.image) == pytest.approx(ref[0], rel=1e-10)
    assert float(got.text) == pytest.approx(ref[1], rel=1e-10)
    assert 1.5 < ref[0] and 1.0 < ref[1]  # both parts are non-trivial


def test_float32_matches_oracle_and_default_rtol():
    x, y, omega = _data()
    rtol = float(np.finfo(np.float32).eps * 2 * omega.shape[1])  # the documented default
    ref = _oracle(x, y, omega, rtol)
    f32 = [a.astype(np.float32) for a in (x, y, omega)]
    for form in ("primal", "dual", "auto"):
        got = metrics.sce_score(*f32, form=form)
        assert float(got.image) == pytest.approx(ref[0], rel=1e-4)
        assert float(got.text) == pytest.approx(ref[1], rel=1e-4)
    jitted = jax.jit(lambda a, b, c: metrics.sce_score(a, b, c, form="dual"))(*f32)
    assert float(jitted.image) == pytest.approx(ref[0], rel=1e-4)


def test_pinv_rtol_decides_the_result():
    # 60 distinct prompts: the spectrum of C_xx decays smoothly, so where pinv cuts it changes
    # the projection and the score (6.23 / 2.92 / 2.60 for rtol 1e-1 / 1e-2 / 1e-3). Much
    # smaller cutoffs (~1e-12) invert rounding noise and are ill-posed in any implementation.
    x, y, omega = _data(n=60, n_feat=24, n_prompts=60, seed=2)
    scores = []
    with jax.enable_x64(True):
        for rtol in (1e-1, 1e-2, 1e-3):
            ref = _oracle(x, y, omega, rtol)
            for form in ("primal", "dual"):
                got = metrics.sce_score(x, y, omega, pinv_rtol=rtol, form=form)
                assert float(got.image) == pytest.approx(ref[0], rel=1e-10)
                assert float(got.text) == pytest.approx(ref[1], rel=1e-10)
            scores.append(float(got.image))
    assert scores[0] > 1.1 * scores[1] > 1.1 * scores[2]


def test_rff_features_and_omega():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    omega = metrics.rff_omega(jax.random.key(0), 7, 300, sigma=3.5)
    assert omega.shape == (7, 300)
    assert float(np.std(np.asarray(omega))) == pytest.approx(1 / 3.5, rel=0.1)
    phi = np.asarray(metrics.rff_features(x, omega))
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-6)  # ||phi|| = 1
    # the RFF kernel approximates exp(-|a-b|^2 / (2 sigma^2))
    big = metrics.rff_omega(jax.random.key(1), 7, 20000, sigma=3.5)
    phi = np.asarray(metrics.rff_features(x, big))
    exact = np.exp(-np.sum((x[:, None] - x[None]) ** 2, -1) / (2 * 3.5 ** 2))
    np.testing.assert_allclose(phi @ phi.T, exact, atol=0.03)


def test_bad_input_errors():
    x, y, omega = (a.astype(np.float32) for a in _data())
    with pytest.raises(ValueError, match="same shape"):
        metrics.sce_score(x[:-1], y, omega)
    with pytest.raises(ValueError, match="omega must have shape"):
        metrics.sce_score(x, y, omega[:-1])
    with pytest.raises(ValueError, match="form must be"):
        metrics.sce_score(x, y, omega, form="kernel")
    with pytest.raises(ValueError, match="pinv_rtol"):
        metrics.sce_score(x, y, omega, pinv_rtol=-1.0)
    bad = y.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.sce_score(x, bad, omega)
    with pytest.raises(ValueError, match="empty"):
        metrics.sce_score(x[:0], y[:0], omega)
