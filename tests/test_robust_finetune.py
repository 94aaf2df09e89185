"""Adversarial fine-tuning losses (`clipjax.robust.finetune`) against the official definitions.

References (robustness.md items 2 and 13), each written here independently of the JAX code:
- TeCoA (`ZSRobust4FoundationModel:finetuning.py:train`): numpy CE of 100 cos; torch float64
  `F.cross_entropy` for the gradient.
- PMG-AFT (`PMG_AFT.py:train`): numpy with torch semantics (`KLDivLoss(reduction="sum")(input,
  target) = sum xlogy(target, target) - target * input`, input = log_softmax(z_clean or z0), target =
  softmax(z_adv)); gradients against torch float64 autograd of the literal official expression,
  including the undetached z_clean.
- FARE (`RobustVLM:train/adversarial_training_clip.py:l2`): numpy mean over the batch of the
  per-example sum of squares; its PGD (`train/pgd_train.py:pgd`) transcribed in float64 numpy for a
  piecewise-linear tower with analytic gradient, delta_0 injected (also a tower with NaN gradients,
  which the official code zeroes, and pixels crossing a ReLU kink, where only the momentum moves them).
- AdvFLYP (`Sxing2/AdvFLYP:code/training_epoch.py:train_epoch_laion`, `code/func.py:kl_div`): numpy
  oracle of the value and torch float64 autograd of the literal official expression (`p.log()`,
  `torch.norm`) for gradients, also at the first step where f_theta = f_0 (zero feature difference).

Tolerances: JAX in float64 (`jax.enable_x64`) against float64 oracles: rtol 1e-12 on values and
gradients (observed ~1e-15), and 1e-12 on PGD images. AdvFLYP's contrastive part is
`clipjax.losses.clip_loss`, which computes in float32 whatever the input: its values get rtol 1e-6
(logits up to 100 carry float32 rounding ~100 * 2**-24 = 6e-6 absolute, on losses of order 1-10) and
its gradients atol 1e-5 * max(1, max|g|). float32 runs: rtol 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.robust import finetune

EPS, ALPHA = 4 / 255, 1 / 255


# ---------------------------------------------------------------- float64 numpy oracles
def _log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def _cross_entropy_mean(z, y):
    return float(np.mean(-_log_softmax(z)[np.arange(len(y)), y]))


def _kldiv_loss(inp, target, reduction):
    """torch `nn.KLDivLoss(reduction)(inp, target)`: pointwise target * (log target - inp)."""
    point = np.where(target > 0, target * np.log(np.where(target > 0, target, 1.0)), 0.0) - target * inp
    return float(point.sum() if reduction == "sum" else point.sum() / inp.shape[0])


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def tecoa_oracle(img, W, y, scale=100.0):
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    return _cross_entropy_mean(scale * cos, y)


def pmg_aft_oracle(z_adv, z_clean, z0, y, w_clean=1.0, w_frozen=1.0, reduction="sum"):
    target = np.exp(_log_softmax(z_adv))
    return (_cross_entropy_mean(z_adv, y) + w_clean * _kldiv_loss(_log_softmax(z_clean), target, reduction)
            + w_frozen * _kldiv_loss(_log_softmax(z0), target, reduction))


def clip_loss_oracle(a, t, s):
    """Symmetric InfoNCE of the official `(CE(logits_per_image) + CE(logits_per_text)) / 2`."""
    z, labels = s * a @ t.T, np.arange(len(a))
    return (_cross_entropy_mean(z, labels) + _cross_entropy_mean(z.T, labels)) / 2


def advflyp_oracle(a, t, s, c, a0, s0, w_logit, w_feature):
    z = s * a @ t.T
    loss = clip_loss_oracle(a, t, s)
    loss += w_feature * (np.linalg.norm(a - a0, axis=1).mean() + np.linalg.norm(a - c, axis=1).mean())
    p = np.exp(_log_softmax(z))

    def kl(q_logits):
        return float(np.mean(np.sum(p * (np.log(p) - _log_softmax(q_logits)), axis=1)))

    return loss + w_logit * (kl(s0 * a0 @ t.T) + kl(s * c @ t.T))


# ---------------------------------------------------------------- TeCoA
def test_tecoa_matches_oracle():
    rng = np.random.default_rng(0)
    img, W, y = 3.0 * rng.normal(size=(6, 16)), rng.normal(size=(5, 16)), rng.integers(0, 5, 6)
    ref = tecoa_oracle(img, W, y)
    got32 = finetune.tecoa_loss(img.astype(np.float32), W.astype(np.float32), y)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(float(got32), ref, rtol=1e-5)
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(finetune.tecoa_loss(img, W, y)), ref, rtol=1e-12)
        np.testing.assert_allclose(float(finetune.tecoa_loss(img, W, y, scale=10.0)), tecoa_oracle(img, W, y, 10.0),
                                   rtol=1e-12)
        np.testing.assert_allclose(float(jax.jit(finetune.tecoa_loss)(img, W, y)), ref, rtol=1e-12)


@pytest.mark.parity
def test_tecoa_gradient_matches_torch():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(1)
    img, W, y = rng.normal(size=(6, 16)), rng.normal(size=(5, 16)), rng.integers(0, 5, 6)
    ti = torch.tensor(img, requires_grad=True)
    F.cross_entropy(100.0 * F.normalize(ti, dim=-1) @ F.normalize(torch.tensor(W), dim=-1).T,
                    torch.tensor(y)).backward()
    with jax.enable_x64(True):
        g = jax.grad(finetune.tecoa_loss)(jnp.asarray(img), jnp.asarray(W), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(g), ti.grad.numpy(), rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- PMG-AFT
def _pmg_inputs(seed=0, B=6, C=7):
    rng = np.random.default_rng(seed)
    z_adv = 3.0 * rng.normal(size=(B, C))
    return z_adv, z_adv + rng.normal(size=(B, C)), 3.0 * rng.normal(size=(B, C)), rng.integers(0, C, B)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
def test_pmg_aft_matches_oracle(reduction):
    z_adv, z_clean, z0, y = _pmg_inputs()
    with jax.enable_x64(True):
        for w_clean, w_frozen in ((1.0, 1.0), (0.5, 2.0), (0.0, 1.0)):
            got = finetune.pmg_aft_loss(z_adv, z_clean, z0, y, w_clean=w_clean, w_frozen=w_frozen,
                                        kl_reduction=reduction)
            ref = pmg_aft_oracle(z_adv, z_clean, z0, y, w_clean, w_frozen, reduction)
            np.testing.assert_allclose(float(got), ref, rtol=1e-12)
    # "sum" weighs the KL terms by the batch size relative to "batchmean"
    kl_sum = pmg_aft_oracle(z_adv, z_clean, z0, y, reduction="sum") - _cross_entropy_mean(z_adv, y)
    kl_mean = pmg_aft_oracle(z_adv, z_clean, z0, y, reduction="batchmean") - _cross_entropy_mean(z_adv, y)
    np.testing.assert_allclose(kl_sum, len(y) * kl_mean, rtol=1e-12)
    # the direction is discriminated: KL(p_clean || p_adv) gives another number
    flipped = _kldiv_loss(_log_softmax(z_adv), np.exp(_log_softmax(z_clean)), "sum")
    assert abs(flipped - _kldiv_loss(_log_softmax(z_clean), np.exp(_log_softmax(z_adv)), "sum")) > 1e-3
    np.testing.assert_allclose(float(finetune.pmg_aft_loss(*(a.astype(np.float32) for a in (z_adv, z_clean, z0)), y)),
                               pmg_aft_oracle(z_adv, z_clean, z0, y), rtol=1e-5)


@pytest.mark.parity
def test_pmg_aft_gradients_match_official_torch_expression():
    """Gradients flow into z_clean (the official code does not detach it) and into z_adv as KL target."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    z_adv, z_clean, z0, y = _pmg_inputs(seed=3)
    output, output_clean, output_ori = (torch.tensor(a, requires_grad=True) for a in (z_adv, z_clean, z0))
    criterion_kl = nn.KLDivLoss(reduction="sum")
    loss_advori = criterion_kl(F.log_softmax(output_ori, dim=1), F.softmax(output, dim=1))
    loss_advclean = criterion_kl(F.log_softmax(output_clean, dim=1), F.softmax(output, dim=1))
    loss = nn.CrossEntropyLoss()(output, torch.tensor(y)) + loss_advclean + loss_advori
    loss.backward()
    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(finetune.pmg_aft_loss, argnums=(0, 1, 2))(
            jnp.asarray(z_adv), jnp.asarray(z_clean), jnp.asarray(z0), jnp.asarray(y))
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-12)
    for g, t in zip(grads, (output, output_clean, output_ori)):
        np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), rtol=1e-10, atol=1e-13)
    assert np.abs(np.asarray(grads[1])).max() > 1e-2  # z_clean is not detached


def test_pmg_aft_bad_inputs():
    z_adv, z_clean, z0, y = _pmg_inputs()
    with pytest.raises(ValueError, match="kl_reduction must be one of"):
        finetune.pmg_aft_loss(z_adv, z_clean, z0, y, kl_reduction="mean")
    with pytest.raises(ValueError, match="labels must lie in \\[0, 7\\)"):
        finetune.pmg_aft_loss(z_adv, z_clean, z0, np.full(6, 7))
    with pytest.raises(ValueError, match="must have the same shape"):
        finetune.pmg_aft_loss(z_adv, z_clean[:, :5], z0, y)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        finetune.pmg_aft_loss(z_adv, z_clean, z0, y.astype(np.float32))


# ---------------------------------------------------------------- FARE loss
def test_fare_loss_is_batch_mean_of_squared_distances():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, 5, 16))
    ref = np.mean(np.sum((a - b) ** 2, axis=1))
    with jax.enable_x64(True):
        np.testing.assert_allclose(float(finetune.fare_loss(a, b)), ref, rtol=1e-12)
        grad = jax.grad(finetune.fare_loss)(jnp.asarray(a), jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(grad), 2 * (a - b) / len(a), rtol=1e-12)
    np.testing.assert_allclose(float(finetune.fare_loss(a.astype(np.float32), b.astype(np.float32))), ref, rtol=1e-5)
    assert not np.isclose(ref, np.mean((a - b) ** 2))  # not the mean over all elements
    with pytest.raises(ValueError, match="must have the same shape"):
        finetune.fare_loss(a, b[:, :8])
    with pytest.raises(ValueError, match="emb_adv has 5 non-finite"):
        finetune.fare_loss(np.where(np.arange(16) == 3, np.inf, a), b)


# ---------------------------------------------------------------- FARE PGD
KINK, NAN_BELOW = 0.5, 0.3


def _tower_jax(W, nan_grad):
    """Piecewise-linear tower W relu(v - KINK); `nan_grad` adds a term with value 0 but NaN gradient
    wherever v < NAN_BELOW (0 * sqrt of a negative number behind `where`)."""

    def f(x):
        v = x.reshape(x.shape[0], -1)
        emb = jax.nn.relu(v - KINK) @ jnp.asarray(W, x.dtype).T
        if nan_grad:
            emb = emb + 0.0 * jnp.sum(jnp.where(v > NAN_BELOW, jnp.sqrt(v - NAN_BELOW), 0.0), axis=1, keepdims=True)
        return emb

    return f


def official_fare_pgd(W, X, target, delta0, *, eps, stepsize, iterations, momentum, nan_grad):
    """`pgd(norm="linf", mode="max")` with loss `l2(reduction="mean")` for the tower above, float64."""
    B = X.shape[0]
    assert X.max() < 1.0 + 1e-6 and X.min() > -1e-6
    perturbation = delta0.copy()
    velocity = np.zeros_like(X)
    for _ in range(iterations):
        v = (X + perturbation).reshape(B, -1)
        out = np.maximum(v - KINK, 0.0) @ W.T
        gradient = ((2.0 / B) * (out - target) @ W) * (v > KINK)  # d/dv of mean_b ||out_b - target_b||^2
        if nan_grad:
            gradient[v < NAN_BELOW] = np.nan
        gradient = gradient.reshape(X.shape)
        gradient[np.isnan(gradient)] = 0.0
        gradient = np.sign(gradient)  # normalize_grad(p="linf")
        velocity = momentum * velocity + gradient
        velocity = np.sign(velocity)
        perturbation = perturbation + stepsize * velocity
        perturbation = np.clip(perturbation, -eps, eps)  # project_perturbation
        perturbation = np.clip(X + perturbation, 0, 1) - X
    return X + perturbation


@pytest.mark.parametrize("nan_grad,steps,momentum", [(False, 10, 0.9), (True, 10, 0.9), (False, 3, 0.0),
                                                     (False, 0, 0.9)])
def test_fare_pgd_matches_official_float64(nan_grad, steps, momentum):
    rng = np.random.default_rng(5)
    X = rng.uniform(0.0, 1.0, (4, 6, 6, 3))
    X[:, 0, 0] = [0.0, 1.0, KINK]  # the clamp to [0, 1] and the kink are both hit
    W, W0 = rng.normal(size=(2, 8, X[0].size))
    target = np.maximum(X.reshape(4, -1) - KINK, 0.0) @ W0.T  # frozen f_0(x)
    delta0 = rng.uniform(-EPS, EPS, X.shape)
    ref = official_fare_pgd(W, X, target, delta0, eps=EPS, stepsize=ALPHA, iterations=steps, momentum=momentum,
                            nan_grad=nan_grad)
    with jax.enable_x64(True):
        fn = jax.jit(functools.partial(finetune.fare_pgd, _tower_jax(W, nan_grad), eps=EPS, steps=steps,
                                       momentum=momentum))
        got = np.asarray(fn(jnp.asarray(X), jnp.asarray(target), None, delta0=jnp.asarray(delta0)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    if steps:
        assert got.min() >= 0 and got.max() <= 1 and np.abs(got - X).max() <= EPS + 1e-12
        moved = np.abs(got - (X + delta0)) > 1e-9
        assert moved.mean() > 0.3  # the attack acted
    else:  # no clamp of the start to the image, as in the official code
        assert got.min() < 0 and got.max() > 1


def test_fare_pgd_increases_the_loss_and_bad_inputs():
    rng = np.random.default_rng(6)
    X = jnp.asarray(rng.uniform(0.55, 1.0, (3, 6, 6, 3)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(8, 108)), jnp.float32)
    tower = _tower_jax(W, False)
    target = tower(X)
    adv = finetune.fare_pgd(tower, X, target, jax.random.key(0), eps=EPS)
    start = X + jax.random.uniform(jax.random.key(0), X.shape, X.dtype, -EPS, EPS)
    assert float(finetune.fare_loss(tower(adv), target)) > 10 * float(finetune.fare_loss(tower(start), target))
    with pytest.raises(ValueError, match="x must hold pixels in \\[0, 1\\]"):
        finetune.fare_pgd(tower, X + 0.5, target, jax.random.key(0), eps=EPS)
    with pytest.raises(ValueError, match="eps must be in \\[0, 1\\]"):
        finetune.fare_pgd(tower, X, target, jax.random.key(0), eps=4.0)
    with pytest.raises(ValueError, match="target_emb must have shape \\[B, E\\] with B = 3"):
        finetune.fare_pgd(tower, X, target[:2], jax.random.key(0), eps=EPS)
    with pytest.raises(ValueError, match="key is None"):
        finetune.fare_pgd(tower, X, target, None, eps=EPS)
    with pytest.raises(ValueError, match="delta0 must lie in"):
        finetune.fare_pgd(tower, X, target, None, eps=EPS, delta0=jnp.full(X.shape, 0.1))


# ---------------------------------------------------------------- AdvFLYP
def _advflyp_inputs(seed=0, B=5, E=16):
    rng = np.random.default_rng(seed)
    a, t = _unit(rng, B, E), _unit(rng, B, E)
    c = a + 0.3 * rng.normal(size=(B, E))
    a0 = a + 0.2 * rng.normal(size=(B, E))
    return a, t, c / np.linalg.norm(c, axis=1, keepdims=True), a0 / np.linalg.norm(a0, axis=1, keepdims=True)


@pytest.mark.parametrize("w_logit,w_feature,s0", [(1.0, 1.0, None), (0.0, 0.0, None), (2.0, 0.0, 50.0),
                                                  (0.0, 0.5, None)])
def test_advflyp_matches_oracle(w_logit, w_feature, s0):
    a, t, c, a0 = _advflyp_inputs()
    ref = advflyp_oracle(a, t, 100.0, c, a0, 100.0 if s0 is None else s0, w_logit, w_feature)
    with jax.enable_x64(True):
        got = finetune.advflyp_loss(a, t, 100.0, img_clean=c, img_frozen_adv=a0, frozen_logit_scale=s0,
                                    w_logit=w_logit, w_feature=w_feature)
        np.testing.assert_allclose(float(got), ref, rtol=1e-6)
        # the regularisers alone (contrastive part subtracted in float64) are exact
        base = advflyp_oracle(a, t, 100.0, c, a0, 100.0, 0.0, 0.0)
        contrastive = float(finetune.advflyp_loss(a, t, 100.0, w_logit=0.0, w_feature=0.0))
        np.testing.assert_allclose(contrastive, base, rtol=1e-6)
        np.testing.assert_allclose(float(got) - contrastive, ref - base, rtol=1e-6, atol=1e-6)
    if w_logit or w_feature:
        assert abs(ref - base) > 1e-2  # the regularisers contribute


@pytest.mark.parity
@pytest.mark.parametrize("first_step", [False, True])
def test_advflyp_gradients_match_official_torch_expression(first_step):
    """Literal transcription of `train_epoch_laion` in torch float64 (text and frozen features as inputs)."""
    import torch
    import torch.nn.functional as F

    a, t, c, a0 = _advflyp_inputs(seed=2)
    if first_step:  # f_theta = f_0 at the first step: ||a - a0|| = 0 exactly
        a0 = a.copy()
    A, T, Cc = (torch.tensor(v, requires_grad=True) for v in (a, t, c))
    A0, scale = torch.tensor(a0), torch.tensor(100.0, dtype=torch.float64)
    logits_per_image, logits_per_text = A @ T.t() * scale, T @ A.t() * scale
    labels = torch.arange(len(a))
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2.0
    feat_reg1 = torch.norm(A - A0, dim=-1).mean()
    feat_reg2 = torch.norm(A - Cc, dim=-1).mean()
    loss = loss + 1.0 * (feat_reg1 + feat_reg2)

    def kl_div(p_logits, q_logits):
        return (p_logits * (p_logits.log() - q_logits.log())).sum(dim=1).mean()

    adv_logits_per_image = A0 @ T.t() * scale
    clean_logits_per_image = Cc @ T.t() * scale
    l_general = kl_div(logits_per_image.softmax(dim=1), adv_logits_per_image.softmax(dim=1))
    l_clean = kl_div(logits_per_image.softmax(dim=1), clean_logits_per_image.softmax(dim=1))
    loss = loss + 1.0 * (l_general + l_clean)
    loss.backward()

    def fn(a_, t_, c_):
        return finetune.advflyp_loss(a_, t_, 100.0, img_clean=c_, img_frozen_adv=jnp.asarray(a0), validate=False)

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(jnp.asarray(a), jnp.asarray(t), jnp.asarray(c))
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-6)
    for g, ref in zip(grads, (A, T, Cc)):
        g, r = np.asarray(g), ref.grad.numpy()
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * max(1.0, np.abs(r).max()))
    assert np.abs(np.asarray(grads[2])).max() > 1e-2  # the clean features are not detached


def test_advflyp_bad_inputs():
    a, t, c, a0 = _advflyp_inputs()
    with pytest.raises(ValueError, match="needs img_clean and img_frozen_adv"):
        finetune.advflyp_loss(a, t, 100.0)
    with pytest.raises(ValueError, match="needs img_frozen_adv"):
        finetune.advflyp_loss(a, t, 100.0, img_clean=c)
    with pytest.raises(ValueError, match="img_adv must be L2-normalised"):
        finetune.advflyp_loss(2 * a, t, 100.0, w_logit=0.0, w_feature=0.0)
    with pytest.raises(ValueError, match="img_frozen_adv must be L2-normalised"):
        finetune.advflyp_loss(a, t, 100.0, img_clean=c, img_frozen_adv=3 * a0)
    with pytest.raises(ValueError, match="must have the same shape"):
        finetune.advflyp_loss(a, t, 100.0, img_clean=c[:3], img_frozen_adv=a0)
    with pytest.raises(ValueError, match="w_logit must be a finite number >= 0"):
        finetune.advflyp_loss(a, t, 100.0, img_clean=c, img_frozen_adv=a0, w_logit=-1.0)
    # jittable with traced embeddings and scale
    got = jax.jit(lambda *v: finetune.advflyp_loss(v[0], v[1], v[2], img_clean=v[3], img_frozen_adv=v[4]))(
        *(jnp.asarray(v, jnp.float32) for v in (a, t, 100.0, c, a0)))
    np.testing.assert_allclose(float(got), advflyp_oracle(a, t, 100.0, c, a0, 100.0, 1.0, 1.0), rtol=1e-5)


def test_tecoa_bad_inputs():
    rng = np.random.default_rng(0)
    img, W = rng.normal(size=(4, 16)), rng.normal(size=(5, 16))
    with pytest.raises(ValueError, match="labels must lie in \\[0, 5\\)"):
        finetune.tecoa_loss(img, W, np.array([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="labels must have shape \\[B\\] with B = 4"):
        finetune.tecoa_loss(img, W, np.array([0, 1]))
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        finetune.tecoa_loss(img, W[:, :8], np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="class_weights has an all-zero row"):
        finetune.tecoa_loss(img, np.zeros_like(W), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="scale must be a positive finite scalar"):
        finetune.tecoa_loss(img, W, np.array([0, 1, 2, 3]), scale=-1.0)


# ---------------------------------------------------------------- AdvFLYP attack (attack_pgd_captions)
def official_pgd_captions_linear(W, T, s, X, delta0, *, eps, alpha, attack_iters):
    """`attack_pgd_captions` (l_inf) for the linear tower u = W vec(x), float64, with the gradient of
    (CE(logits_per_image) + CE(logits_per_text)) / 2 written analytically."""
    B = X.shape[0]
    delta = _clamp01_delta(delta0, X)
    for _ in range(attack_iters):
        u = (X + delta).reshape(B, -1) @ W.T
        n = np.linalg.norm(u, axis=1, keepdims=True)
        a = u / n
        Z = s * a @ T.T
        d_Z = ((np.exp(_log_softmax(Z)) - np.eye(B)) + (np.exp(_log_softmax(Z.T)) - np.eye(B)).T) / (2 * B)
        d_a = s * d_Z @ T
        d_u = (d_a - a * np.sum(d_a * a, axis=1, keepdims=True)) / n
        grad = (d_u @ W).reshape(X.shape)
        d = np.clip(delta + alpha * np.sign(grad), -eps, eps)
        delta = _clamp01_delta(d, X)
    return X + delta


def _clamp01_delta(delta, X):
    return np.maximum(np.minimum(delta, 1.0 - X), 0.0 - X)


def test_advflyp_attack_objective_sums_to_contrastive_loss_and_drives_official_pgd():
    from clipjax.robust import attacks

    rng = np.random.default_rng(8)
    X = rng.uniform(0.0, 1.0, (4, 5, 5, 3))
    X[:, 0, 0] = [0.0, 1.0, 0.5]
    W, T = rng.normal(size=(16, X[0].size)), _unit(rng, 4, 16)
    delta0 = rng.uniform(-EPS, EPS, X.shape)
    ref = official_pgd_captions_linear(W, T, 100.0, X, delta0, eps=EPS, alpha=ALPHA, attack_iters=3)
    with jax.enable_x64(True):
        tower = lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(W, x.dtype).T  # noqa: E731
        objective = finetune.advflyp_attack_objective(tower, jnp.asarray(T), 100.0)
        rows = np.asarray(objective(jnp.asarray(X)))
        u = X.reshape(4, -1) @ W.T
        assert rows.shape == (4,)
        a = u / np.linalg.norm(u, axis=1, keepdims=True)
        np.testing.assert_allclose(rows.sum(), 4 * clip_loss_oracle(a, T, 100.0), rtol=1e-12)
        got = attacks.pgd(objective, jnp.asarray(X), eps=EPS, alpha=ALPHA, steps=3, delta0=jnp.asarray(delta0))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-12)
    assert np.abs(np.asarray(got) - X - _clamp01_delta(delta0, X)).max() > 0.5 * ALPHA  # the attack moved
    with pytest.raises(ValueError, match="txt must be L2-normalised"):
        finetune.advflyp_attack_objective(tower, 2 * T, 100.0)
