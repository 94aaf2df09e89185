"""Pallas contrastive kernels: interpret-mode parity on CPU, and GPU/TPU lowering.

Tolerances: kernels and `reference_*` evaluate the same float32 formulas
with HIGHEST-precision dots in a different order (online log-sum-exp over
column blocks), so statistics agree to rtol 1e-6 / atol 2e-5 (sums of up to
~300 softplus terms) and
gradient sums to atol 1e-5 * max(1, max|g|). Composed losses must match
autodiff of the naive loss at rtol 1e-5 (the issue's bound) on values and
atol 1e-5 * max(1, max|g|) on gradients.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from clipjax.losses import chunked_clip_loss, chunked_siglip_loss, clip_loss, sharded_clip_loss, \
    sharded_siglip_loss, siglip_loss
from clipjax.kernels import contrastive as K

LAYOUTS = ["triton", "tpu"]


def _unit(rng, b, d):
    x = rng.normal(size=(b, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_tree_close(got, want, rel=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=rel * max(1.0, np.abs(w).max()))


def _cfg(layout):
    return K.KernelConfig(block_rows=16, block_cols=16, backend=layout, interpret=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kernels_match_reference(layout, mode):
    """Both kernels, padded shapes (N=20, M=36, D=10 are not block multiples), rows/cols/both."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(3.0 * rng.normal(size=(20, 10)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(36, 10)), jnp.float32)
    bias = -1.5
    stats = K.row_stats(a, b, bias, mode=mode, config=_cfg(layout))
    np.testing.assert_allclose(np.asarray(stats), np.asarray(K.reference_row_stats(a, b, bias, mode=mode)),
                               atol=2e-5, rtol=1e-6)
    g_r = jnp.asarray(rng.normal(size=20), jnp.float32)
    g_c = jnp.asarray(rng.normal(size=36), jnp.float32)
    s_r = K.reference_row_stats(a, b, bias, mode="softmax")
    s_c = K.reference_row_stats(b, a, bias, mode="softmax")
    for rows, cols in [(True, False), (False, True), (True, True)]:
        args = (g_r if rows else None, s_r if rows else None, g_c if cols else None, s_c if cols else None)
        got = K.row_grads(a, b, bias, *args, mode=mode, config=_cfg(layout))
        want = K.reference_row_grads(a, b, bias, *args, mode=mode)
        assert_tree_close(got, want)


def test_tpu_layout_in_the_mosaic_tpu_interpreter():
    """The TPU layout in Pallas' TPU interpreter (checks VMEM/SMEM use and the grid order)."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(130, 8)), jnp.float32)  # two column blocks, the second padded
    cfg = K.KernelConfig(block_rows=8, block_cols=128, backend="tpu", interpret=pltpu.InterpretParams())
    for mode in ("softmax", "sigmoid"):
        np.testing.assert_allclose(np.asarray(K.row_stats(a, b, 0.5, mode=mode, config=cfg)),
                                   np.asarray(K.reference_row_stats(a, b, 0.5, mode=mode)), atol=2e-5, rtol=1e-6)
    g = jnp.asarray(rng.normal(size=24), jnp.float32)
    s = K.reference_row_stats(a, b, mode="softmax")
    assert_tree_close(K.row_grads(a, b, 0.0, g, s, mode="softmax", config=cfg),
                      K.reference_row_grads(a, b, 0.0, g, s, mode="softmax"))


def _lse_fn(layout):
    return lambda q, k, s, block: K.row_col_logsumexp(q, k, s, block, backend=layout, interpret=True)


def _pair_fn(layout):
    return lambda q, k, s, b, block: K.sigmoid_row_sums(q, k, s, b, block, backend=layout, interpret=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_losses_match_naive_autodiff(layout):
    rng = np.random.default_rng(2)
    x, y = _unit(rng, 40, 12), _unit(rng, 40, 12)
    clip_k = lambda a, c, s: chunked_clip_loss(a, c, s, block_size=16, lse_fn=_lse_fn(layout))  # noqa: E731
    v1, g1 = jax.jit(jax.value_and_grad(clip_k, (0, 1, 2)))(x, y, 30.0)
    v0, g0 = jax.jit(jax.value_and_grad(lambda a, c, s: K.reference(a, c, s, mode="softmax"), (0, 1, 2)))(x, y, 30.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)
    np.testing.assert_allclose(float(v0), float(clip_loss(x, y, 30.0)), rtol=1e-6)  # reference() is CLIP

    sig_k = lambda a, c, s, b: chunked_siglip_loss(a, c, s, b, block_size=16, pair_sum_fn=_pair_fn(layout))  # noqa
    v1, g1 = jax.jit(jax.value_and_grad(sig_k, (0, 1, 2, 3)))(x, y, 10.0, -10.0)
    ref = lambda a, c, s, b: K.reference(a, c, s, b, mode="sigmoid")  # noqa: E731
    v0, g0 = jax.jit(jax.value_and_grad(ref, (0, 1, 2, 3)))(x, y, 10.0, -10.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)
    np.testing.assert_allclose(float(v0), float(siglip_loss(x, y, 10.0, -10.0)), rtol=1e-6)


def test_row_logsumexp_kernel_gradient():
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(10, 6)).astype(np.float32), rng.normal(size=(18, 6)).astype(np.float32)
    g = rng.normal(size=10).astype(np.float32)
    kern = lambda q, k, s: K.row_logsumexp(q, k, s, 16, interpret=True) @ g  # noqa: E731
    dense = lambda q, k, s: jax.nn.logsumexp(s * q @ k.T, axis=1) @ g  # noqa: E731
    v1, g1 = jax.jit(jax.value_and_grad(kern, (0, 1, 2)))(q, k, 2.0)
    v0, g0 = jax.jit(jax.value_and_grad(dense, (0, 1, 2)))(q, k, 2.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


def test_kernels_compose_with_sharded_losses(mesh8):
    """Each device streams its blocks through the kernel inside shard_map.

    `check_vma=False`: the Pallas *interpreter* does not track device variance
    (compiled kernels on GPU/TPU do not need this).
    """
    rng = np.random.default_rng(4)
    x, y = _unit(rng, 32, 8), _unit(rng, 32, 8)
    row_lse = lambda q, k, s, block: K.row_logsumexp(q, k, s, block, interpret=True)  # noqa: E731
    sh_clip = lambda a, c, s: sharded_clip_loss(a, c, s, mesh=mesh8, block_size=16, lse_fn=row_lse,  # noqa: E731
                                                 check_vma=False)
    v1, g1 = jax.jit(jax.value_and_grad(sh_clip, (0, 1, 2)))(x, y, 20.0)
    v0, g0 = jax.jit(jax.value_and_grad(lambda a, c, s: clip_loss(a, c, s), (0, 1, 2)))(x, y, 20.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)

    # the ring backward uses the streamed gradients; the forward uses the kernel
    sh_sig = lambda a, c, s, b: sharded_siglip_loss(a, c, s, b, mesh=mesh8, block_size=16,  # noqa: E731
                                                   pair_sum_fn=_pair_fn("triton"), check_vma=False)
    v1, g1 = jax.jit(jax.value_and_grad(sh_sig, (0, 1, 2, 3)))(x, y, 10.0, -10.0)
    v0, g0 = jax.jit(jax.value_and_grad(siglip_loss, (0, 1, 2, 3)))(x, y, 10.0, -10.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


@pytest.mark.parametrize("platform,layout", [("cuda", "triton"), ("tpu", "tpu")])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kernels_lower_for_gpu_and_tpu(platform, layout, mode, monkeypatch):
    """Loss + gradient lower to a Triton / Mosaic TPU custom call (cross-platform export, no device)."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info

    # Mosaic reads the chip's layout constants at lowering time; on a CPU host, declare a v5e.
    monkeypatch.setitem(tpu_info.registry, "cpu",
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))

    def loss(x, y, s, b):
        if mode == "softmax":
            lse_r, lse_c = K.row_col_logsumexp(x, y, s, 128, backend=layout)
            return jnp.sum(lse_r) + jnp.sum(lse_c)
        return jnp.sum(K.sigmoid_row_sums(x, y, s, b, 128, backend=layout))

    spec = jax.ShapeDtypeStruct((300, 96), jnp.float32)  # padded to blocks of 128 rows/cols
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    target = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    exported = export.export(jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))), platforms=[platform],
                             disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
        spec, spec, scalar, scalar)
    text = exported.mlir_module()
    n_calls = text.count(f"custom_call @{target.replace('$', '$')}")
    # forward: rows (+ columns for softmax); backward: dq and dk kernels
    assert n_calls == (4 if mode == "softmax" else 3), n_calls


def test_kernel_config_errors():
    a = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(ValueError, match="backend must be 'triton', 'tpu' or 'auto'"):
        K.row_stats(a, a, mode="softmax", config=K.KernelConfig(backend="cuda"))
    with pytest.raises(ValueError, match="on CPU pass interpret=True"):
        K.row_stats(a, a, mode="softmax", config=K.KernelConfig())
    with pytest.raises(ValueError, match="mode must be 'softmax' or 'sigmoid'"):
        K.row_stats(a, a, mode="hinge", config=_cfg("triton"))
    with pytest.raises(ValueError, match="same D"):
        K.row_stats(a, jnp.ones((4, 2)), mode="softmax", config=_cfg("triton"))
    with pytest.raises(ValueError, match="block_rows must be a positive int"):
        K.row_stats(a, a, mode="softmax", config=K.KernelConfig(block_rows=0, interpret=True))
    with pytest.raises(ValueError, match="needs g_rows or g_cols"):
        K.row_grads(a, a, mode="sigmoid", config=_cfg("triton"))


@pytest.mark.accelerator
@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda", "rocm", "tpu"), reason="no GPU/TPU: compiled "
                    "Pallas kernels need one (the interpreter tests above cover CPU)")
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_compiled_kernels_match_reference(mode):
    """The kernels compiled for this machine's accelerator (not interpreted): values and gradients of the
    losses against the pure-JAX reference, at a size with several blocks and padding (N = 300, D = 64)."""
    rng = np.random.default_rng(4)
    x, y = _unit(rng, 300, 64), _unit(rng, 300, 64)
    with jax.default_matmul_precision("highest"):
        if mode == "softmax":
            lse = lambda q, k, s, block: K.row_col_logsumexp(q, k, s, block, block_rows=64)  # noqa: E731
            kern = lambda a, c, s: chunked_clip_loss(a, c, s, block_size=128, lse_fn=lse)  # noqa: E731
            args = (x, y, 30.0)
        else:
            pair = lambda q, k, s, b, block: K.sigmoid_row_sums(q, k, s, b, block, block_rows=64)  # noqa: E731
            kern = lambda a, c, s, b: chunked_siglip_loss(a, c, s, b, block_size=128, pair_sum_fn=pair)  # noqa
            args = (x, y, 10.0, -10.0)
        ref = lambda *a: K.reference(*a, mode=mode)  # noqa: E731
        argnums = tuple(range(len(args)))
        v1, g1 = jax.jit(jax.value_and_grad(kern, argnums))(*args)
        v0, g0 = jax.jit(jax.value_and_grad(ref, argnums))(*args)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0, rel=1e-4)  # accelerator float32 dots and exp: 1e-4 of each gradient's scale
