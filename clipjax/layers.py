"""NNX building blocks shared by the towers: LayerNorm, Dense, Attention, MLP, stacked Transformer.

Modules hold only `nnx.Param`; each Param carries logical axis names in its
`out_sharding` metadata (see `clipjax.sharding.RULES`). Params live in
`param_dtype` and are cast to the compute `dtype` at use; LayerNorm statistics
and attention softmax run in float32.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.sharding import constrain

Names = Sequence[str | None]


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Names, param_dtype) -> nnx.Param:
    """A Param initialised by `init(key, shape, dtype)` with logical axis `names`."""
    return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), out_sharding=tuple(names),
                     eager_sharding=False)


def normal(std: float) -> Callable:
    return lambda key, shape, dtype: (std * jax.random.normal(key, shape)).astype(dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def constant(value: float) -> Callable:
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """gelu (exact erf, torch's nn.GELU), quick_gelu (OpenAI), gelu_tanh, relu."""
    return {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }[name]


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis `[..., D]`, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, ones, (dim,), ("embed",), param_dtype)
        self.bias = param(rngs, zeros, (dim,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class Dense(nnx.Module):
    """`y = x @ kernel + bias`, kernel `[in, out]` (torch Linear weight transposed)."""

    def __init__(self, d_in: int, d_out: int, *, names: Names, use_bias: bool = True, std: float | None = None,
                 param_dtype, rngs: nnx.Rngs):
        self.kernel = param(rngs, normal(std if std is not None else d_in**-0.5), (d_in, d_out), names, param_dtype)
        self.bias = param(rngs, zeros, (d_out,), names[-1:], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...].astype(x.dtype)
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class MLP(nnx.Module):
    """fc1 -> activation -> fc2 (open_clip `c_fc`/`c_proj`, HF `fc1`/`fc2`)."""

    def __init__(self, dim: int, hidden: int, act: str, *, param_dtype, rngs: nnx.Rngs, std: float | None = None):
        self.act = act
        self.fc1 = Dense(dim, hidden, names=("embed", "mlp"), param_dtype=param_dtype, rngs=rngs,
                         std=(2 * dim) ** -0.5)
        self.fc2 = Dense(hidden, dim, names=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs, std=std)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = constrain(h, ("batch", "act_seq", "act_mlp"))
        return self.fc2(activation(self.act)(h))


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v kernels `[D, H, Dh]` and output kernel `[H, Dh, D]`.

    `kv_dim` (default `dim`): the width of the key/value inputs, whose kernels are then
    `[kv_dim, H, Dh]` (torch `nn.MultiheadAttention(kdim=vdim=kv_dim)`, CoCa's pooler).
    """

    def __init__(self, dim: int, heads: int, *, param_dtype, rngs: nnx.Rngs, out_std: float | None = None,
                 implementation: str = "xla", kv_dim: int | None = None):
        self.implementation = None if implementation == "xla" else implementation
        head_dim = dim // heads
        kv_dim = dim if kv_dim is None else kv_dim
        std = dim**-0.5
        qkv_names = ("embed", "heads", "kv")
        self.q_kernel = param(rngs, normal(std), (dim, heads, head_dim), qkv_names, param_dtype)
        self.k_kernel = param(rngs, normal(kv_dim**-0.5), (kv_dim, heads, head_dim), qkv_names, param_dtype)
        self.v_kernel = param(rngs, normal(kv_dim**-0.5), (kv_dim, heads, head_dim), qkv_names, param_dtype)
        self.q_bias = param(rngs, zeros, (heads, head_dim), ("heads", "kv"), param_dtype)
        self.k_bias = param(rngs, zeros, (heads, head_dim), ("heads", "kv"), param_dtype)
        self.v_bias = param(rngs, zeros, (heads, head_dim), ("heads", "kv"), param_dtype)
        self.out_kernel = param(rngs, normal(out_std or std), (heads, head_dim, dim), ("heads", "kv", "embed"),
                                param_dtype)
        self.out_bias = param(rngs, zeros, (dim,), ("embed",), param_dtype)

    def _proj(self, x, kernel, bias):
        return jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(x.dtype)) + bias[...].astype(x.dtype)

    def __call__(self, x: jax.Array, kv: jax.Array | None = None, *, causal: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        """`x` `[B, T, D]` queries; `kv` `[B, S, kv_dim]` keys/values (default: `x`). Returns `[B, T, D]`.

        `mask`: optional boolean `[B, 1, T or 1, S]`, True where a query may attend to a key; combined
        with the causal mask when `causal`. Every query must keep at least one key.
        """
        kv = x if kv is None else kv
        q = self._proj(x, self.q_kernel, self.q_bias)
        k = self._proj(kv, self.k_kernel, self.k_bias)
        v = self._proj(kv, self.v_kernel, self.v_bias)
        q = constrain(q, ("batch", "act_seq", "act_heads", None))
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=self.implementation)
        return self.output(o)

    def output(self, o: jax.Array) -> jax.Array:
        """Output projection of per-head values `[B, T, H, Dh]` -> `[B, T, D]`."""
        return jnp.einsum("bthk,hkd->btd", o, self.out_kernel[...].astype(o.dtype)) + self.out_bias[...].astype(o.dtype)

    def values_only(self, x: jax.Array) -> jax.Array:
        """MaskCLIP's value path: out_proj(v(x)) with no query-key mixing. `[B, T, D]` -> `[B, T, D]`."""
        return self.output(self._proj(x, self.v_kernel, self.v_bias))


class Block(nnx.Module):
    """Pre-LN residual block: x + ls1 * attn(ln1(x)); x + ls2 * mlp(ln2(x)).

    The LayerScale gammas `ls1`, `ls2` `[D]` (open_clip `ls_1.gamma`, `ls_2.gamma`) exist only when
    `layer_scale_init` is given (they start at that value); otherwise the branches are added as they are.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, act: str, eps: float, layers: int, *, param_dtype,
                 rngs: nnx.Rngs, attention: str = "xla", layer_scale_init: float | None = None):
        proj_std = dim**-0.5 * (2 * layers) ** -0.5
        self.ln1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(dim, heads, param_dtype=param_dtype, rngs=rngs, out_std=proj_std,
                              implementation=attention)
        self.ln2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(dim, mlp_dim, act, param_dtype=param_dtype, rngs=rngs, std=proj_std)
        ls = None if layer_scale_init is None else constant(layer_scale_init)
        self.ls1 = param(rngs, ls, (dim,), ("embed",), param_dtype) if ls else None
        self.ls2 = param(rngs, ls, (dim,), ("embed",), param_dtype) if ls else None

    @staticmethod
    def _scale(h: jax.Array, gamma) -> jax.Array:
        return h if gamma is None else h * gamma[...].astype(h.dtype)

    def __call__(self, x: jax.Array, *, causal: bool, mask: jax.Array | None = None) -> jax.Array:
        """`x` `[B, T, D]`; `mask` as `Attention`'s (boolean `[B, 1, T or 1, T]`, True = visible)."""
        x = x + self._scale(self.attn(self.ln1(x), causal=causal, mask=mask), self.ls1)
        x = x + self._scale(self.mlp(self.ln2(x)), self.ls2)
        return constrain(x, ("batch", "act_seq", "act_embed"))

    def maskclip(self, x: jax.Array) -> jax.Array:
        """MaskCLIP dense path (methods.md §19): v = x + ls1 * out(v(ln1(x))); v + ls2 * mlp(ln2(v))."""
        v = x + self._scale(self.attn.values_only(self.ln1(x)), self.ls1)
        return v + self._scale(self.mlp(self.ln2(v)), self.ls2)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """`layers` Blocks with params stacked on a leading "layers" axis; run by `lax.scan` or unrolled."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, layers: int, act: str, eps: float, *, param_dtype,
                 rngs: nnx.Rngs, attention: str = "xla", layer_scale_init: float | None = None):
        self.layers = layers

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def create(rngs):
            return Block(dim, heads, mlp_dim, act, eps, layers, param_dtype=param_dtype, rngs=rngs,
                         attention=attention, layer_scale_init=layer_scale_init)

        self.blocks = create(rngs)

    def __call__(self, x: jax.Array, *, causal: bool, scan: bool = True, remat: str = "none",
                 upto: int | None = None, intermediates: bool = False, mask: jax.Array | None = None):
        """Run blocks `[0, upto)` on `x` `[B, T, D]`, each with the same attention `mask` (see `Block`).

        Returns `x`, or `(x, hidden)` with `hidden` `[L', B, T, D]` the output of each block when
        `intermediates` is set.
        """
        n = self.layers if upto is None else upto
        graphdef, state = nnx.split(self.blocks)
        if n != self.layers:
            state = jax.tree.map(lambda a: a[:n], state)

        def body(h, st):
            h = nnx.merge(graphdef, st)(h, causal=causal, mask=mask)
            return h, (h if intermediates else None)

        if remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[remat])
        if scan:
            x, hidden = jax.lax.scan(body, x, state)
        else:
            outs = []
            for i in range(n):
                x, h = body(x, jax.tree.map(lambda a: a[i], state))
                outs.append(h)
            hidden = jnp.stack(outs) if intermediates and outs else None
        return (x, hidden) if intermediates else x

    def block(self, i: int) -> Block:
        """Block `i` as a module (a view on the stacked params)."""
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
