"""Global-view contrastive losses against open_clip and float64 numpy oracles.

Tolerances: float32 JAX vs float32 torch (open_clip) runs the same formula
in a different summation order, so values agree to rtol 1e-5; logits up to
100 carry float32 rounding of about 100 * 2**-24 = 6e-6, so gradients get
atol 1e-5 * max(1, max|g|) (a wrong formula is off by O(|g|)). Against the
float64 numpy oracles the same float32 rounding dominates: rtol 2e-5 on
values; full gradients are checked against central finite differences of the
oracle (eps 1e-6 in float64, error ~1e-10) with atol 2e-5 * max(1, max|g|)
(observed at most 2.2e-6, for Long-CLIP at scale 100 through the SVD).
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from clipjax import checks
from clipjax.losses import (
    clip_loss,
    cloob_loss,
    distill_loss,
    longclip_loss,
    longclip_short_loss,
    principal_component_reconstruction,
    siglip_loss,
)


def _unit(rng, b, d, dtype=np.float32):
    x = rng.normal(size=(b, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


# ---------------------------------------------------------------- float64 numpy oracles

def _lse(z, axis):
    m = np.max(z, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def np_smoothed_ce(logits, eps):
    lse = _lse(logits, 1)
    return lse - (1 - eps) * np.diag(logits) - eps * logits.mean(1)


def np_clip(x, y, s, eps=0.0):
    z = s * x @ y.T
    return 0.5 * (np_smoothed_ce(z, eps).mean() + np_smoothed_ce(z.T, eps).mean())


def np_hopfield(xi, p, beta):
    a = beta * xi @ p.T
    a = np.exp(a - a.max(1, keepdims=True))
    a /= a.sum(1, keepdims=True)
    out = a @ p
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def np_info_loob(a, b, inv_tau):
    k = inv_tau * a @ b.T
    n = k.shape[0]
    masked = np.where(np.eye(n, dtype=bool), -1000.0, k)
    return np.mean(_lse(masked, 1) - np.diag(k)) / inv_tau


def np_cloob(x, y, inv_tau, beta):
    u_x, v_x = np_hopfield(x, x, beta), np_hopfield(y, x, beta)
    u_y, v_y = np_hopfield(x, y, beta), np_hopfield(y, y, beta)
    return np_info_loob(u_x, v_x, inv_tau) + np_info_loob(v_y, u_y, inv_tau)


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_distill(x, y, s, tx, ty, ts):
    zs, zt = s * x @ y.T, ts * tx @ ty.T

    def h(t, st_):
        log_p = st_ - _lse(st_, 1)[:, None]
        return -np.mean(np.sum(np_softmax(t) * log_p, 1))

    return 0.5 * (h(zt, zs) + h(zt.T, zs.T))


def np_pca(x, k, groups=1):
    out = []
    for g in np.split(x, groups):
        mean = g.mean(0, keepdims=True)
        c = g - mean
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        v = vt[:k].T
        out.append(c @ v @ v.T + mean)
    return np.concatenate(out)


def np_siglip(x, y, s, b):
    """open_clip `SigLipLoss._loss`: -sum log sigmoid(label * (s x y^T + b)) / B, label +1 on the diagonal."""
    z = s * x @ y.T + b
    labels = 2 * np.eye(len(x)) - 1
    return np.sum(np.logaddexp(0, -labels * z)) / len(x)


def np_longclip(x, yl, ys, s, k, eps=0.1, groups=1):
    return np_clip(x, yl, s, eps) + np_clip(np_pca(x, k, groups), ys, s, eps)


def fd_grad(f, args, eps=1e-6):
    """Central finite-difference gradient of a float64 scalar function w.r.t. every arg."""
    grads = []
    for i, a in enumerate(args):
        a = np.array(a, np.float64)
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            hi, lo = a.copy(), a.copy()
            hi[idx] += eps
            lo[idx] -= eps
            g[idx] = (f(*args[:i], hi, *args[i + 1:]) - f(*args[:i], lo, *args[i + 1:])) / (2 * eps)
        grads.append(g)
    return grads


def assert_grads_close(got, want, rel=2e-5):
    for g, w in zip(got, want):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=rel * max(1.0, np.abs(w).max()))


# ---------------------------------------------------------------- open_clip parity

@pytest.fixture(scope="module")
def oc():
    import torch
    from open_clip.loss import ClipLoss, DistillClipLoss, SigLipLoss

    return torch, ClipLoss, SigLipLoss, DistillClipLoss


def _torch_leaf(torch, a):
    return torch.tensor(np.asarray(a, np.float32), requires_grad=True)


_clip_vg = jax.jit(jax.value_and_grad(clip_loss, argnums=(0, 1, 2)))
_clip_bias_vg = jax.jit(jax.value_and_grad(clip_loss, argnums=(0, 1, 2, 3)))
_siglip_vg = jax.jit(jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3)), static_argnames="negative_only")


@pytest.mark.parity
@pytest.mark.parametrize("b,d", [(2, 8), (7, 16), (64, 64)])
@pytest.mark.parametrize("scale,bias", [(1.0, None), (14.285, None), (100.0, -2.5)])
def test_clip_loss_matches_open_clip(oc, b, d, scale, bias):
    torch, ClipLoss, _, _ = oc
    rng = np.random.default_rng(b * 31 + d)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    tx, ty, ts = _torch_leaf(torch, x), _torch_leaf(torch, y), _torch_leaf(torch, scale)
    tb = None if bias is None else _torch_leaf(torch, bias)
    ref = ClipLoss()(tx, ty, ts, tb)
    ref.backward()

    if bias is None:
        val, grads = _clip_vg(x, y, scale)
    else:
        val, grads = _clip_bias_vg(x, y, scale, bias)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    assert_grads_close(grads[:3], [tx.grad.numpy(), ty.grad.numpy(), ts.grad.numpy()], rel=1e-5)
    if bias is not None:  # softmax is shift invariant: both give exactly zero
        np.testing.assert_allclose(float(grads[3]), tb.grad.item(), atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize("b,d", [(2, 8), (7, 16), (64, 64)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (117.0, 3.0)])
@pytest.mark.parametrize("negative_only", [False, True])
def test_siglip_loss_matches_open_clip(oc, b, d, scale, bias, negative_only):
    torch, _, SigLipLoss, _ = oc
    rng = np.random.default_rng(b * 17 + d)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    tx, ty, ts, tb = (_torch_leaf(torch, v) for v in (x, y, scale, bias))
    ref = SigLipLoss()._loss(tx, ty, ts, tb, negative_only=negative_only)
    ref.backward()
    val, grads = _siglip_vg(x, y, scale, bias, negative_only=negative_only)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    want = [tx.grad.numpy(), ty.grad.numpy(), ts.grad.numpy(), tb.grad.numpy()]
    assert_grads_close(grads, want, rel=1e-5)


@pytest.mark.parity
def test_siglip_forward_matches_open_clip_module(oc):
    """The public `SigLipLoss.forward` (world_size=1) equals `siglip_loss`."""
    torch, _, SigLipLoss, _ = oc
    rng = np.random.default_rng(5)
    x, y = _unit(rng, 16, 32), _unit(rng, 16, 32)
    ref = SigLipLoss()(*(torch.tensor(v) for v in (x, y, np.float32(10.0), np.float32(-10.0))))
    np.testing.assert_allclose(float(siglip_loss(x, y, 10.0, -10.0)), ref.item(), rtol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_matches_torch_cross_entropy(oc, eps):
    torch = oc[0]
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    x, y = _unit(rng, 12, 16), _unit(rng, 12, 16)
    tx, ty = _torch_leaf(torch, x), _torch_leaf(torch, y)
    logits = 30.0 * tx @ ty.T
    labels = torch.arange(12)
    ref = (F.cross_entropy(logits, labels, label_smoothing=eps)
           + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2
    ref.backward()
    val, (gx, gy) = jax.jit(jax.value_and_grad(lambda a, b: clip_loss(a, b, 30.0, label_smoothing=eps), (0, 1)))(x, y)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    assert_grads_close((gx, gy), (tx.grad.numpy(), ty.grad.numpy()), rel=1e-6)
    np.testing.assert_allclose(float(val), np_clip(x.astype(np.float64), y.astype(np.float64), 30.0, eps),
                               rtol=2e-5)


@pytest.mark.parity
@pytest.mark.parametrize("b", [4, 24])
def test_distill_loss_matches_open_clip(oc, b):
    torch, _, _, DistillClipLoss = oc
    rng = np.random.default_rng(b)
    x, y = _unit(rng, b, 16), _unit(rng, b, 16)
    tx_, ty_ = _unit(rng, b, 24), _unit(rng, b, 24)
    leaves = [_torch_leaf(torch, v) for v in (x, y, 20.0, tx_, ty_, 50.0)]
    contrastive, distill = DistillClipLoss()(*leaves)
    distill.backward()
    args = (x, y, 20.0, tx_, ty_, 50.0)
    val, grads = jax.jit(jax.value_and_grad(distill_loss, argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(float(val), distill.item(), rtol=1e-5)
    assert_grads_close(grads, [leaves[i].grad.numpy() for i in range(3)], rel=1e-6)
    np.testing.assert_allclose(float(clip_loss(x, y, 20.0)), contrastive.item(), rtol=1e-5)
    f64 = [np.asarray(a, np.float64) for a in args]
    np.testing.assert_allclose(float(val), np_distill(*f64), rtol=2e-5)


# ---------------------------------------------------------------- numpy oracles (CLOOB, distill, Long-CLIP)

_cloob_vg = jax.jit(jax.value_and_grad(lambda x, y, t, beta: cloob_loss(x, y, t, hopfield_beta=beta), (0, 1, 2)))


@pytest.mark.parametrize("b,d,inv_tau,beta", [(6, 5, 14.3, 14.3), (6, 5, 30.0, 8.0), (3, 4, 100.0, 1.0)])
def test_cloob_matches_numpy_oracle(b, d, inv_tau, beta):
    rng = np.random.default_rng(b + d)
    x, y = _unit(rng, b, d, np.float64), _unit(rng, b, d, np.float64)
    want = np_cloob(x, y, inv_tau, beta)
    val, grads = _cloob_vg(x.astype(np.float32), y.astype(np.float32), inv_tau, beta)
    np.testing.assert_allclose(float(val), want, rtol=2e-5)
    fd = fd_grad(lambda a, c, t: np_cloob(a, c, float(t), beta), [x, y, np.float64(inv_tau)])
    assert_grads_close(grads, fd, rel=2e-5)


def test_distill_matches_numpy_oracle_gradients():
    rng = np.random.default_rng(11)
    args = [_unit(rng, 5, 4, np.float64), _unit(rng, 5, 4, np.float64), np.float64(7.0),
            _unit(rng, 5, 3, np.float64), _unit(rng, 5, 3, np.float64), np.float64(12.0)]
    val, grads = jax.jit(jax.value_and_grad(distill_loss, argnums=(0, 1, 2, 3, 4, 5)))(
        *[np.asarray(a, np.float32) for a in args])
    np.testing.assert_allclose(float(val), np_distill(*args), rtol=2e-5)
    assert_grads_close(grads, fd_grad(np_distill, args), rel=2e-5)


def test_pca_reconstruction_matches_numpy():
    rng = np.random.default_rng(0)
    x = _unit(rng, 64, 48)
    pca = jax.jit(principal_component_reconstruction, static_argnums=(1, 2))
    np.testing.assert_allclose(np.asarray(pca(x, 32, 1)), np_pca(x.astype(np.float64), 32), atol=2e-5)
    np.testing.assert_allclose(np.asarray(pca(x, 5, 4)), np_pca(x.astype(np.float64), 5, groups=4), atol=2e-5)
    # rank <= B - 1 <= k: the reconstruction is the input itself
    np.testing.assert_allclose(np.asarray(pca(x[:16], 32, 1)), x[:16], atol=2e-5)


@pytest.mark.parametrize("b,d,k,groups", [(10, 6, 3, 1), (6, 10, 2, 1), (12, 6, 2, 2)])
def test_longclip_loss_matches_numpy_oracle(b, d, k, groups):
    rng = np.random.default_rng(b * d + k)
    x, yl, ys = (_unit(rng, b, d, np.float64) for _ in range(3))
    s = 100.0
    want = np_longclip(x, yl, ys, s, k, 0.1, groups)
    fn = lambda *a: longclip_loss(*a, num_components=k, pca_groups=groups)  # noqa: E731
    val, grads = jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3)))(*(a.astype(np.float32) for a in (x, yl, ys)), s)
    np.testing.assert_allclose(float(val), want, rtol=2e-5)
    fd = fd_grad(lambda a, c, e, t: np_longclip(a, c, e, float(t), k, 0.1, groups), [x, yl, ys, np.float64(s)])
    assert_grads_close(grads, fd, rel=2e-5)  # observed <= 2.2e-6 with scale 100 through the SVD


def test_longclip_short_loss_is_the_pca_term():
    rng = np.random.default_rng(1)
    x, ys = _unit(rng, 40, 36, np.float64), _unit(rng, 40, 36, np.float64)
    got = float(jax.jit(longclip_short_loss)(x.astype(np.float32), ys.astype(np.float32), 100.0))
    np.testing.assert_allclose(got, np_clip(np_pca(x, 32), ys, 100.0, 0.1), rtol=2e-5)


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("loss", ["clip", "siglip", "cloob"])
def test_bf16_inputs_are_computed_in_float32(loss):
    rng = np.random.default_rng(2)
    x = jnp.asarray(_unit(rng, 32, 64), jnp.bfloat16)
    y = jnp.asarray(_unit(rng, 32, 64), jnp.bfloat16)
    x64, y64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(y.astype(jnp.float32), np.float64)
    if loss == "clip":
        fn, want = (lambda a, c: clip_loss(a, c, 100.0)), np_clip(x64, y64, 100.0)
    elif loss == "siglip":
        z = 100.0 * x64 @ y64.T - 10.0
        fn, want = (lambda a, c: siglip_loss(a, c, 100.0, -10.0)), (np.sum(np.logaddexp(0, z)) - np.trace(z)) / 32
    else:
        fn, want = (lambda a, c: cloob_loss(a, c, 100.0)), np_cloob(x64, y64, 100.0, 14.3)
    got, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(x, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=2e-5)  # float32, not bf16 (~4e-3), rounding
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    # in value: the bf16 gradients are the float32 gradients of the same (bf16-valued) inputs, rounded to bf16
    # (relative error <= 2^-8 of each tensor's largest entry)
    ref = jax.grad(fn, (0, 1))(x.astype(jnp.float32), y.astype(jnp.float32))
    for g, r in zip(grads, ref):
        err = float(jnp.abs(g.astype(jnp.float32) - r).max())
        assert err <= 2.0**-8 * float(jnp.abs(r).max()), (loss, err)


# ---------------------------------------------------------------- properties

# shapes come from a small set so the jitted losses compile a handful of times
_pairs = st.tuples(st.sampled_from([(2, 3), (5, 4), (9, 8)]), st.integers(0, 2**31 - 1),
                   st.floats(0.5, 50.0), st.floats(-10.0, 5.0))


@jax.jit
def _all_losses(x, y, scale, bias):
    return jnp.stack([clip_loss(x, y, scale, label_smoothing=0.1), siglip_loss(x, y, scale, bias),
                      cloob_loss(x, y, scale, hopfield_beta=8.0), distill_loss(x, y, scale, y, x, 2.0)])


@jax.jit
def _swapped(x, y, scale, bias):
    return jnp.stack([clip_loss(x, y, scale, bias), clip_loss(y, x, scale, bias),
                      siglip_loss(x, y, scale, bias), siglip_loss(y, x, scale, bias)])


@settings(max_examples=20, deadline=None)
@given(_pairs)
def test_permuting_pairs_together_leaves_losses_unchanged(params):
    (b, d), seed, scale, bias = params
    rng = np.random.default_rng(seed)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    perm = rng.permutation(b)
    np.testing.assert_allclose(np.asarray(_all_losses(x[perm], y[perm], scale, bias)),
                               np.asarray(_all_losses(x, y, scale, bias)), rtol=2e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(_pairs)
def test_clip_loss_is_symmetric_in_images_and_texts(params):
    (b, d), seed, scale, bias = params
    rng = np.random.default_rng(seed)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    got = np.asarray(_swapped(x, y, scale, bias))
    np.testing.assert_allclose(got[1], got[0], rtol=2e-6, atol=1e-6)
    # the sigmoid loss sums over all pairs, so it is symmetric too (CLOOB is not in general)
    np.testing.assert_allclose(got[3], got[2], rtol=2e-6, atol=1e-6)


def test_losses_are_jittable_and_pure():
    """One jitted sum of the four losses, called twice: the same value both times, equal to the sum of the float64
    numpy oracles of every term (rtol 2e-5, as the other oracle comparisons)."""
    rng = np.random.default_rng(4)
    x, y = _unit(rng, 8, 4), _unit(rng, 8, 4)
    f = jax.jit(lambda a, c, s: clip_loss(a, c, s, label_smoothing=0.1) + siglip_loss(a, c, s, -1.0)
                + cloob_loss(a, c, s) + longclip_loss(a, c, c[::-1], s, num_components=2))
    first, second = f(x, y, 5.0), f(x, y, 5.0)
    assert float(first) == float(second)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    terms = [np_clip(x64, y64, 5.0, 0.1), np_siglip(x64, y64, 5.0, -1.0), np_cloob(x64, y64, 5.0, 14.3),
             np_longclip(x64, y64, y64[::-1], 5.0, 2, 0.1)]
    assert min(abs(t) for t in terms) > 0.1  # every term contributes
    np.testing.assert_allclose(float(first), sum(terms), rtol=2e-5)


# ---------------------------------------------------------------- bad input

def test_bad_inputs_raise_clear_errors():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"same shape \[B, D\].*\(4, 3\) and \(5, 3\)"):
        clip_loss(x, np.ones((5, 3), np.float32), 1.0)
    with pytest.raises(TypeError, match="same dtype.*float32 and bfloat16"):
        clip_loss(x, jnp.ones((4, 3), jnp.bfloat16), 1.0)
    with pytest.raises(TypeError, match="floating"):
        siglip_loss(np.ones((4, 3), np.int32), np.ones((4, 3), np.int32), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"shape \[B, D\] \(rank 2\)"):
        clip_loss(np.ones(4, np.float32), np.ones(4, np.float32), 1.0)
    with pytest.raises(ValueError, match=r"needs B >= 2, got shape \(1, 3\)"):
        cloob_loss(x[:1], x[:1], 1.0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="image_features has 1 non-finite"):
        clip_loss(bad, x, 1.0)
    with pytest.raises(ValueError, match="text_features has 1 non-finite"):
        siglip_loss(x, bad, 1.0, 0.0)
    with pytest.raises(ValueError, match="logit_scale has 1 non-finite"):
        clip_loss(x, x, np.float32(np.inf))
    with pytest.raises(ValueError, match=r"logit_scale must be a scalar.*\(2,\)"):
        clip_loss(x, x, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="needs logit_bias"):
        siglip_loss(x, x, 1.0, None)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\]"):
        clip_loss(x, x, 1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="teacher batch 3 differs"):
        distill_loss(x, x, 1.0, x[:3], x[:3], 1.0)
    with pytest.raises(ValueError, match="not divisible into 3 PCA groups"):
        longclip_loss(x, x, x, 1.0, pca_groups=3)
    # static checks also fire at trace time under jit
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(lambda a, c: clip_loss(a, c, 1.0))(x, np.ones((4, 2), np.float32))


def test_check_finite_skips_tracers_and_names_arrays():
    # the losses' finite check is `clipjax.checks.finite` (tests/test_checks.py covers it in full)
    checks.finite("a", np.ones(3))
    checks.finite("b", None)
    with pytest.raises(ValueError, match="b has 2 non-finite"):
        checks.finite("b", np.array([np.inf, np.nan, 1.0]))
    # under jit the value check is skipped (it cannot see values), the loss still runs: all logits equal, so
    # each cross-entropy is log 3 (the numpy oracle agrees)
    x = np.ones((3, 2), np.float32)
    got = float(jax.jit(lambda a: clip_loss(a, a, 1.0))(x))
    np.testing.assert_allclose(got, np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(got, np_clip(x.astype(np.float64), x.astype(np.float64), 1.0), rtol=1e-6)
