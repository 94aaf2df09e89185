"""Pallas kernels for streamed contrastive losses (softmax log-sum-exp, sigmoid pair sums).

Two kernels do all the work, each for a block of rows of `Z = A B^T`:

* `row_stats(a, b, bias, mode)` `[N]`:
  softmax: `lse_i = log sum_j exp(z_ij)`; sigmoid: `sum_j softplus(z_ij + bias)`.
* `row_grads(a, b, bias, ..., mode)` -> (`sum_j W_ij b_j` `[N, D]`, `sum_j W_ij` `[N]`) with
  softmax: `W_ij = g_i exp(z_ij - lse_i) + h_j exp(z_ij - lse'_j)`,
  sigmoid: `W_ij = (g_i + h_j) sigmoid(z_ij + bias)`.

The logit scale is folded into the rows (`a = scale * q`) by the wrappers,
which use the kernels twice (rows, then columns with `a` and `b` swapped) to
build `custom_vjp` primitives with the signatures of
`clipjax.losses.chunked.row_logsumexp / row_col_logsumexp / sigmoid_row_sums`,
so they plug into `chunked_clip_loss(lse_fn=...)`, `chunked_siglip_loss(pair_sum_fn=...)`
and the sharded losses. Memory is O(block_rows x block_cols) per program.

Lowering paths (`backend=`):

* `"triton"` (GPU): a 1-D grid over row blocks; each program loops over
  column blocks with `fori_loop` (flash-attention layout). Blocks and the
  feature dimension are padded to powers of two.
* `"tpu"` (Mosaic TPU): a 2-D grid (row block "parallel", column block
  "arbitrary") with VMEM scratch accumulators; feature dim padded to 128.
* `"auto"` picks from `jax.default_backend()`. On CPU pass `interpret=True`
  (either layout runs in the Pallas interpreter).

Each kernel has a pure-JAX `reference_*` beside it, and `reference()` is the
naive loss the composed primitives must reproduce. All math is float32 with
`Precision.HIGHEST` dots (no TF32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Mode = Literal["softmax", "sigmoid"]
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "KernelConfig",
    "row_stats",
    "row_grads",
    "reference_row_stats",
    "reference_row_grads",
    "row_logsumexp",
    "row_col_logsumexp",
    "sigmoid_row_sums",
    "reference",
]


# ---------------------------------------------------------------- config and padding

@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static kernel settings (hashable, so it can key a cache of custom_vjp functions).

    Attributes:
      block_rows: rows per program.
      block_cols: columns per inner step.
      backend: "triton", "tpu" or "auto".
      interpret: run in the Pallas interpreter (CPU tests). `True` or an
        interpreter-params object (e.g. `pltpu.InterpretParams()`).
    """

    block_rows: int = 128
    block_cols: int = 128
    backend: str = "auto"
    interpret: object = False

    def resolved(self) -> "KernelConfig":
        backend = self.backend
        if backend == "auto":
            platform = jax.default_backend()
            if platform == "tpu":
                backend = "tpu"
            elif platform in ("gpu", "cuda", "rocm"):
                backend = "triton"
            elif self.interpret:
                backend = "triton"
            else:
                raise ValueError("Pallas contrastive kernels need a GPU or TPU; on CPU pass interpret=True")
        if backend not in ("triton", "tpu"):
            raise ValueError(f"backend must be 'triton', 'tpu' or 'auto', got {self.backend!r}")
        for name in ("block_rows", "block_cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        return dataclasses.replace(self, backend=backend)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _layout(cfg: KernelConfig, n: int, m: int, d: int):
    """Block sizes and padded sizes for one call: (bq, bk, n_pad, m_pad, d_pad)."""
    if cfg.backend == "triton":  # triton needs power-of-two blocks of at least 16
        bq = max(16, _next_pow2(min(cfg.block_rows, n)))
        bk = max(16, _next_pow2(min(cfg.block_cols, m)))
        dp = max(16, _next_pow2(d))
    else:  # TPU: rows in multiples of 8 sublanes, columns and features in 128 lanes
        bq = _round_up(min(cfg.block_rows, n), 8)
        bk = _round_up(min(cfg.block_cols, m), 128)
        dp = _round_up(d, 128)
    return bq, bk, _round_up(n, bq), _round_up(m, bk), dp


def _vma(x) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:  # jax >= 0.10: under `mat.varying`
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


def _unify_vma(*xs):
    """Inside `shard_map`, cast every operand to vary over the union of their mesh axes."""
    union = frozenset().union(*(_vma(x) for x in xs))
    return tuple(jax.lax.pcast(x, tuple(sorted(union - _vma(x))), to="varying") if union - _vma(x) else x
                 for x in xs)


def _out(shape, like):
    """Output struct carrying the operands' device-variance type (required inside `shard_map`)."""
    return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=getattr(jax.typeof(like), "manual_axis_type", None))


def _pad2(x, rows, cols):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _pad1(x, n):
    return jnp.pad(x, (0, n - x.shape[0]))


# ---------------------------------------------------------------- shared block math

def _dot_t(a, b):
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def _dot(a, b):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_HI,
                               preferred_element_type=jnp.float32)


def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _weights(z, mode, bias, g_r, s_r, g_c, s_c):
    """W for a `[bq, bk]` logit block; g_r/s_r are `[bq, 1]`, g_c/s_c are `[1, bk]` or None."""
    if mode == "softmax":
        w = 0.0
        if g_r is not None:
            w = w + g_r * jnp.exp(z - s_r)
        if g_c is not None:
            w = w + g_c * jnp.exp(z - s_c)
        return w
    g = (g_r if g_r is not None else 0.0) + (g_c if g_c is not None else 0.0)
    return g * _sigmoid(z + bias)


# ---------------------------------------------------------------- triton layout

def _tri_stats_kernel(p_ref, a_ref, b_ref, o_ref, *, mode, bk, nkb, m_valid):
    a = a_ref[...]
    bias = p_ref[0]
    bq = a.shape[0]

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        z = _dot_t(a, b_ref[pl.ds(start, bk), :])
        valid = (start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) < m_valid
        if mode == "softmax":
            m, l = carry
            z = jnp.where(valid, z, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(z, axis=1))
            l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
            return m_new, l
        return carry + jnp.sum(jnp.where(valid, _softplus(z + bias), 0.0), axis=1)

    # `*_like(a)` keeps the operands' device-variance type (the interpreter inside shard_map checks it)
    zeros = jnp.zeros_like(a[:, 0])
    if mode == "softmax":
        m, l = jax.lax.fori_loop(0, nkb, body, (jnp.full_like(zeros, -jnp.inf), zeros))
        o_ref[...] = m + jnp.log(l)
    else:
        o_ref[...] = jax.lax.fori_loop(0, nkb, body, zeros)


def _tri_grads_kernel(p_ref, a_ref, b_ref, gr_ref, sr_ref, gc_ref, sc_ref, da_ref, ws_ref, *,
                      mode, use_rows, use_cols, bk, nkb, m_valid):
    a = a_ref[...]
    bias = p_ref[0]
    bq = a.shape[0]
    g_r = gr_ref[...][:, None] if use_rows else None
    s_r = sr_ref[...][:, None] if use_rows else None

    def body(j, carry):
        acc, ws = carry
        start = pl.multiple_of(j * bk, bk)
        bj = b_ref[pl.ds(start, bk), :]
        z = _dot_t(a, bj)
        g_c = gc_ref[pl.ds(start, bk)][None, :] if use_cols else None
        s_c = sc_ref[pl.ds(start, bk)][None, :] if use_cols else None
        valid = (start + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) < m_valid
        w = jnp.where(valid, _weights(z, mode, bias, g_r, s_r, g_c, s_c), 0.0)
        return acc + _dot(w, bj), ws + jnp.sum(w, axis=1)

    acc, ws = jax.lax.fori_loop(0, nkb, body, (jnp.zeros_like(a), jnp.zeros_like(a[:, 0])))
    da_ref[...] = acc
    ws_ref[...] = ws


def _triton_params(cfg):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _tri_row_stats(a, b, bias, mode, cfg):
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    bq, bk, n_pad, m_pad, dp = _layout(cfg, n, m, d)
    kern = functools.partial(_tri_stats_kernel, mode=mode, bk=bk, nkb=m_pad // bk, m_valid=m)
    p, a, b = _unify_vma(_params_vec(bias, 16), _pad2(a, n_pad, dp), _pad2(b, m_pad, dp))
    out = pl.pallas_call(
        kern,
        out_shape=_out((n_pad,), a),
        grid=(n_pad // bq,),
        in_specs=[pl.BlockSpec((16,), lambda i: (0,)),
                  pl.BlockSpec((bq, dp), lambda i: (i, 0)),
                  pl.BlockSpec((m_pad, dp), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((bq,), lambda i: (i,)),
        compiler_params=_triton_params(cfg),
        interpret=cfg.interpret,
        name=f"contrastive_{mode}_row_stats",
    )(p, a, b)
    return out[:n]


def _tri_row_grads(a, b, bias, g_r, s_r, g_c, s_c, mode, cfg):
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    bq, bk, n_pad, m_pad, dp = _layout(cfg, n, m, d)
    use_rows, use_cols = g_r is not None, g_c is not None
    zr, zc = jnp.zeros((n,), jnp.float32), jnp.zeros((m,), jnp.float32)
    kern = functools.partial(_tri_grads_kernel, mode=mode, use_rows=use_rows, use_cols=use_cols,
                             bk=bk, nkb=m_pad // bk, m_valid=m)
    row = pl.BlockSpec((bq,), lambda i: (i,))
    col = pl.BlockSpec((m_pad,), lambda i: (0,))
    ops = _unify_vma(_params_vec(bias, 16), _pad2(a, n_pad, dp), _pad2(b, m_pad, dp),
                     _pad1(zr if g_r is None else g_r, n_pad), _pad1(zr if s_r is None else s_r, n_pad),
                     _pad1(zc if g_c is None else g_c, m_pad), _pad1(zc if s_c is None else s_c, m_pad))
    da, ws = pl.pallas_call(
        kern,
        out_shape=(_out((n_pad, dp), ops[1]), _out((n_pad,), ops[1])),
        grid=(n_pad // bq,),
        in_specs=[pl.BlockSpec((16,), lambda i: (0,)),
                  pl.BlockSpec((bq, dp), lambda i: (i, 0)),
                  pl.BlockSpec((m_pad, dp), lambda i: (0, 0)),
                  row, row, col, col],
        out_specs=(pl.BlockSpec((bq, dp), lambda i: (i, 0)), row),
        compiler_params=_triton_params(cfg),
        interpret=cfg.interpret,
        name=f"contrastive_{mode}_row_grads",
    )(*ops)
    return da[:n, :d], ws[:n]


def _params_vec(bias, size):
    return jnp.zeros((size,), jnp.float32).at[0].set(jnp.asarray(bias, jnp.float32))


# ---------------------------------------------------------------- TPU layout

def _tpu_stats_kernel(p_ref, a_ref, b_ref, o_ref, m_sc, l_sc, *, mode, bk, m_valid):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)

    z = _dot_t(a_ref[...], b_ref[...])
    valid = (j * bk + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)) < m_valid
    if mode == "softmax":
        z = jnp.where(valid, z, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(z, axis=1, keepdims=True))
        l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(z - m_new), axis=1, keepdims=True)
        m_sc[...] = m_new
    else:
        sp = jnp.where(valid, _softplus(z + p_ref[0]), 0.0)
        l_sc[...] = l_sc[...] + jnp.sum(sp, axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        o_ref[...] = (m_sc[...] + jnp.log(l_sc[...])) if mode == "softmax" else l_sc[...]


def _tpu_grads_kernel(p_ref, a_ref, b_ref, gr_ref, sr_ref, gc_ref, sc_ref, da_ref, ws_ref, acc_sc, ws_sc, *,
                      mode, use_rows, use_cols, bk, m_valid):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        ws_sc[...] = jnp.zeros(ws_sc.shape, jnp.float32)

    bj = b_ref[...]
    z = _dot_t(a_ref[...], bj)
    valid = (j * bk + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)) < m_valid
    w = _weights(z, mode, p_ref[0],
                 gr_ref[...] if use_rows else None, sr_ref[...] if use_rows else None,
                 gc_ref[...] if use_cols else None, sc_ref[...] if use_cols else None)
    w = jnp.where(valid, w, 0.0)
    acc_sc[...] = acc_sc[...] + _dot(w, bj)
    ws_sc[...] = ws_sc[...] + jnp.sum(w, axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _done():
        da_ref[...] = acc_sc[...]
        ws_ref[...] = ws_sc[...]


def _tpu_specs(cfg):
    from jax.experimental.pallas import tpu as pltpu

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    return pltpu, smem, params


def _tpu_row_stats(a, b, bias, mode, cfg):
    pltpu, smem, params = _tpu_specs(cfg)
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    bq, bk, n_pad, m_pad, dp = _layout(cfg, n, m, d)
    kern = functools.partial(_tpu_stats_kernel, mode=mode, bk=bk, m_valid=m)
    p, a, b = _unify_vma(_params_vec(bias, 1), _pad2(a, n_pad, dp), _pad2(b, m_pad, dp))
    out = pl.pallas_call(
        kern,
        out_shape=_out((n_pad, 1), a),
        grid=(n_pad // bq, m_pad // bk),
        in_specs=[smem,
                  pl.BlockSpec((bq, dp), lambda i, j: (i, 0)),
                  pl.BlockSpec((bk, dp), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bq, 1), lambda i, j: (i, 0)),
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name=f"contrastive_{mode}_row_stats",
    )(p, a, b)
    return out[:n, 0]


def _tpu_row_grads(a, b, bias, g_r, s_r, g_c, s_c, mode, cfg):
    pltpu, smem, params = _tpu_specs(cfg)
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    bq, bk, n_pad, m_pad, dp = _layout(cfg, n, m, d)
    use_rows, use_cols = g_r is not None, g_c is not None
    zr, zc = jnp.zeros((n,), jnp.float32), jnp.zeros((m,), jnp.float32)
    as_col = lambda v, size: _pad1(v, size)[:, None]  # noqa: E731  [N, 1]
    as_row = lambda v, size: _pad1(v, size)[None, :]  # noqa: E731  [1, M]
    kern = functools.partial(_tpu_grads_kernel, mode=mode, use_rows=use_rows, use_cols=use_cols, bk=bk, m_valid=m)
    row = pl.BlockSpec((bq, 1), lambda i, j: (i, 0))
    col = pl.BlockSpec((1, bk), lambda i, j: (0, j))
    ops = _unify_vma(_params_vec(bias, 1), _pad2(a, n_pad, dp), _pad2(b, m_pad, dp),
                     as_col(zr if g_r is None else g_r, n_pad), as_col(zr if s_r is None else s_r, n_pad),
                     as_row(zc if g_c is None else g_c, m_pad), as_row(zc if s_c is None else s_c, m_pad))
    da, ws = pl.pallas_call(
        kern,
        out_shape=(_out((n_pad, dp), ops[1]), _out((n_pad, 1), ops[1])),
        grid=(n_pad // bq, m_pad // bk),
        in_specs=[smem,
                  pl.BlockSpec((bq, dp), lambda i, j: (i, 0)),
                  pl.BlockSpec((bk, dp), lambda i, j: (j, 0)),
                  row, row, col, col],
        out_specs=(pl.BlockSpec((bq, dp), lambda i, j: (i, 0)), row),
        scratch_shapes=[pltpu.VMEM((bq, dp), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32)],
        compiler_params=params,
        interpret=cfg.interpret,
        name=f"contrastive_{mode}_row_grads",
    )(*ops)
    return da[:n, :d], ws[:n, 0]


# ---------------------------------------------------------------- kernel entry points

def _check_mode(mode):
    if mode not in ("softmax", "sigmoid"):
        raise ValueError(f"mode must be 'softmax' or 'sigmoid', got {mode!r}")


def _check_ab(a, b):
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected a [N, D] and b [M, D] with the same D, got {a.shape} and {b.shape}")


def row_stats(a, b, bias=0.0, *, mode: Mode, config: KernelConfig = KernelConfig()) -> jax.Array:
    """Per-row statistic of `Z = A B^T` (Pallas).

    Args:
      a: `[N, D]` rows (scale already folded in). b: `[M, D]` columns.
      bias: scalar added to `z` (sigmoid only; the softmax lse is shift-equivariant).
      mode: "softmax" -> `logsumexp_j z_ij`; "sigmoid" -> `sum_j softplus(z_ij + bias)`.
      config: block sizes, backend, interpret.

    Returns:
      `[N]` float32.
    """
    _check_mode(mode)
    _check_ab(a, b)
    cfg = config.resolved()
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    fn = _tri_row_stats if cfg.backend == "triton" else _tpu_row_stats
    return fn(a, b, bias, mode, cfg)


def reference_row_stats(a, b, bias=0.0, *, mode: Mode) -> jax.Array:
    """Pure-JAX `row_stats`."""
    z = jnp.dot(a, b.T, precision=_HI)
    if mode == "softmax":
        return jax.nn.logsumexp(z, axis=1)
    return jnp.sum(jax.nn.softplus(z + bias), axis=1)


def row_grads(a, b, bias=0.0, g_rows=None, stat_rows=None, g_cols=None, stat_cols=None, *, mode: Mode,
              config: KernelConfig = KernelConfig()) -> tuple[jax.Array, jax.Array]:
    """`(sum_j W_ij b_j, sum_j W_ij)` for the weights W of the module docstring (Pallas).

    Args:
      a: `[N, D]`; b: `[M, D]`; bias: scalar (sigmoid).
      g_rows, stat_rows: `[N]` row cotangents and row statistics (lse), or None.
      g_cols, stat_cols: `[M]` column cotangents and column statistics, or None.
      mode: "softmax" or "sigmoid" (sigmoid ignores the statistics).
      config: block sizes, backend, interpret.

    Returns:
      (`[N, D]`, `[N]`) float32.
    """
    _check_mode(mode)
    _check_ab(a, b)
    if g_rows is None and g_cols is None:
        raise ValueError("row_grads needs g_rows or g_cols")
    cfg = config.resolved()
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    if mode == "softmax":
        if (g_rows is None) != (stat_rows is None) or (g_cols is None) != (stat_cols is None):
            raise ValueError("softmax row_grads needs each cotangent with its lse statistic")
    fn = _tri_row_grads if cfg.backend == "triton" else _tpu_row_grads
    return fn(a, b, bias, g_rows, stat_rows, g_cols, stat_cols, mode, cfg)


def reference_row_grads(a, b, bias=0.0, g_rows=None, stat_rows=None, g_cols=None, stat_cols=None, *,
                        mode: Mode) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX `row_grads`."""
    z = jnp.dot(a, b.T, precision=_HI)
    w = _weights(z, mode, bias,
                 None if g_rows is None else g_rows[:, None], None if stat_rows is None else stat_rows[:, None],
                 None if g_cols is None else g_cols[None, :], None if stat_cols is None else stat_cols[None, :])
    return jnp.dot(w, b, precision=_HI), jnp.sum(w, axis=1)


# ---------------------------------------------------------------- custom_vjp primitives

@functools.lru_cache(maxsize=None)
def _lse_primitive(cfg: KernelConfig, with_cols: bool):
    @jax.custom_vjp
    def f(q, k, scale):
        return _fwd(q, k, scale)[0]

    def _fwd(q, k, scale):
        a = scale * q
        lse_r = row_stats(a, k, mode="softmax", config=cfg)
        lse_c = row_stats(k, a, mode="softmax", config=cfg) if with_cols else None
        out = (lse_r, lse_c) if with_cols else lse_r
        return out, (q, k, scale, lse_r, lse_c)

    def _bwd(res, g):
        q, k, scale, lse_r, lse_c = res
        g_r, g_c = g if with_cols else (g, None)
        a = scale * q
        da, _ = row_grads(a, k, 0.0, g_r, lse_r, g_c, lse_c, mode="softmax", config=cfg)
        dk, _ = row_grads(k, a, 0.0, g_c, lse_c, g_r, lse_r, mode="softmax", config=cfg)
        return scale * da, dk, jnp.sum(q * da)

    f.defvjp(_fwd, _bwd)
    return f


@functools.lru_cache(maxsize=None)
def _sigmoid_primitive(cfg: KernelConfig):
    @jax.custom_vjp
    def f(q, k, scale, bias):
        return row_stats(scale * q, k, bias, mode="sigmoid", config=cfg)

    def _fwd(q, k, scale, bias):
        return f(q, k, scale, bias), (q, k, scale, bias)

    def _bwd(res, g):
        q, k, scale, bias = res
        a = scale * q
        da, wsum = row_grads(a, k, bias, g, None, None, None, mode="sigmoid", config=cfg)
        dk, _ = row_grads(k, a, bias, None, None, g, None, mode="sigmoid", config=cfg)
        return scale * da, dk, jnp.sum(q * da), jnp.sum(wsum)

    f.defvjp(_fwd, _bwd)
    return f


def _config(block_size, block_rows, backend, interpret) -> KernelConfig:
    return KernelConfig(block_rows=block_rows or block_size, block_cols=block_size,
                        backend=backend, interpret=interpret).resolved()


def row_logsumexp(q, k, scale, block_size: int = 128, *, block_rows: int | None = None,
                  backend: str = "auto", interpret=False) -> jax.Array:
    """Pallas twin of `clipjax.losses.chunked.row_logsumexp`: `[N]` lse of `scale * Q K^T`."""
    return _lse_primitive(_config(block_size, block_rows, backend, interpret), False)(
        q.astype(jnp.float32), k.astype(jnp.float32), jnp.asarray(scale, jnp.float32))


def row_col_logsumexp(q, k, scale, block_size: int = 128, *, block_rows: int | None = None,
                      backend: str = "auto", interpret=False) -> tuple[jax.Array, jax.Array]:
    """Pallas twin of `clipjax.losses.chunked.row_col_logsumexp`: (`[N]`, `[M]`)."""
    return _lse_primitive(_config(block_size, block_rows, backend, interpret), True)(
        q.astype(jnp.float32), k.astype(jnp.float32), jnp.asarray(scale, jnp.float32))


def sigmoid_row_sums(q, k, scale, bias, block_size: int = 128, *, block_rows: int | None = None,
                     backend: str = "auto", interpret=False) -> jax.Array:
    """Pallas twin of `clipjax.losses.chunked.sigmoid_row_sums`: `[N]` sums of softplus."""
    return _sigmoid_primitive(_config(block_size, block_rows, backend, interpret))(
        q.astype(jnp.float32), k.astype(jnp.float32), jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32))


def reference(image_features, text_features, logit_scale, logit_bias=None, *, mode: Mode) -> jax.Array:
    """Naive loss the kernel primitives reproduce: CLIP (softmax) or SigLIP (sigmoid), float32."""
    x = image_features.astype(jnp.float32)
    y = text_features.astype(jnp.float32)
    z = logit_scale * jnp.dot(x, y.T, precision=_HI)
    if mode == "softmax":
        diag = jnp.diagonal(z)
        return 0.5 * (jnp.mean(jax.nn.logsumexp(z, axis=1) - diag) + jnp.mean(jax.nn.logsumexp(z, axis=0) - diag))
    z = z + logit_bias
    return (jnp.sum(jax.nn.softplus(z)) - jnp.sum(jnp.diagonal(z))) / x.shape[0]
