"""`clipjax.robust` attacks: PGD against float64 oracles and open_clip, APGD behaviour, sharding, bad input.

References and tolerances:
- PGD (L-inf CE and CW, L2 CE) on a linear "CLIP" (pixels -> CLIP mean/std -> W x -> normalise ->
  100 cos with unit class rows) against a float64 numpy transcription of TeCoA's `attack_pgd` /
  `attack_CW` (L-inf) and torchattacks 3.5.1 `PGDL2` (L2), whose gradient is written analytically: both
  sides in float64 (`jax.enable_x64`) from the same injected delta0 (and from 0 with random_start=False):
  max abs difference 1e-10. sign() ties cannot occur: no gradient entry is below 1e-9 times its image's
  largest (the test asserts it; a saturated softmax makes whole gradients tiny, not single entries).
- PGD on a tiny random-init open_clip ViT (width 32, 1 layer, 32 px) converted by clipjax (float32)
  against the same PGD written in torch float64 on the open_clip model, same delta0, 3 steps: at least
  99% of the pixels equal within 1e-6 and every pixel within 2 alpha (a sign flip at a near-zero gradient
  moves one pixel by at most 2 alpha per step); measured: 100% equal, max difference 8e-6 / 255.
- APGD: stays in the eps ball and [0, 1] (L-inf and L2, to float rounding 1e-6); is at least as strong as
  PGD-10 with the same eps on real digits; restarts only add fooled points and keep the first run's
  adversarial point; eps = 0 leaves every image unchanged.
- robust_accuracy: clean accuracy and eps = 0 bookkeeping against numpy argmax of the oracle's logits
  (exact), padding of the last batch, protocol settings, worst case over attacks.
- PGD's result is a constant for autodiff apart from x (d loss params = 0, d x_adv / dx = 1 inside [0, 1]).
- Sharding, same key: PGD on a tiny clipjax ViT with the batch sharded over the 8-device mesh equals the
  unsharded run (1e-6) and stays sharded; robust_accuracy (linear CLIP, APGD-CE) gives the same flags.
- Bad input: ValueError naming eps, x, labels, attack, protocol, norm, loss, class_weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax.robust.apgd import apgd, apgd_targeted
from clipjax.robust.attacks import pgd, pgd_classifier
from clipjax.robust.evaluate import PROTOCOLS, robust_accuracy, zero_shot_logits_fn

MEAN = np.array((0.48145466, 0.4578275, 0.40821073))
STD = np.array((0.26862954, 0.26130258, 0.27577711))


# ----------------------------------------------------------------------------- a linear "CLIP" on real digits
@pytest.fixture(scope="module")
def linear():
    """16 px digits (sklearn, nearest 2x upsampling, grey -> RGB); A [768, 24] random; class rows: the
    normalised, centred class means of the training half's embeddings (a real, imperfect classifier)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.repeat(np.repeat(data.images / 16.0, 2, 1), 2, 2)[..., None].repeat(3, -1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16 * 16 * 3, 24)) / 16.0
    emb = _unit(((x[::2] - MEAN) / STD).reshape(len(x[::2]), -1) @ a)
    means = np.stack([emb[data.target[::2] == k].mean(0) for k in range(10)])
    t = _unit(means - means.mean(0))
    return dict(x=x[1::2][:48], y=data.target[1::2][:48], a=a, t=t)


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def np_logits(x, a, t):
    z = ((x - MEAN) / STD).reshape(len(x), -1) @ a
    return 100.0 * _unit(z) @ t.T


def np_grad(x, y, a, t, loss):
    """d sum_b loss_b / dx of the linear CLIP, analytically (float64)."""
    z = ((x - MEAN) / STD).reshape(len(x), -1) @ a
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    u = z / norm
    logits = 100.0 * u @ t.T
    onehot = np.eye(t.shape[0])[y]
    if loss == "margin":  # -z_y
        g_logits = -onehot
    elif loss == "ce":
        p = np.exp(logits - logits.max(1, keepdims=True))
        g_logits = p / p.sum(1, keepdims=True) - onehot
    else:  # -relu(z_y - max((1 - m) z - 1e4 m) + 50)
        wrong = (1 - onehot) * logits - 1e4 * onehot
        j = wrong.argmax(1)
        margin = (logits * onehot).sum(1) - wrong.max(1) + 50.0
        g_logits = -(margin > 0).astype(float)[:, None] * (onehot - np.eye(t.shape[0])[j])
    g_u = 100.0 * g_logits @ t
    g_z = (g_u - u * np.sum(u * g_u, axis=1, keepdims=True)) / norm
    return (g_z @ a.T).reshape(x.shape) / STD


def np_pgd_linf(x, y, a, t, delta0, eps, alpha, steps, loss, grads=None):
    """TeCoA attack_pgd / attack_CW (l_inf)."""
    delta = np.minimum(np.maximum(delta0, -x), 1 - x)
    for _ in range(steps):
        g = np_grad(x + delta, y, a, t, loss)
        if grads is not None:
            grads.append(g)
        delta = np.clip(delta + alpha * np.sign(g), -eps, eps)
        delta = np.minimum(np.maximum(delta, -x), 1 - x)
    return x + delta


def np_pgd_l2(x, y, a, t, delta0, eps, alpha, steps, grads=None):
    """torchattacks PGDL2.forward after its random start (the start is delta0)."""
    adv = np.clip(x + delta0, 0, 1)
    for _ in range(steps):
        g = np_grad(adv, y, a, t, "ce")
        if grads is not None:
            grads.append(g)
        g = g / (np.linalg.norm(g.reshape(len(g), -1), axis=1) + 1e-10)[:, None, None, None]
        adv = adv + alpha * g
        delta = adv - x
        n = np.linalg.norm(delta.reshape(len(delta), -1), axis=1)
        delta = delta * np.minimum(eps / n, 1.0)[:, None, None, None]
        adv = np.clip(x + delta, 0, 1)
    return adv


def _relative_min(g):
    """The smallest |gradient entry| of each image relative to that image's largest (sign() tie risk)."""
    flat = np.abs(g.reshape(len(g), -1))
    live = flat.max(1) > 0  # an exactly saturated softmax gives an all-zero gradient: no step on either side
    return float((flat[live].min(1) / flat[live].max(1)).min())


def jax_logits(a, t):
    a, t = jnp.asarray(a), jnp.asarray(t)

    def logits_fn(x):
        mean, std = MEAN.astype(x.dtype), STD.astype(x.dtype)  # no float64 constants in float32 traces
        z = ((x - mean) / std).reshape(x.shape[0], -1) @ a
        return 100.0 * (z / jnp.linalg.norm(z, axis=1, keepdims=True)) @ t.T

    return logits_fn


# ----------------------------------------------------------------------------- PGD vs the float64 oracle
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("start", ["delta0", "zero"])
def test_pgd_linf_matches_tecoa_oracle(linear, loss, start):
    x, y, a, t = linear["x"][:16], linear["y"][:16], linear["a"], linear["t"]
    eps, alpha, steps = 3 / 255, 1 / 255, 6
    delta0 = np.random.default_rng(1).uniform(-eps, eps, x.shape) if start == "delta0" else np.zeros_like(x)
    grads = []
    ref = np_pgd_linf(x, y, a, t, delta0, eps, alpha, steps, loss, grads)
    assert min(_relative_min(g) for g in grads) > 1e-9  # no sign() ties to worry about
    with jax.enable_x64(True):
        kw = dict(delta0=delta0) if start == "delta0" else dict(random_start=False)
        adv = np.asarray(pgd_classifier(jax_logits(a, t), x, y, eps=eps, alpha=alpha, steps=steps, loss=loss, **kw))
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, ref, rtol=0, atol=1e-10)
    assert np.abs(adv - x).max() <= eps + 1e-12 and adv.min() >= 0 and adv.max() <= 1
    assert np.abs(adv - x).max() > eps / 2  # the attack moved


@pytest.mark.parametrize("start", ["delta0", "zero"])
def test_pgd_l2_matches_torchattacks_oracle(linear, start):
    x, y, a, t = linear["x"][:16], linear["y"][:16], linear["a"], linear["t"]
    eps, alpha, steps = 0.5, 0.2, 5
    rng = np.random.default_rng(2)
    delta0 = np.zeros_like(x)
    if start == "delta0":
        n = rng.normal(size=x.shape)
        delta0 = n / np.linalg.norm(n.reshape(len(n), -1), axis=1)[:, None, None, None] * eps * rng.uniform(
            size=(len(n), 1, 1, 1))
    grads = []
    ref = np_pgd_l2(x, y, a, t, delta0, eps, alpha, steps, grads)
    assert min(_relative_min(g) for g in grads) > 1e-9
    with jax.enable_x64(True):
        kw = dict(delta0=delta0) if start == "delta0" else dict(random_start=False)
        adv = np.asarray(pgd_classifier(jax_logits(a, t), x, y, eps=eps, alpha=alpha, steps=steps, norm="l2", **kw))
    np.testing.assert_allclose(adv, ref, rtol=0, atol=1e-10)
    norms = np.linalg.norm((adv - x).reshape(len(x), -1), axis=1)
    assert norms.max() <= eps + 1e-9 and np.median(norms) > 0.1


def test_pgd_generic_loss_and_random_start(linear):
    """`pgd` with a user loss: the random start lies in the ball, a key is needed, and one step from
    delta0 = 0 with alpha = eps lands on x + eps * sign(grad) (clipped to [0, 1])."""
    x, y, a, t = linear["x"][:8].astype(np.float32), linear["y"][:8], linear["a"], linear["t"]
    f = jax_logits(a.astype(np.float32), t.astype(np.float32))

    def margin(z):  # the negative true-class logit, a loss of its own
        return -jnp.take_along_axis(f(z), jnp.asarray(y)[:, None], axis=1)[:, 0]

    eps = 2 / 255
    one = np.asarray(pgd(margin, x, None, eps=eps, alpha=eps, steps=1, random_start=False))
    g = np_grad(x.astype(np.float64), y, a, t, "margin")
    assert np.abs(g).min() > 1e-6
    np.testing.assert_allclose(one, np.clip(x + eps * np.sign(g), 0, 1), atol=1e-7)
    rand = np.asarray(pgd(margin, x, jax.random.key(0), eps=eps, alpha=0.0, steps=1))
    assert np.abs(rand - x).max() <= eps + 1e-7 and np.abs(rand - x).max() > eps / 2
    # delta is a constant for autodiff (TeCoA detaches it): d x_adv / dx = 1, nothing flows to the loss
    for norm in ("linf", "l2"):
        def attacked(scale, z):
            return jnp.sum(pgd(lambda u: scale * margin(u), z, None, eps=eps, alpha=eps, steps=2, norm=norm,
                               random_start=False))

        d_scale, d_x = jax.grad(attacked, argnums=(0, 1))(1.0, jnp.asarray(x))
        assert float(d_scale) == 0.0
        adv = np.asarray(pgd(margin, x, None, eps=eps, alpha=eps, steps=2, norm=norm, random_start=False))
        inside = (adv > 0) & (adv < 1)  # L2's final clip to [0, 1] passes no gradient at the bounds
        np.testing.assert_array_equal(np.asarray(d_x)[inside], 1.0)
    with pytest.raises(ValueError, match="key"):
        pgd(margin, x, None, eps=eps, alpha=eps, steps=1)
    with pytest.raises(ValueError, match="one loss per example"):
        pgd(lambda z: jnp.sum(margin(z)), x, None, eps=eps, alpha=eps, steps=1, random_start=False)


# ----------------------------------------------------------------------------- PGD vs torch on open_clip
@pytest.fixture
def torch_one_thread():
    """torch on one thread for a tiny model: on a shared 2-core machine its OpenMP threads make each step
    about 20x slower (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parity
def test_pgd_vit_matches_torch_open_clip(tmp_path, torch_one_thread):

    import torch


    from helpers import open_clip_and_clipjax

    tm, model = open_clip_and_clipjax(tmp_path)
    tm = tm.double()

    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.repeat(np.repeat(data.images[:12] / 16.0, 4, 1), 4, 2)[..., None].repeat(3, -1)
    y = data.target[:12]
    rng = np.random.default_rng(0)
    w = _unit(rng.normal(size=(10, 16)))
    eps, alpha, steps = 4 / 255, 1 / 255, 3
    delta0 = rng.uniform(-eps, eps, size=x.shape)

    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    wt = torch.tensor(w)
    big_x, big_y = torch.tensor(x), torch.tensor(y)

    def torch_logits(pix):  # NHWC in [0, 1] -> TeCoA's zero-shot logits, float64
        z = tm.encode_image((pix.permute(0, 3, 1, 2) - mean) / std)
        return 100.0 * (z / z.norm(dim=-1, keepdim=True)) @ wt.T

    delta = torch.max(torch.min(torch.tensor(delta0), 1 - big_x), -big_x)  # TeCoA attack_pgd, l_inf
    for _ in range(steps):
        delta.requires_grad_(True)
        g, = torch.autograd.grad(torch.nn.functional.cross_entropy(torch_logits(big_x + delta), big_y), delta)
        delta = torch.clamp(delta.detach() + alpha * torch.sign(g), -eps, eps)
        delta = torch.max(torch.min(delta, 1 - big_x), -big_x)
    ref = (big_x + delta).numpy()

    f = zero_shot_logits_fn(model.params, model.config, w.astype(np.float32))
    adv = np.asarray(pgd_classifier(f, x.astype(np.float32), y, eps=eps, alpha=alpha, steps=steps,
                                    delta0=delta0.astype(np.float32)))
    diff = np.abs(adv - ref)
    assert (diff < 1e-6).mean() >= 0.99, (diff < 1e-6).mean()
    assert diff.max() <= 2 * alpha + 1e-6
    assert np.abs(ref - x).max() > eps / 2


# ----------------------------------------------------------------------------- APGD behaviour
@pytest.fixture(scope="module")
def lin32(linear):
    """`(logits_fn, x, y)` of the linear CLIP in float32; one function object for the whole module, so
    the jitted attacks compile once per setting."""
    x = linear["x"].astype(np.float32)
    return jax_logits(linear["a"].astype(np.float32), linear["t"].astype(np.float32)), x, linear["y"]


STEPS = 20  # APGD iterations in the behaviour tests (shared, so shared compilations)


@pytest.mark.parametrize("norm,eps,loss", [("linf", 2 / 255, "ce"), ("l2", 0.3, "dlr"), ("linf", 2 / 255, "t")])
def test_apgd_stays_in_ball_and_image_range(lin32, norm, eps, loss):
    f, x, y = lin32
    key = jax.random.key(3)
    if loss == "t":
        adv = apgd_targeted(f, x, y, key, eps=eps, norm=norm, steps=STEPS, n_target_classes=2)
    else:
        adv = apgd(f, x, y, key, eps=eps, norm=norm, steps=STEPS, loss=loss)
    adv = np.asarray(adv)
    d = (adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    fooled = np.asarray(f(adv)).argmax(1) != y
    moved = size > 0
    # an image is changed only when it is fooled (AutoAttack returns x for the others)
    assert np.array_equal(moved, fooled & (np.asarray(f(x)).argmax(1) == y))
    assert moved.any()


def test_apgd_at_least_as_strong_as_pgd(lin32):
    f, x, y = lin32
    clean = np.asarray(f(x)).argmax(1) == y
    eps = 1.5 / 255
    key = jax.random.key(4)
    pgd_ok = (np.asarray(f(pgd_classifier(f, x, y, key, eps=eps, alpha=eps / 4, steps=10))).argmax(1) == y) & clean
    apgd_ok = np.asarray(f(apgd(f, x, y, key, eps=eps, steps=STEPS))).argmax(1) == y
    t_ok = np.asarray(f(apgd_targeted(f, x, y, key, eps=eps, steps=STEPS, n_target_classes=2))).argmax(1) == y
    assert 0 < pgd_ok.sum() < clean.sum()  # a regime where PGD is neither useless nor total
    assert apgd_ok.sum() <= pgd_ok.sum() and t_ok.sum() <= pgd_ok.sum()
    assert not (apgd_ok & ~clean).any()  # misclassified images are never counted robust


def test_apgd_restarts_keep_first_success(lin32):
    """Restarts re-attack only the points not yet fooled and keep the first run's adversarial point. On the
    linear CLIP the random start hardly matters, so a rugged term (2 sin(20 <x, v_k>)) is added to the logits."""
    base, x, y = lin32
    v = jnp.asarray(np.random.default_rng(1).normal(size=(768, 10)).astype(np.float32))

    def f(z):
        return base(z) + 2.0 * jnp.sin(20.0 * z.reshape(z.shape[0], -1) @ v)

    eps, key = 0.5 / 255, jax.random.key(5)
    one = np.asarray(apgd(f, x, y, key, eps=eps, steps=10, restarts=1))
    three = np.asarray(apgd(f, x, y, key, eps=eps, steps=10, restarts=3))
    clean = np.asarray(f(x)).argmax(1) == y
    fooled1 = (np.asarray(f(one)).argmax(1) != y) & clean
    fooled3 = (np.asarray(f(three)).argmax(1) != y) & clean
    assert not (fooled1 & ~fooled3).any()  # restarts never un-fool a point
    assert (fooled3 & ~fooled1).any()  # and here they fool more
    np.testing.assert_array_equal(three[fooled1], one[fooled1])  # the first success is kept
    np.testing.assert_array_equal(three[~fooled3], x[~fooled3])  # the others keep x


def test_apgd_eps_zero_and_x_init(lin32):
    f, x, y = lin32
    np.testing.assert_array_equal(np.asarray(apgd(f, x, y, jax.random.key(0), eps=0.0, steps=STEPS)), x)
    # the same x_init in every run: extra restarts change nothing
    x_init = np.clip(x + np.random.default_rng(0).uniform(-1, 1, x.shape) * 1 / 255, 0, 1).astype(np.float32)
    a = np.asarray(apgd(f, x, y, None, eps=1 / 255, steps=STEPS, x_init=x_init))
    b = np.asarray(apgd(f, x, y, None, eps=1 / 255, steps=STEPS, restarts=2, x_init=x_init))
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- robust_accuracy
def test_robust_accuracy_bookkeeping(lin32, linear):
    f, x, y = lin32
    clean = np_logits(x.astype(np.float64), linear["a"], linear["t"]).argmax(1) == y
    key = jax.random.key(6)
    # eps = 0: every attack returns x, so robust == clean; 48 examples in batches of 20 (last one padded)
    zero = robust_accuracy(f, x, y, key, protocol="ttc", eps=0.0, batch_size=20)
    np.testing.assert_array_equal(zero["clean_correct"], clean)
    np.testing.assert_array_equal(zero["robust"], clean)
    assert zero["clean_accuracy"] == zero["robust_accuracy"] == zero["attack_accuracy"]["pgd"] == clean.mean()
    assert list(zero["robust_after"]) == ["apgd-ce", "apgd-dlr"] and zero["num_samples"] == 48
    # a real eps (the same compiled batch of 20): worst case over the attacks, numbers consistent with flags
    r = robust_accuracy(f, x, y, key, protocol="ttc", eps=1.5 / 255, batch_size=20, num_samples=40)
    assert r["num_samples"] == 40 and len(r["robust"]) == 40
    np.testing.assert_array_equal(r["clean_correct"], clean[:40])
    assert not (r["robust"] & ~r["clean_correct"]).any()
    assert 0 < r["robust_accuracy"] < r["clean_accuracy"]
    assert r["robust_accuracy"] <= min(r["attack_accuracy"]["pgd"], r["autoattack_accuracy"])
    assert r["robust_after"]["apgd-dlr"] <= r["robust_after"]["apgd-ce"] <= r["clean_accuracy"]
    assert r["alphas"]["pgd"] == pytest.approx(1 / 255) and r["eps"] == 1.5 / 255


def test_protocols_hold_the_papers_settings():
    assert PROTOCOLS["ttc"]["eps"] == 1 / 255 and PROTOCOLS["ttc"]["attacks"][0] == (
        "pgd", {"alpha": 1 / 255, "steps": 10})
    assert [a for a, _ in PROTOCOLS["tecoa"]["attacks"]] == ["pgd", "apgd-ce", "apgd-dlr"]
    fare = dict(PROTOCOLS["fare"]["attacks"])
    assert fare["apgd-ce"] == {"steps": 100, "restarts": 5}
    assert fare["apgd-t"] == {"steps": 100, "restarts": 1, "n_target_classes": 9}
    assert PROTOCOLS["fare"]["num_samples"] == 1000 and PROTOCOLS["fare"]["eps"] == 2 / 255


# ----------------------------------------------------------------------------- sharding
def _tiny_config():
    import clipjax

    cfg = clipjax.get_config("ViT-B-32")
    return cfg.replace(embed_dim=16,
                       vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=32, layers=1,
                                                  heads=2, mlp_dim=64),
                       text=dataclasses.replace(cfg.text, width=32, heads=2, layers=1, mlp_dim=64, vocab_size=64))


def test_sharded_pgd_equals_unsharded(mesh8, photos):
    """A tiny clipjax ViT (random params drawn with numpy: no init program to compile) on real photos."""
    import skimage.transform

    from clipjax.models.clip import abstract_params
    from clipjax.sharding import batch_sharding

    cfg = _tiny_config()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: jnp.asarray(0.1 * rng.normal(size=v.shape), v.dtype), abstract_params(cfg))
    crops = [skimage.transform.resize(p[:min(p.shape[:2]), :min(p.shape[:2])], (32, 32), anti_aliasing=True)
             for p in photos]
    x = np.stack([np.clip(c + 0.02 * k, 0, 1) for k in range(2) for c in crops]).astype(np.float32)  # [8, 32, 32, 3]
    w = _unit(rng.normal(size=(5, 16))).astype(np.float32)
    # logit scale 10: the softmax is not saturated, so no CE gradient is float32 noise whose sign() could
    # flip between two equally valid XLA programs
    f = zero_shot_logits_fn(params, cfg, w, scale=10.0)
    y = np.arange(8, dtype=np.int32) % 5
    key = jax.random.key(7)
    plain = np.asarray(pgd_classifier(f, x, y, key, eps=2 / 255, alpha=1 / 255, steps=3))
    xs = jax.device_put(x, batch_sharding(mesh8, 4))
    ys = jax.device_put(y, batch_sharding(mesh8, 1))
    sharded = pgd_classifier(f, xs, ys, key, eps=2 / 255, alpha=1 / 255, steps=3)
    assert len(sharded.sharding.device_set) == 8 and sharded.sharding.shard_shape(sharded.shape)[0] == 1
    np.testing.assert_allclose(np.asarray(sharded), plain, atol=1e-6)
    assert np.abs(plain - x).max() > 1 / 255


def test_sharded_robust_accuracy_equals_unsharded(mesh8, lin32):
    """robust_accuracy keeps a batch-sharded input sharded batch by batch (the linear CLIP: cheap to compile)."""
    from clipjax.sharding import batch_sharding

    f, x, y = lin32
    x, y = x[:32], np.argsort(np.asarray(f(x[:32])), axis=1)[:, -2]  # runner-up labels: unsaturated gradients
    y = np.where(np.arange(32) % 3 == 0, np.asarray(f(x)).argmax(1), y)  # a third clean-correct
    key = jax.random.key(8)
    xs, ys = jax.device_put(x, batch_sharding(mesh8, 4)), jax.device_put(y, batch_sharding(mesh8, 1))
    kw = dict(attack="apgd-ce", eps=4 / 255, steps=10, batch_size=16)
    plain, sharded = robust_accuracy(f, x, y, key, **kw), robust_accuracy(f, xs, ys, key, **kw)
    for name in ("clean_correct", "robust"):
        np.testing.assert_array_equal(plain[name], sharded[name])
    assert plain["robust_after"] == sharded["robust_after"]
    assert plain["attacks"] == (("apgd-ce", {"restarts": 1, "steps": 10}),)
    assert 0 < plain["robust_accuracy"] < plain["clean_accuracy"]
    with pytest.raises(ValueError, match="divisible"):
        robust_accuracy(f, xs, ys, key, attack="pgd", eps=2 / 255, batch_size=4)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(lin32):
    f, x, y = lin32
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="eps"):
        pgd_classifier(f, x, y, key, eps=1.5, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="eps"):
        apgd(f, x, y, key, eps=-0.1)
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy(f, x, y, key, attack="pgd", eps=2.0)
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\]"):
        pgd_classifier(f, x * 255, y, key, eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match=r"x must hold pixels in \[0, 1\]"):
        robust_accuracy(f, x - 0.5, y, key, attack="apgd-ce", eps=0.1)
    with pytest.raises(ValueError, match="labels must lie in"):
        apgd(f, x, y + 10, key, eps=0.1)
    with pytest.raises(ValueError, match="labels must lie in"):
        robust_accuracy(f, x, y + 10, key, protocol="ttc")
    with pytest.raises(ValueError, match="labels has 47 entries"):
        pgd_classifier(f, x, y[:-1], key, eps=0.1, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="labels has 47 entries"):
        robust_accuracy(f, x, y[:-1], key, protocol="ttc")
    with pytest.raises(ValueError, match="unknown attack 'fab'"):
        robust_accuracy(f, x, y, key, attack="fab", eps=0.1)
    with pytest.raises(ValueError, match="unknown protocol 'robustbench'"):
        robust_accuracy(f, x, y, key, protocol="robustbench")
    with pytest.raises(ValueError, match="give protocol"):
        robust_accuracy(f, x, y, key)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        robust_accuracy(f, x, y, key, attack="pgd", eps=0.1, steps=0)
    with pytest.raises(ValueError, match="steps cannot be set"):
        robust_accuracy(f, x, y, key, protocol="fare", steps=10)
    with pytest.raises(ValueError, match="unknown norm 'l1'"):
        apgd(f, x, y, key, eps=0.1, norm="l1")
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        pgd_classifier(f, x, y, key, eps=0.1, alpha=0.1, steps=1, loss="hinge")
    with pytest.raises(ValueError, match="unknown loss 'ce-targeted'"):
        apgd(f, x, y, key, eps=0.1, loss="ce-targeted")
    with pytest.raises(ValueError, match="n_target_classes=10 exceeds"):
        apgd_targeted(f, x, y, key, eps=0.1, n_target_classes=10)
    with pytest.raises(ValueError, match="x must have shape"):
        pgd_classifier(f, x[..., :1], y, key, eps=0.1, alpha=0.1, steps=1)
    cfg = _tiny_config()  # the weights are checked before the params are used
    with pytest.raises(ValueError, match="class_weights must be L2-normalised"):
        zero_shot_logits_fn(None, cfg, 2 * _unit(np.ones((3, 16))))
    with pytest.raises(ValueError, match="pass its transpose"):
        zero_shot_logits_fn(None, cfg, _unit(np.ones((3, 16))).T)
