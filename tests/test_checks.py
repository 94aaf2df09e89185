"""`clipjax.checks`, the one module of input checks, and its rules as seen through the public functions.

For each check: it passes on good input, and its message names the argument, the expected shape and
what was given (static checks) or the first offending row (value checks). Value checks are skipped for
tracers and with `validate=False`. Zero rows follow one rule everywhere: when validating, a zero row is
an error naming the argument and row; without validation it normalises to a zero vector (no NaN).
"""

import ast
import pathlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from clipjax import adapt, checks, losses, metrics, ood

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _traced_ok(fn, *args):
    """`fn` runs under jit without raising (value checks see tracers and are skipped)."""
    jax.jit(lambda *a: (fn(*a), jnp.zeros(()))[1])(*args)


# ----------------------------------------------------------------------------- layering
def test_checks_is_the_bottom_layer_and_the_old_modules_are_gone():
    tree = ast.parse((ROOT / "clipjax" / "checks.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "typing", "jax", "numpy"}, imported
    for old in ("clipjax/metrics/checks.py", "clipjax/losses/validate.py"):
        assert not (ROOT / old).exists(), old
    for pkg in ("losses", "metrics", "ood", "adapt"):
        for path in (ROOT / "clipjax" / pkg).glob("*.py"):
            src = path.read_text()
            assert "jax.core.Tracer" not in src and "def is_concrete" not in src, path


# ----------------------------------------------------------------------------- static checks
def test_array_passes_and_converts():
    x = checks.array("emb", np.ones((3, 4), np.float32), "[B, D]")
    assert isinstance(x, jax.Array) and x.shape == (3, 4)
    assert checks.array("labels", [0, 1], "[N]", dtype="integer").dtype == jnp.int32
    assert checks.array("adj", np.ones((0, 4), np.float32), "[M, D]", min_rows=0).shape == (0, 4)
    assert checks.array("w", np.ones((4, 2), np.float32), "[D, C]", sizes={"D": 4}).shape == (4, 2)


@pytest.mark.parametrize("x,kwargs,err,msg", [
    (np.ones(3, np.float32), {}, ValueError, r"emb must have shape \[B, D\] \(rank 2\), got shape \(3,\)"),
    (np.ones((3, 4), np.int32), {}, TypeError, r"emb must be a floating-point array of shape \[B, D\], got .*int32"),
    (np.ones((3, 4), np.float32), {"dtype": "integer"}, TypeError, r"emb must be an integer array .* float32"),
    (np.ones((0, 4), np.float32), {}, ValueError, r"emb is empty: shape \[B, D\] needs B >= 1, got shape \(0, 4\)"),
    (np.ones((1, 4), np.float32), {"min_rows": 2}, ValueError, r"emb has too few rows: .* needs B >= 2, .*\(1, 4\)"),
    (np.ones((3, 0), np.float32), {}, ValueError, r"emb has an empty axis: shape \[B, D\] needs D >= 1, .*\(3, 0\)"),
    (np.ones((3, 4), np.float32), {"sizes": {"D": 5}}, ValueError, r"emb must have shape \[B, D\] with D = 5, got"),
    (None, {}, ValueError, r"emb is None; expected an array of shape \[B, D\]"),
    ("abc", {}, TypeError, r"emb must be an array of shape \[B, D\], got str"),
])
def test_array_failures_name_argument_expected_shape_and_given(x, kwargs, err, msg):
    with pytest.raises(err, match=msg):
        checks.array("emb", x, "[B, D]", **kwargs)


def test_static_checks_fire_under_jit():
    with pytest.raises(ValueError, match=r"rank 2"):
        jax.jit(lambda a: checks.array("emb", a, "[B, D]"))(jnp.ones(3))
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        jax.jit(lambda a, b: checks.same_dim(a=a, b=b))(jnp.ones((2, 3)), jnp.ones((2, 4)))


def test_pairwise_shape_checks():
    a, b, c = jnp.ones((4, 3)), jnp.ones((5, 3)), jnp.ones((4, 2))
    checks.same_dim(a=a, b=b)
    checks.same_len(a=a, c=c)
    checks.same_shape("[B, D]", a=a, a2=a)
    checks.same_dtype(a=a, b=b)
    with pytest.raises(ValueError, match=r"embedding dimensions differ: a has shape \(4, 3\), c has shape \(4, 2\); "
                                         r"each must be \[\.\.\., D\] with the same D"):
        checks.same_dim(a=a, c=c)
    with pytest.raises(ValueError, match=r"different lengths: a has shape \(4, 3\), b has shape \(5, 3\); "
                                         r"each must be \[N, \.\.\.\] with the same N"):
        checks.same_len(a=a, b=b)
    with pytest.raises(ValueError, match=r"a and b must have the same shape \[B, D\], got \(4, 3\) and \(5, 3\)"):
        checks.same_shape("[B, D]", a=a, b=b)
    with pytest.raises(TypeError, match="a and h must have the same dtype, got float32 and bfloat16"):
        checks.same_dtype(a=a, h=a.astype(jnp.bfloat16))


def test_scalar_and_hyper_parameters():
    assert checks.scalar("s", 2) == 2.0 and checks.scalar("s", np.ones((1,), np.float32)).shape == ()
    with pytest.raises(ValueError, match=r"s must be a scalar \(shape \(\) or \(1,\)\), got shape \(2,\)"):
        checks.scalar("s", np.ones(2, np.float32))
    with pytest.raises(TypeError, match="s must be a real number, got a bool"):
        checks.scalar("s", True)
    assert checks.positive_int("k", np.int64(3)) == 3
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        checks.positive_int("k", 0)
    with pytest.raises(TypeError, match="k must be a positive integer, got 2.5"):
        checks.positive_int("k", 2.5)
    checks.positive_scalar("temperature", 0.5)
    with pytest.raises(ValueError, match="temperature must be a positive finite scalar"):
        checks.positive_scalar("temperature", np.inf)
    _traced_ok(lambda t: checks.positive_scalar("temperature", t), -1.0)  # a traced temperature is not checked


# ----------------------------------------------------------------------------- value checks
VALUE_CASES = {
    # name: (check, good input, bad input, message naming the argument and the first offending row)
    "finite": (lambda x, **k: checks.finite("emb", x, **k), np.eye(3, dtype=np.float32),
               np.array([[1, 0], [np.nan, 1], [np.inf, 0]], np.float32),
               r"emb has 2 non-finite value\(s\) \(NaN or inf\); the first is at row 1"),
    "unit_norm": (lambda x, **k: checks.unit_norm("emb", x, **k), np.eye(3, dtype=np.float32),
                  np.array([[1, 0], [0, 1], [0, 2]], np.float32),
                  r"emb must be L2-normalised .*: row 2 has norm 2; normalise it first"),
    "nonzero_rows": (lambda x, **k: checks.nonzero_rows("emb", x, **k), np.ones((3, 2), np.float32),
                     np.array([[1, 0], [0, 0], [0, 0]], np.float32),
                     r"emb has an all-zero row \(row 1\), which cannot be L2-normalised"),
    "unique_rows": (lambda x, **k: checks.unique_rows("emb", x, **k), np.eye(3, dtype=np.float32),
                    np.array([[1, 0], [0, 1], [1, 0]], np.float32), r"emb has duplicate rows: rows \[0, 2\]"),
    "index_range": (lambda x, **k: checks.index_range("labels", x, 3, **k), np.array([0, 2, 1]),
                    np.array([0, 3, -1]), r"labels must lie in \[0, 3\), got values in \[-1, 3\]; .* at index 1"),
}


@pytest.mark.parametrize("name", sorted(VALUE_CASES))
def test_value_check(name):
    check, good, bad, msg = VALUE_CASES[name]
    check(good)
    with pytest.raises(ValueError, match=msg):
        check(bad)
    with pytest.raises(ValueError, match=msg):
        check(jnp.asarray(bad))  # a device array is checked the same way
    check(bad, validate=False)  # validate=False skips it
    _traced_ok(check, bad)  # tracers are skipped
    for const in (bad, jnp.asarray(bad)):  # concrete constants inside a trace are still checked
        with pytest.raises(ValueError, match=msg):
            jax.jit(lambda a: (check(const), a)[1])(1.0)


def test_value_messages_locate_rows_of_any_rank():
    x = np.ones((2, 3, 4), np.float32)
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"local_emb has 1 non-finite .* at row \(1, 2\)"):
        checks.finite("local_emb", x)
    with pytest.raises(ValueError, match="logit_scale has 1 non-finite value"):
        checks.finite("logit_scale", np.float32(np.inf))
    with pytest.raises(ValueError, match=r"the first is at index 2"):
        checks.finite("id_scores", np.array([0.1, 0.2, np.nan], np.float32))
    checks.values("emb", np.ones((0, 3), np.float32), unit_norm=True, nonzero=True)  # empty: nothing to check
    checks.unit_norm("emb", np.full((2, 4), 0.5, jnp.bfloat16))  # the tolerance follows the dtype


# ----------------------------------------------------------------------------- zero rows
def test_l2_normalize_is_exact_and_keeps_zero_rows_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    x[3] = 0
    got = np.asarray(checks.l2_normalize(x))
    nonzero = x[[0, 1, 2, 4]]
    want = nonzero / jnp.sqrt(jnp.sum(jnp.square(nonzero), -1, keepdims=True))  # the plain division, in jax
    np.testing.assert_array_equal(got[[0, 1, 2, 4]], want)
    np.testing.assert_array_equal(got[3], 0.0)
    grad = jax.grad(lambda a: jnp.sum(checks.l2_normalize(a) * jnp.arange(7.0)))(x)
    assert np.isfinite(np.asarray(grad)).all()
    half = np.asarray(checks.l2_normalize(np.zeros((2, 3), np.float16)))  # no eps that underflows
    np.testing.assert_array_equal(half, 0.0)


def _np_clip_loss(x, y, scale):
    """float64 CLIP loss from its definition: mean of the image->text and text->image cross-entropies of
    scale * x @ y.T with the matching pairs on the diagonal."""
    z = scale * np.asarray(x, np.float64) @ np.asarray(y, np.float64).T

    def ce(logits):
        m = logits.max(1)
        return np.mean(m + np.log(np.exp(logits - m[:, None]).sum(1)) - np.diag(logits))

    return 0.5 * (ce(z) + ce(z.T))


def _np_cloob_loss(x, y, inv_tau, beta):
    """float64 CLOOB loss (Hopfield retrievals + InfoLOOB, as `ml-jku/cloob`), normalising like torch's
    `F.normalize` (x / max(||x||, 1e-12)): an all-zero retrieval stays zero."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def unit(v):
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def retrieve(state, stored):
        a = beta * state @ stored.T
        a = np.exp(a - a.max(1, keepdims=True))
        return unit((a / a.sum(1, keepdims=True)) @ stored)

    def info_loob(a, b):
        k = inv_tau * a @ b.T
        off = np.where(np.eye(len(k), dtype=bool), -np.inf, k)
        m = off.max(1)
        return np.mean(m + np.log(np.exp(off - m[:, None]).sum(1)) - np.diag(k)) / inv_tau

    u_x, v_x = retrieve(x, x), retrieve(y, x)
    u_y, v_y = retrieve(x, y), retrieve(y, y)
    return info_loob(u_x, v_x) + info_loob(v_y, u_y)


def test_zero_row_rule_losses():
    # losses take embeddings as given: a zero row is valid input (its logits are all 0); rtol 1e-6 vs float64
    z = np.array([[1, 0], [0, 0], [0, 1]], np.float32)
    y = np.eye(3, 2, dtype=np.float32)
    np.testing.assert_allclose(float(losses.clip_loss(z, y, 10.0)), _np_clip_loss(z, y, 10.0), rtol=1e-6)
    # CLOOB normalises its Hopfield retrievals; image row 1 retrieves the mean of two opposite texts: zero
    x = np.array([[1, 0], [0, 1]], np.float32)
    y = np.array([[1, 0], [-1, 0]], np.float32)
    with pytest.raises(ValueError, match=r"the Hopfield retrieval of image_features from text_features has an "
                                         r"all-zero row \(row 1\)"):
        losses.cloob_loss(x, y, 10.0)
    with pytest.raises(ValueError, match=r"Hopfield retrieval of state_patterns from stored_patterns .* \(row 1\)"):
        losses.hopfield_retrieval(x, y, 14.3)
    np.testing.assert_array_equal(np.asarray(losses.hopfield_retrieval(x, y, 14.3, validate=False))[1], 0.0)
    unchecked = float(losses.cloob_loss(x, y, 10.0, validate=False))  # was NaN before the guarded normalisation
    jitted, grads = jax.jit(jax.value_and_grad(lambda a, b: losses.cloob_loss(a, b, 10.0), (0, 1)))(x, y)
    want = _np_cloob_loss(x, y, 10.0, 14.3)
    assert np.isfinite(want)
    np.testing.assert_allclose([unchecked, float(jitted)], want, rtol=1e-5)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_zero_row_rule_metrics():
    rng = np.random.default_rng(1)
    img, cap = _unit(rng, 4, 8), _unit(rng, 4, 8)
    cap[2] = 0
    with pytest.raises(ValueError, match=r"caption_embeddings has an all-zero row \(row 2\)"):
        metrics.clip_score(img, cap)
    unchecked = np.asarray(metrics.clip_score(img, cap, validate=False))
    assert np.isfinite(unchecked).all() and unchecked[2] == 0.0  # zero vector: cosine 0
    np.testing.assert_allclose(np.asarray(jax.jit(metrics.clip_score)(img, cap)), unchecked, atol=1e-6)
    # the same rule where normalisation is optional, and for a derived vector (templates that cancel)
    with pytest.raises(ValueError, match=r"image_embeddings has an all-zero row \(row 2\)"):
        metrics.recall_at_k(img, cap, np.arange(4, dtype=np.int32), (1,), normalize=True)
    text = np.stack([np.stack([img[0], -img[0]]), np.stack([img[1], img[2]])])  # class 0 cancels out
    with pytest.raises(ValueError, match=r"the template mean of text_embeddings has an all-zero row \(row 0\)"):
        metrics.classifier_weights(text)
    np.testing.assert_array_equal(np.asarray(metrics.classifier_weights(text, validate=False))[:, 0], 0.0)


def test_zero_row_rule_ood():
    rng = np.random.default_rng(2)
    images, text = _unit(rng, 5, 8), _unit(rng, 4, 8)
    images[3] = 0
    with pytest.raises(ValueError, match=r"image_emb has an all-zero row \(row 3\)"):
        ood.mcm(images, text)
    with pytest.raises(ValueError, match=r"image_emb has an all-zero row \(row 3\)"):
        ood.neglabel_score(images, text[:2], text[2:], num_groups=1)
    with pytest.raises(ValueError, match=r"image_emb has an all-zero row \(row 3\)"):
        ood.cosine_similarity(images, text)
    unchecked = np.asarray(ood.mcm(images, text, validate=False))
    assert np.isfinite(unchecked).all() and unchecked[3] == pytest.approx(1 / 4)  # cosines 0: uniform softmax
    np.testing.assert_allclose(np.asarray(jax.jit(ood.mcm)(images, text)), unchecked, rtol=1e-6)


def test_zero_row_rule_adapt():
    rng = np.random.default_rng(3)
    feats, labels = _unit(rng, 6, 8), np.array([0, 1, 2, 0, 1, 2], np.int32)
    feats[4] = 0
    with pytest.raises(ValueError, match=r"the mean over augmented passes of features has an all-zero row \(row 4\)"):
        adapt.tip_adapter.fit(feats, labels)
    keys = np.asarray(adapt.tip_adapter.fit(feats, labels, validate=False).keys)
    np.testing.assert_array_equal(keys[4], 0.0)
    text = _unit(rng, 3, 8)
    text[1] = 0
    with pytest.raises(ValueError, match=r"text_emb has an all-zero row \(row 1\)"):
        adapt.gda.fit(_unit(rng, 6, 8), labels, text_emb=text)
