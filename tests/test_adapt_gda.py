"""GDA against a float64 numpy transcription of `mrflogs/ICLR24:main_few_shots.py:run`, its
alpha search, Bayes-optimal accuracy on shared-covariance Gaussians, and bad input.

Tolerance: logits rtol 1e-4 / atol 1e-3 against float64 (float32 pinv of a D = 24 matrix whose
condition number stays below ~1e3 here, and logits of size ~100).
"""

import jax
import numpy as np
import pytest

from clipjax.adapt import GDA_ALPHAS, gda, select_gda_alpha


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def gda_oracle(vecs, labels, clip_weights, num_classes):
    """The reference's parameter estimation (torch code transcribed to float64 numpy).

    `clip_weights` is `[D, K]` as in the reference; `np.cov(center.T)` == `center.T.cov()` (ddof 1).
    """
    vecs = vecs.astype(np.float64)
    mus = np.stack([vecs[labels == i].mean(0) for i in range(num_classes)])
    center = np.concatenate([vecs[labels == i] - mus[i] for i in range(num_classes)])
    cov = np.cov(center.T)
    d = center.shape[1]
    cov_inv = d * np.linalg.pinv((center.shape[0] - 1) * cov + np.trace(cov) * np.eye(d))
    ps = np.ones(num_classes) / num_classes
    w = np.einsum("nd,dc->cn", mus, cov_inv)
    b = np.log(ps) - np.einsum("nd,dc,nc->n", mus, cov_inv, mus) / 2
    return w, b


def oracle_logits(feats, w, b, clip_weights, alpha):
    feats = feats.astype(np.float64)
    return 100.0 * feats @ clip_weights + alpha * (feats @ w + b)


def oracle_search(feats, labels, w, b, clip_weights):
    best_acc, best_alpha, accs = 0, 0.1, []
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        acc = 100 * np.mean(oracle_logits(feats, w, b, clip_weights, alpha).argmax(1) == labels)
        accs.append(acc)
        if acc > best_acc:
            best_acc, best_alpha = acc, alpha
    return best_alpha, np.array(accs) / 100


def _few_shot(seed=0, k=5, d=24, shots=8, augment=3, n_val=100):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    text = _unit(centres + 0.8 * rng.normal(size=(k, d)) / np.sqrt(d))  # an imperfect zero-shot head

    def sample(n):
        y = np.repeat(np.arange(k), n // k)
        return _unit(centres[y] + 1.2 * rng.normal(size=(len(y), d)) / np.sqrt(d)).astype(np.float32), y

    train_x, train_y = sample(k * shots * augment)  # stacked augmented views, as the reference's vecs
    val_x, val_y = sample(n_val)
    return train_x, train_y, val_x, val_y, text.astype(np.float32)


def test_gda_matches_reference():
    train_x, train_y, val_x, val_y, text = _few_shot()
    k = text.shape[0]
    w, b = gda_oracle(train_x, train_y, text.T, k)
    params = gda.fit(train_x, train_y, k, text_emb=text, alpha=1.0)
    np.testing.assert_allclose(params.weight, w, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(params.bias, b, rtol=1e-4, atol=1e-3)
    for alpha in (0.01, 1.0, 100.0):
        want = oracle_logits(val_x, w, b, text.T.astype(np.float64), alpha)
        got = gda.predict(params._replace(alpha=np.float32(alpha)), val_x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_alpha_search_matches_reference():
    train_x, train_y, val_x, val_y, text = _few_shot(seed=1)
    k = text.shape[0]
    w, b = gda_oracle(train_x, train_y, text.T, k)
    want_alpha, want_accs = oracle_search(val_x, val_y, w, b, text.T.astype(np.float64))
    params, accs = select_gda_alpha(gda.fit(train_x, train_y, k, text_emb=text), val_x, val_y)
    np.testing.assert_allclose(accs, want_accs, atol=1e-6)
    assert float(params.alpha) == pytest.approx(want_alpha)
    assert len(accs) == len(GDA_ALPHAS) and accs.max() > accs.min()  # the grid matters on this data


def test_gda_reaches_bayes_optimal_accuracy():
    """Shared-covariance Gaussians with equal priors: the Bayes rule is LDA with the true parameters;
    GDA (without a text head) estimated from 3000 samples per class gets within 1 point of it."""
    rng = np.random.default_rng(2)
    k, d = 3, 8
    a = rng.normal(size=(d, d))
    sigma = a @ a.T / d + 0.5 * np.eye(d)
    means = rng.normal(size=(k, d)) * 0.8
    chol = np.linalg.cholesky(sigma)

    def sample(n):
        y = np.repeat(np.arange(k), n)
        return (means[y] + rng.normal(size=(len(y), d)) @ chol.T).astype(np.float32), y

    train_x, train_y = sample(3000)
    test_x, test_y = sample(20000)
    prec = np.linalg.inv(sigma)
    bayes = (test_x @ prec @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, prec, means)).argmax(1)
    bayes_acc = np.mean(bayes == test_y)
    assert 0.6 < bayes_acc < 0.95  # a problem where the rule matters
    params = gda.fit(train_x, train_y, text_emb=None, alpha=1.0)
    acc = np.mean(np.asarray(gda.predict(params, test_x)).argmax(1) == test_y)
    assert abs(acc - bayes_acc) < 0.01, (acc, bayes_acc)


def test_predict_is_jittable_and_shardable(mesh8):
    train_x, train_y, val_x, _, text = _few_shot(n_val=160)
    params = gda.fit(train_x, train_y, text_emb=text)
    from jax.sharding import NamedSharding, PartitionSpec as P
    x_s = jax.device_put(val_x, NamedSharding(mesh8, P("data")))
    np.testing.assert_allclose(jax.jit(gda.predict)(params, x_s), gda.predict(params, val_x), rtol=1e-6, atol=1e-5)


def test_gda_bad_input():
    train_x, train_y, _, _, text = _few_shot()
    with pytest.raises(ValueError, match="no samples"):
        gda.fit(train_x, train_y, 7)
    with pytest.raises(ValueError, match="labels must lie"):
        gda.fit(train_x, train_y, 3)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] with N ="):
        gda.fit(train_x, train_y[:-1])
    with pytest.raises(TypeError, match="integer"):
        gda.fit(train_x, train_y.astype(np.float32))
    with pytest.raises(ValueError, match="NaN"):
        bad = train_x.copy()
        bad[0, 0] = np.nan
        gda.fit(bad, train_y)
    with pytest.raises(ValueError, match="empty"):
        gda.fit(train_x[:0], train_y[:0], 5)
    with pytest.raises(ValueError, match="text_emb must have shape"):
        gda.fit(train_x, train_y, text_emb=text[:, :10])
    params = gda.fit(train_x, train_y, text_emb=text)
    with pytest.raises(ValueError, match="features must have shape"):
        gda.predict(params, train_x[:, :10])
