"""TTC (`clipjax.robust.ttc`) against transcriptions of the official `tau_thres_weighted_counterattacks`.

References (robustness.md item 3): `Sxing2/CLIP-Test-time-Counterattacks:code/test_time_counterattack.py`
(`tau_thres_weighted_counterattacks`, `compute_tau`), transcribed twice, independently of the JAX
code: in float64 numpy for a linear "tower" f(x) = W vec(x) whose gradient is written analytically
(d/d delta sum_b ||W vec(delta_b)||^2 = 2 W^T W vec(delta_b)), and in torch float64 autograd on a
random-init tiny open_clip ViT (converted by clipjax). delta_0 is injected on both sides.

Tolerances:
- linear tower, JAX in float64 (`jax.enable_x64`): same algorithm, so x_defended and tau agree to
  1e-12 (observed ~1e-16) and the counterattack mask is identical.
- tiny ViT, JAX float32 vs torch float64: tau rtol 1e-3 (observed 2e-5: the embedding difference
  cancels ~2 digits of float32); the threshold sits in a gap of the taus 5% wide, so the masks must
  agree exactly. Pixels agree to 1e-6 (float32 rounding of values <= 1) except where the float64
  gradient of some step is below 1e-3 of its example's largest one: there float32 noise may flip
  sign(g) (observed 2 of 18432 entries, at relative gradients 1e-6 and 1e-5); such flips must stay
  under 0.1% of the entries.
- default step weights: equal to the published [0.0159, 0.1173, 0.8668] at 4 decimals.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.robust import ttc

EPS, ALPHA = 4 / 255, 1 / 255


# ---------------------------------------------------------------- float64 numpy transcription (linear tower)
def _clamp(x, lower, upper):
    """The official `clamp(X, lower, upper) = max(min(X, upper), lower)`."""
    return np.maximum(np.minimum(x, upper), lower)


def official_ttc_linear(W, X, delta0, *, eps, alpha, attack_iters, tau_thres, beta, W_tau=None):
    """`tau_thres_weighted_counterattacks` for f(x) = W vec(x) (W_tau: `clip_visual` of an AFT victim)."""
    B = X.shape[0]

    def f(W_, a):
        return a.reshape(B, -1) @ W_.T

    delta = _clamp(delta0, 0.0 - X, 1.0 - X)
    if attack_iters == 0:  # official early return: random noise only
        return X + delta, None
    diff_ratio = None
    if W_tau is not None:  # compute_tau(clip_visual, X, delta)
        orig, noisy = f(W_tau, X), f(W_tau, X + delta)
        diff_ratio = np.linalg.norm(noisy - orig, axis=-1) / np.linalg.norm(orig, axis=-1)
    X_ori_reps = f(W, X)
    X_ori_norm = np.linalg.norm(X_ori_reps, axis=-1)
    deltas_per_step = [delta.copy()]
    for step_id in range(attack_iters):
        X_att_reps = f(W, X + delta)
        if step_id == 0 and diff_ratio is None:
            diff_ratio = np.linalg.norm(X_att_reps - X_ori_reps, axis=-1) / X_ori_norm
        scheme_sign = np.sign(tau_thres - diff_ratio)
        grad = (2.0 * (X_att_reps - X_ori_reps) @ W).reshape(X.shape)  # analytic gradient of l2_loss
        d = np.clip(delta + alpha * np.sign(grad), -eps, eps)
        d = _clamp(d, 0.0 - X, 1.0 - X)
        delta = d
        deltas_per_step.append(delta.copy())
    Delta = np.stack(deltas_per_step, axis=1)  # [B, N + 1, H, W, C]
    weights = np.broadcast_to(np.arange(attack_iters + 1)[None], (B, attack_iters + 1))
    weights = np.exp(scheme_sign[:, None] * weights * beta)
    weights = weights / weights.sum(axis=1, keepdims=True)
    weights_hard = np.zeros_like(weights)
    weights_hard[:, 0] = 1.0
    weights = np.where(scheme_sign[:, None] > 0, weights, weights_hard)
    return X + (weights[:, :, None, None, None] * Delta).sum(axis=1), diff_ratio


def _mixed_batch(rng, n_bright=4, n_dark=3, size=4):
    """Bright images (tau ~ 0.01, counterattacked) and near-black ones (tau >> 0.2, noise only).

    Pixels reach 0 and 1, so the [-x, 1 - x] clamp is active in both groups."""
    bright = rng.uniform(0.0, 1.0, (n_bright, size, size, 3))
    bright[:, 0, 0, :] = [0.0, 1.0, 0.5]
    dark = 0.01 * rng.uniform(0.0, 1.0, (n_dark, size, size, 3))
    return np.concatenate([bright, dark])


def _linear(W):
    return lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(W, x.dtype).T


# ---------------------------------------------------------------- tests
def test_default_weights_match_published():
    np.testing.assert_array_equal(np.round(ttc.counterattack_weights(), 4), [0.0159, 0.1173, 0.8668])
    np.testing.assert_allclose(ttc.counterattack_weights(3, 1.0), np.exp([0, 1, 2, 3]) / np.exp([0, 1, 2, 3]).sum(),
                               rtol=1e-15)


@pytest.mark.parametrize("steps,beta,eps,tau_thres", [(2, 2.0, EPS, 0.2), (3, 1.0, 8 / 255, 0.2),
                                                      (1, 2.0, EPS, 0.5), (0, 2.0, EPS, 0.2)])
def test_linear_tower_matches_official_float64(steps, beta, eps, tau_thres):
    rng = np.random.default_rng(steps)
    X = _mixed_batch(rng)
    W = rng.normal(size=(8, X[0].size))
    delta0 = rng.uniform(-eps, eps, X.shape)
    ref, ref_tau = official_ttc_linear(W, X, delta0, eps=eps, alpha=ALPHA, attack_iters=steps,
                                       tau_thres=tau_thres, beta=beta)
    with jax.enable_x64(True):
        fn = jax.jit(functools.partial(ttc.tau_thresholded_counterattack, _linear(W), eps=eps, alpha=ALPHA,
                                       steps=steps, beta=beta, tau_thres=tau_thres))
        out, info = fn(jnp.asarray(X), None, delta0=jnp.asarray(delta0))
        out, tau, mask = np.asarray(out), np.asarray(info["tau"]), np.asarray(info["counterattack"])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(info["delta"]), out - X, atol=1e-12)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - X).max() <= eps + 1e-12
    if steps:
        np.testing.assert_allclose(tau, ref_tau, rtol=1e-12)
        np.testing.assert_array_equal(mask, ref_tau < tau_thres)
        assert mask.any() and not mask.all(), "the batch must hold examples on both sides of tau_thres"
        # the examples above the threshold keep exactly the (clipped) noise
        np.testing.assert_allclose(out[~mask], (X + _clamp(delta0, -X, 1 - X))[~mask], atol=1e-15)


def test_victim_tower_with_original_tau_tower():
    """AFT victims: counterattack the victim, compute tau with the original tower (`compute_tau`)."""
    rng = np.random.default_rng(7)
    X = _mixed_batch(rng)
    W_victim, W_orig = rng.normal(size=(2, 8, X[0].size))
    delta0 = rng.uniform(-EPS, EPS, X.shape)
    ref, ref_tau = official_ttc_linear(W_victim, X, delta0, eps=EPS, alpha=ALPHA, attack_iters=2,
                                       tau_thres=0.2, beta=2.0, W_tau=W_orig)
    with jax.enable_x64(True):
        out, info = ttc.tau_thresholded_counterattack(_linear(W_victim), jnp.asarray(X), None,
                                                      delta0=jnp.asarray(delta0), tau_embed_fn=_linear(W_orig))
        out, tau = np.asarray(out), np.asarray(info["tau"])
    np.testing.assert_allclose(tau, ref_tau, rtol=1e-12)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    # tau from the victim itself would differ: the argument is really used
    own = np.linalg.norm(_clamp(delta0, -X, 1 - X).reshape(len(X), -1) @ W_victim.T, axis=1)
    assert not np.allclose(own / np.linalg.norm(X.reshape(len(X), -1) @ W_victim.T, axis=1), ref_tau, rtol=1e-3)


def test_random_noise_draw_is_uniform_in_the_ball_and_kept_above_threshold():
    rng = np.random.default_rng(3)
    X = jnp.asarray(_mixed_batch(rng, n_bright=2, n_dark=2, size=16), jnp.float32)
    W = rng.normal(size=(8, 16 * 16 * 3)).astype(np.float32)
    out, info = jax.jit(functools.partial(ttc.tau_thresholded_counterattack, _linear(W)))(X, jax.random.key(0))
    again, _ = ttc.tau_thresholded_counterattack(_linear(W), X, jax.random.key(0))
    other, _ = ttc.tau_thresholded_counterattack(_linear(W), X, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    assert not np.array_equal(np.asarray(out), np.asarray(other))
    mask = np.asarray(info["counterattack"])
    np.testing.assert_array_equal(mask, [True, True, False, False])
    noise = np.asarray(jax.random.uniform(jax.random.key(0), X.shape, jnp.float32, -EPS, EPS))
    expect = np.clip(noise, -np.asarray(X), 1 - np.asarray(X))  # the same draw, clipped to the image
    np.testing.assert_allclose(np.asarray(info["delta"])[2:], expect[2:], atol=1e-7)
    # the draw fills the ball: U(-eps, eps) has mean |d| = eps / 2 on unclipped pixels
    free = np.asarray(X)[:2] > EPS
    free &= np.asarray(X)[:2] < 1 - EPS
    assert abs(np.abs(noise[:2][free]).mean() - EPS / 2) < 0.05 * EPS
    assert np.abs(np.asarray(out) - np.asarray(X)).max() <= EPS * (1 + 1e-6)


def test_bad_inputs():
    X = jnp.full((2, 4, 4, 3), 0.5)
    f = _linear(np.ones((3, 48)))
    key = jax.random.key(0)
    for eps in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps must be in \\[0, 1\\]"):
            ttc.tau_thresholded_counterattack(f, X, key, eps=eps)
    with pytest.raises(TypeError, match="eps must be a Python number"):
        ttc.tau_thresholded_counterattack(f, X, key, eps=jnp.asarray(0.1))
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\].*1\.2"):
        ttc.tau_thresholded_counterattack(f, X.at[0, 0, 0, 0].set(1.2), key)
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\].*-0\.1"):
        ttc.tau_thresholded_counterattack(f, X.at[1, 0, 0, 0].set(-0.1), key)
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        ttc.tau_thresholded_counterattack(f, X.at[1, 0, 0, 0].set(jnp.nan), key)
    with pytest.raises(ValueError, match=r"x must have shape \[B, H, W, C\]"):
        ttc.tau_thresholded_counterattack(f, X[0], key)
    with pytest.raises(ValueError, match="delta0 must lie in \\[-eps, eps\\]"):
        ttc.tau_thresholded_counterattack(f, X, None, delta0=jnp.full(X.shape, 5 / 255))
    with pytest.raises(ValueError, match="delta0 must have the same shape"):
        ttc.tau_thresholded_counterattack(f, X, None, delta0=jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(ValueError, match="key is None"):
        ttc.tau_thresholded_counterattack(f, X, None)
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        ttc.tau_thresholded_counterattack(f, X, key, steps=-1)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        ttc.tau_thresholded_counterattack(f, X, key, alpha=-1 / 255)
    with pytest.raises(ValueError, match=r"embed_fn\(x\) must return one embedding per image"):
        ttc.tau_thresholded_counterattack(lambda x: jnp.ones((3, 5)), X, key)
    # inside jit the pixel range of a tracer cannot be read; static checks still fire at trace time
    with pytest.raises(ValueError, match="eps must be in"):
        jax.jit(lambda x: ttc.tau_thresholded_counterattack(f, x, key, eps=2.0))(X)


# ---------------------------------------------------------------- tiny open_clip ViT, torch float64 transcription
def official_ttc_torch(encode, X, delta0, *, eps, alpha, attack_iters, tau_thres, beta):
    """The official function on a torch model, float64; also returns each step's gradient."""
    import torch

    X = torch.as_tensor(X)
    delta = torch.max(torch.min(torch.as_tensor(delta0), 1 - X), 0 - X).clone()
    delta.requires_grad = True
    with torch.no_grad():
        X_ori_reps = encode(X)
        X_ori_norm = torch.norm(X_ori_reps, dim=-1)
    deltas_per_step, grads = [delta.data.clone()], []
    for step_id in range(attack_iters):
        X_att_reps = encode(X + delta)
        if step_id == 0:
            diff_ratio = torch.norm(X_att_reps - X_ori_reps, dim=-1) / X_ori_norm
        scheme_sign = (tau_thres - diff_ratio).sign()
        l2_loss = (((X_att_reps - X_ori_reps) ** 2).sum(1)).sum()
        grad = torch.autograd.grad(l2_loss, delta)[0]
        grads.append(grad.numpy())
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-eps, max=eps)
        d = torch.max(torch.min(d, 1 - X), 0 - X)
        delta.data[:] = d
        deltas_per_step.append(delta.data.clone())
    Delta = torch.stack(deltas_per_step, dim=1)
    weights = torch.arange(attack_iters + 1).unsqueeze(0).expand(X.size(0), -1)
    weights = torch.exp(scheme_sign.view(-1, 1) * weights * beta)
    weights /= weights.sum(dim=1, keepdim=True)
    weights_hard = torch.zeros_like(weights)
    weights_hard[:, 0] = 1.0
    weights = torch.where(scheme_sign.unsqueeze(1) > 0, weights, weights_hard)
    out = X + (weights.view(X.size(0), attack_iters + 1, 1, 1, 1) * Delta).sum(dim=1)
    return out.detach().numpy(), diff_ratio.detach().numpy(), np.stack(grads)


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from helpers import open_clip_and_clipjax

    tm, model = open_clip_and_clipjax(tmp_path_factory.mktemp("tiny_vit"))
    return tm.double(), model


@pytest.mark.parity
def test_tiny_vit_matches_official_torch_float64(tiny_vit, photos):
    import skimage.transform
    import torch

    from clipjax.models import clip as clip_model

    tm, model = tiny_vit
    cfg = model.config
    mean, std = np.asarray(cfg.preprocess.mean), np.asarray(cfg.preprocess.std)
    small = [skimage.transform.resize(p, (32, 32), anti_aliasing=True) for p in photos]
    X = np.clip(np.stack(small + [0.3 * small[0], 0.5 + 0.5 * small[1]]), 0.0, 1.0)
    delta0 = np.random.default_rng(0).uniform(-EPS, EPS, X.shape)

    def torch_encode(x):
        return tm.encode_image(((x - torch.as_tensor(mean)) / torch.as_tensor(std)).permute(0, 3, 1, 2))

    def jax_encode(x):
        pixels = (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)
        return clip_model.encode_image(model.params, pixels, config=cfg, normalize=False)

    _, taus, _ = official_ttc_torch(torch_encode, X, delta0, eps=EPS, alpha=ALPHA, attack_iters=2, tau_thres=0.2,
                                    beta=2.0)
    st = np.sort(taus)
    gap = int(np.argmax(np.diff(st)[1:-1])) + 1  # a threshold with examples on both sides
    thres = float((st[gap] + st[gap + 1]) / 2)
    assert (st[gap + 1] - st[gap]) / thres > 0.05
    ref, ref_tau, grads = official_ttc_torch(torch_encode, X, delta0, eps=EPS, alpha=ALPHA, attack_iters=2,
                                             tau_thres=thres, beta=2.0)
    out, info = jax.jit(functools.partial(ttc.tau_thresholded_counterattack, jax_encode, tau_thres=thres))(
        jnp.asarray(X, jnp.float32), None, delta0=jnp.asarray(delta0, jnp.float32))
    np.testing.assert_allclose(np.asarray(info["tau"]), ref_tau, rtol=1e-3)
    mask = np.asarray(info["counterattack"])
    np.testing.assert_array_equal(mask, ref_tau < thres)
    assert mask.any() and not mask.all()
    wrong = np.abs(np.asarray(out, np.float64) - ref) > 1e-6
    g = np.abs(grads)  # [steps, B, H, W, C]
    ambiguous = (g < 1e-3 * g.max(axis=(2, 3, 4), keepdims=True)).any(axis=0)
    assert not (wrong & ~ambiguous).any(), f"{int((wrong & ~ambiguous).sum())} pixels differ at clear gradients"
    assert wrong.mean() < 1e-3
