"""Tip-Adapter against a float64 numpy transcription of `gaopengcuhk/Tip-Adapter:utils.py:
build_cache_model, search_hp` and `main_imagenet.py:run_tip_adapter`, plus a few-shot run on
scikit-learn's digits.

Tolerance: logits rtol 1e-5 / atol 1e-4 (float32 exp(-beta (1 - cos)) sums vs float64, logits ~100). The search
grids (given and default, the latter from `configs/imagenet.yaml`: search_scale [7, 3], search_step [200, 20])
are equal exactly.
"""

import numpy as np
import pytest

from clipjax.adapt import select_tip_alpha_beta, tip_adapter, tip_grid


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cache_oracle(aug_feats, labels):
    """build_cache_model: mean over augment epochs of the raw features, normalise, one-hot values."""
    keys = aug_feats.astype(np.float64).mean(0)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    values = np.eye(labels.max() + 1)[labels]  # F.one_hot(labels)
    return keys.T, values


def tip_logits_oracle(feats, keys_t, values, clip_weights, alpha, beta):
    feats = feats.astype(np.float64)
    affinity = feats @ keys_t
    cache = np.exp(-1 * (beta - beta * affinity)) @ values
    return 100.0 * feats @ clip_weights + cache * alpha


# configs/imagenet.yaml (and the other configs): search_scale [7, 3], search_step [200, 20]
REFERENCE_SEARCH_SCALE, REFERENCE_SEARCH_STEP = (7, 3), (200, 20)


def grid_oracle(scale, step):
    """`utils.py:search_hp`'s beta_list and alpha_list."""
    beta_list = [i * (scale[0] - 0.1) / step[0] + 0.1 for i in range(step[0])]
    alpha_list = [i * (scale[1] - 0.1) / step[1] + 0.1 for i in range(step[1])]
    return beta_list, alpha_list


def search_oracle(feats, labels, keys_t, values, clip_weights, scale, step):
    beta_list, alpha_list = grid_oracle(scale, step)
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            acc = 100 * np.mean(tip_logits_oracle(feats, keys_t, values, clip_weights, alpha, beta).argmax(1) == labels)
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


def _few_shot(seed=0, k=6, d=20, shots=4, augment=5, n_val=120):
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(k, d)))
    text = _unit(centres + 1.0 * rng.normal(size=(k, d)) / np.sqrt(d)).astype(np.float32)
    shot_y = np.repeat(np.arange(k), shots)
    shot_centre = centres[shot_y] + 0.8 * rng.normal(size=(len(shot_y), d)) / np.sqrt(d)
    scale = rng.uniform(0.5, 2.0, (augment, len(shot_y), 1))  # raw (unnormalised) features per augmented pass
    aug = (scale * (shot_centre + 0.3 * rng.normal(size=(augment, len(shot_y), d)) / np.sqrt(d))).astype(np.float32)
    val_y = np.repeat(np.arange(k), n_val // k)
    val_x = _unit(centres[val_y] + 1.2 * rng.normal(size=(len(val_y), d)) / np.sqrt(d)).astype(np.float32)
    return aug, shot_y, val_x, val_y, text


def test_cache_and_logits_match_reference():
    aug, shot_y, val_x, _, text = _few_shot()
    keys_t, values = cache_oracle(aug, shot_y)
    params = tip_adapter.fit(aug, shot_y, text_emb=text, alpha=1.17, beta=1.0)
    np.testing.assert_allclose(params.keys, keys_t.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params.values, values)
    for alpha, beta in ((1.17, 1.0), (3.0, 5.5)):
        want = tip_logits_oracle(val_x, keys_t, values, text.T.astype(np.float64), alpha, beta)
        got = tip_adapter.predict(params._replace(alpha=np.float32(alpha), beta=np.float32(beta)), val_x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    single = tip_adapter.fit(aug[0], shot_y, text_emb=text)  # one pass, [N, D]
    np.testing.assert_allclose(single.keys, _unit(aug[0].astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_search_matches_reference():
    aug, shot_y, val_x, val_y, text = _few_shot(seed=1)
    keys_t, values = cache_oracle(aug, shot_y)
    scale, step = (7.0, 3.0), (20, 10)  # the ImageNet ranges on a coarser grid
    want_beta, want_alpha = search_oracle(val_x, val_y, keys_t, values, text.T.astype(np.float64), scale, step)
    betas, alphas = tip_grid(scale, step)
    want_betas, want_alphas = grid_oracle(scale, step)
    np.testing.assert_array_equal(betas, want_betas)  # the same float expressions: exactly equal
    np.testing.assert_array_equal(alphas, want_alphas)
    # the default grids are the reference config's
    default_betas, default_alphas = tip_grid()
    want_betas, want_alphas = grid_oracle(REFERENCE_SEARCH_SCALE, REFERENCE_SEARCH_STEP)
    assert default_betas.shape == (200,) and default_alphas.shape == (20,)
    np.testing.assert_array_equal(default_betas, want_betas)
    np.testing.assert_array_equal(default_alphas, want_alphas)
    params, accs = select_tip_alpha_beta(tip_adapter.fit(aug, shot_y, text_emb=text), val_x, val_y, betas, alphas)
    assert accs.shape == (20, 10) and accs.max() > accs.min()
    assert float(params.beta) == pytest.approx(want_beta, rel=1e-6)
    assert float(params.alpha) == pytest.approx(want_alpha, rel=1e-6)


def test_digits_few_shot_with_validation_split():
    """Digits (8x8, normalised pixels as features): 4 shots x 5 'augmented' (shifted) passes per class;
    alpha/beta chosen on a validation split, accuracy reported on a disjoint test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images.astype(np.float32), digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, train_size=400, stratify=y, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, train_size=400, stratify=y_rest, random_state=0)
    shots = np.concatenate([np.flatnonzero(y_train == c)[:4] for c in range(10)])
    passes = [np.roll(x_train[shots], s, axis=a) for s, a in ((0, 1), (1, 1), (-1, 1), (1, 2), (-1, 2))]
    aug = np.stack([p.reshape(len(shots), -1) for p in passes])
    mean = x_train.reshape(len(x_train), -1).mean(0)

    def embed(images):
        return _unit(images.reshape(len(images), -1) - mean).astype(np.float32)

    # a weak "zero-shot" head: one prototype per class from a single other training image. Pixel
    # cosines spread far wider than CLIP's (~0.2-0.35), so the head's scale is 5 instead of 100.
    text = embed(np.stack([x_train[np.flatnonzero(y_train == c)[5]] for c in range(10)]))
    params = tip_adapter.fit(aug - mean, y_train[shots], text_emb=text, logit_scale=5.0)
    tuned, _ = select_tip_alpha_beta(params, embed(x_val), y_val, *tip_grid((7.0, 3.0), (20, 10)))
    zero_shot = np.mean(np.argmax(embed(x_test) @ text.T, 1) == y_test)
    tip = np.mean(np.asarray(tip_adapter.predict(tuned, embed(x_test))).argmax(1) == y_test)
    assert tip > zero_shot + 0.05, (zero_shot, tip)  # measured: 0.702 -> 0.786


def test_tip_bad_input():
    aug, shot_y, val_x, val_y, text = _few_shot()
    with pytest.raises(ValueError, match="rank 3"):
        tip_adapter.fit(aug[None], shot_y)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] with N ="):
        tip_adapter.fit(aug, shot_y[:-2])
    with pytest.raises(ValueError, match="text_emb must have shape"):
        tip_adapter.fit(aug, shot_y, text_emb=text[:3])
    with pytest.raises(ValueError, match="labels must lie"):
        tip_adapter.fit(aug, shot_y, num_classes=2)
    params = tip_adapter.fit(aug, shot_y, text_emb=text)
    with pytest.raises(ValueError, match="features must have shape"):
        tip_adapter.predict(params, val_x[:, :5])
    with pytest.raises(ValueError, match=r"val_features must have shape \[N, D\] with D ="):
        select_tip_alpha_beta(params, val_x[:, :5], val_y)
