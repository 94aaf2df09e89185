"""Streamed (chunked) losses: equal to the naive losses and to open_clip, in O(B x block) memory.

Tolerances: the chunked and naive losses evaluate the same float32 sums in a
different order (online log-sum-exp), so values agree to rtol 1e-5 and
gradients to atol 1e-5 * max(1, max|g|) (logits up to 100 carry ~6e-6
absolute rounding). Against open_clip's `SigLipLoss._loss` (float32 torch)
the same bounds hold.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from clipjax.losses import (
    chunked_clip_loss,
    chunked_siglip_loss,
    clip_loss,
    row_col_logsumexp,
    row_logsumexp,
    sigmoid_row_sums,
    siglip_loss,
)


def _unit(rng, b, d):
    x = rng.normal(size=(b, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_tree_close(got, want, rel=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=rel * max(1.0, np.abs(w).max()))


_naive_clip = jax.jit(jax.value_and_grad(clip_loss, argnums=(0, 1, 2, 3)), static_argnames="label_smoothing")
_chunk_clip = jax.jit(jax.value_and_grad(chunked_clip_loss, argnums=(0, 1, 2, 3)),
                      static_argnames=("label_smoothing", "block_size"))
_naive_sig = jax.jit(jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3)), static_argnames="negative_only")
_chunk_sig = jax.jit(jax.value_and_grad(chunked_siglip_loss, argnums=(0, 1, 2, 3)),
                     static_argnames=("negative_only", "block_size"))


@pytest.mark.parametrize("b,block", [(2, 1), (13, 4), (32, 32), (40, 16), (40, 64)])
@pytest.mark.parametrize("scale,bias,eps", [(1.0, 0.0, 0.0), (100.0, -3.0, 0.1)])
def test_chunked_clip_equals_naive(b, block, scale, bias, eps):
    rng = np.random.default_rng(b + block)
    x, y = _unit(rng, b, 12), _unit(rng, b, 12)
    v0, g0 = _naive_clip(x, y, scale, bias, label_smoothing=eps)
    v1, g1 = _chunk_clip(x, y, scale, bias, label_smoothing=eps, block_size=block)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


@pytest.mark.parametrize("b,block", [(2, 1), (13, 4), (40, 16), (40, 64)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (117.0, 3.0)])
@pytest.mark.parametrize("negative_only", [False, True])
def test_chunked_siglip_equals_naive(b, block, scale, bias, negative_only):
    rng = np.random.default_rng(3 * b + block)
    x, y = _unit(rng, b, 12), _unit(rng, b, 12)
    v0, g0 = _naive_sig(x, y, scale, bias, negative_only=negative_only)
    v1, g1 = _chunk_sig(x, y, scale, bias, negative_only=negative_only, block_size=block)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


@pytest.mark.parity
@pytest.mark.parametrize("block", [64, 32, 8, 1])
@pytest.mark.parametrize("negative_only", [False, True])
def test_chunked_siglip_matches_open_clip(block, negative_only):
    """open_clip's own chunk test (`tests/test_siglip_chunked_loss.py`), against its unchunked `_loss`.

    The installed open_clip 3.3.0 has no `chunk_size` argument; its `_loss`
    (with `negative_only`) is the reference both chunk modes must reproduce.
    """
    import torch
    from open_clip.loss import SigLipLoss

    rng = np.random.default_rng(0)
    x, y = _unit(rng, 64, 32), _unit(rng, 64, 32)
    leaves = [torch.tensor(np.asarray(v, np.float32), requires_grad=True) for v in (x, y, 10.0, -10.0)]
    ref = SigLipLoss()._loss(*leaves, negative_only=negative_only)
    ref.backward()
    val, grads = _chunk_sig(x, y, 10.0, -10.0, negative_only=negative_only, block_size=block)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    assert_tree_close(grads, [t.grad.numpy() for t in leaves])


@pytest.mark.parity
@pytest.mark.parametrize("block", [64, 7])
def test_chunked_clip_matches_open_clip(block):
    import torch
    from open_clip.loss import ClipLoss

    rng = np.random.default_rng(1)
    x, y = _unit(rng, 48, 32), _unit(rng, 48, 32)
    leaves = [torch.tensor(np.asarray(v, np.float32), requires_grad=True) for v in (x, y, 14.285)]
    ref = ClipLoss()(*leaves)
    ref.backward()
    val, grads = _chunk_clip(x, y, 14.285, 0.0, block_size=block)
    np.testing.assert_allclose(float(val), ref.item(), rtol=1e-5)
    assert_tree_close(grads[:3], [t.grad.numpy() for t in leaves])


def test_primitives_match_dense_autodiff():
    """Each custom_vjp primitive against jax.grad of its dense formula, random cotangents."""
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(9, 5)).astype(np.float32), rng.normal(size=(14, 5)).astype(np.float32)
    gr, gc = rng.normal(size=9).astype(np.float32), rng.normal(size=14).astype(np.float32)
    s, b = np.float32(2.5), np.float32(-1.5)

    def dense_rc(q, k, s):
        z = s * q @ k.T
        return jax.nn.logsumexp(z, axis=1), jax.nn.logsumexp(z, axis=0)

    def dense_sig(q, k, s, b):
        return jnp.sum(jax.nn.softplus(s * q @ k.T + b), axis=1)

    cases = [
        (lambda q, k, s: row_logsumexp(q, k, s, 4) @ gr, lambda q, k, s: dense_rc(q, k, s)[0] @ gr, (q, k, s)),
        (lambda q, k, s: row_col_logsumexp(q, k, s, 4)[0] @ gr + row_col_logsumexp(q, k, s, 4)[1] @ gc,
         lambda q, k, s: dense_rc(q, k, s)[0] @ gr + dense_rc(q, k, s)[1] @ gc, (q, k, s)),
        (lambda q, k, s, b: sigmoid_row_sums(q, k, s, b, 4) @ gr,
         lambda q, k, s, b: dense_sig(q, k, s, b) @ gr, (q, k, s, b)),
    ]
    for chunked, dense, args in cases:
        argnums = tuple(range(len(args)))
        v1, g1 = jax.jit(jax.value_and_grad(chunked, argnums))(*args)
        v0, g0 = jax.jit(jax.value_and_grad(dense, argnums))(*args)
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
        assert_tree_close(g1, g0)


def test_large_logits_stay_finite():
    """Scale 1e4 makes exp(z) overflow float32; the online log-sum-exp must not."""
    rng = np.random.default_rng(2)
    x, y = _unit(rng, 16, 8), _unit(rng, 16, 8)
    v0, g0 = _naive_clip(x, y, 1e4, 0.0, label_smoothing=0.0)
    v1, g1 = _chunk_clip(x, y, 1e4, 0.0, label_smoothing=0.0, block_size=5)
    assert np.isfinite(float(v1)) and all(bool(jnp.all(jnp.isfinite(g))) for g in g1)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


def test_bf16_inputs_give_float32_loss_and_bf16_grads():
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(_unit(rng, 24, 16), jnp.bfloat16), jnp.asarray(_unit(rng, 24, 16), jnp.bfloat16)
    v0 = clip_loss(x.astype(jnp.float32), y.astype(jnp.float32), 50.0)
    v1, (gx, gy) = jax.jit(jax.value_and_grad(lambda a, c: chunked_clip_loss(a, c, 50.0, block_size=8), (0, 1)))(x, y)
    assert v1.dtype == jnp.float32 and gx.dtype == jnp.bfloat16 and gy.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    rx, ry = jax.grad(lambda a, c: clip_loss(a, c, 50.0), (0, 1))(x.astype(jnp.float32), y.astype(jnp.float32))
    for g, r in ((gx, rx), (gy, ry)):  # bf16-rounded float32 gradients: <= 2^-8 of the largest entry
        assert float(jnp.abs(g.astype(jnp.float32) - r).max()) <= 2.0**-8 * float(jnp.abs(r).max())


def test_compiled_temp_memory_is_o_b_times_block():
    """XLA's own memory analysis: the chunked loss+grad never allocates the B x B logits."""
    b, d, block = 4096, 32, 128
    spec = jax.ShapeDtypeStruct((b, d), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def temp_bytes(fn):
        return jax.jit(jax.value_and_grad(fn, (0, 1, 2))).lower(spec, spec, scalar).compile() \
            .memory_analysis().temp_size_in_bytes

    naive = temp_bytes(lambda x, y, s: clip_loss(x, y, s))
    chunked = temp_bytes(lambda x, y, s: chunked_clip_loss(x, y, s, block_size=block))
    sig = temp_bytes(lambda x, y, s: chunked_siglip_loss(x, y, s, -10.0, block_size=block))
    logits = b * b * 4
    assert naive >= logits  # the naive loss holds at least one B x B float32 buffer
    # streamed: a few [B, block] slabs plus O(B D) gradients, far below one B x B buffer
    budget = 8 * b * block * 4 + 8 * b * d * 4
    assert chunked < budget and sig < budget, (chunked, sig, budget)


def test_chunked_bad_inputs():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        chunked_clip_loss(x, x, 1.0, block_size=0)
    with pytest.raises(TypeError, match="block_size must be a positive int"):
        chunked_siglip_loss(x, x, 1.0, 0.0, block_size=2.5)
    with pytest.raises(ValueError, match="needs B >= 2"):
        chunked_clip_loss(x[:1], x[:1], 1.0)
    with pytest.raises(ValueError, match="needs logit_bias"):
        chunked_siglip_loss(x, x, 1.0, None)
    bad = x.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="text_features has 1 non-finite"):
        chunked_siglip_loss(x, bad, 1.0, 0.0)
