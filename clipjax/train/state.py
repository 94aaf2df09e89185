"""The train state (a pytree) and its creation, sharded by the logical-axis rules.

`TrainState` holds the step, the trainable params, the BatchNorm statistics (ResNet towers;
empty otherwise), the optimizer state, the optional EMA of the params and the base RNG key.
Every leaf that mirrors a param (Adam moments, EMA) keeps the param's logical axis names, so
`state_shardings` places it exactly like the param (FSDP shards optimizer state too).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax.config import CLIPConfig
from clipjax.models import clip as F
from clipjax.sharding import RULES, logical_to_spec


@struct.dataclass
class TrainState:
    """step `[]` int32; params / batch_stats / ema `nnx.State`; opt_state optax; rng `[2]` uint32."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any
    ema: nnx.State | None
    rng: jax.Array

    @property
    def model_state(self) -> nnx.State:
        """The full model state (params and BatchNorm statistics), as `clipjax.models.clip` takes it."""
        return F.merge_state(self.params, self.batch_stats)


def create_state(model_state: nnx.State, optimizer: optax.GradientTransformation, *, seed: int,
                 ema: bool) -> TrainState:
    """A step-0 `TrainState` from a model state (`init_params`, or a loaded checkpoint's `params`)."""
    params, stats = F.split_trainable(model_state)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                      opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))


def state_shardings(abstract: Any, mesh: Mesh, rules=RULES) -> Any:
    """NamedShardings for any pytree whose param-like leaves are `nnx.Variable`s with logical names.

    Variables get their logical spec (replicated where a dimension does not divide); other leaves
    (step, Adam count, RNG) are replicated.
    """

    def one(v):
        if isinstance(v, nnx.Variable):
            value = v.get_value()
            names = v.get_metadata().get("out_sharding") or (None,) * len(value.shape)
            return v.replace(NamedSharding(mesh, logical_to_spec(names, rules, mesh, value.shape)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_factory(model_config: CLIPConfig, optimizer: optax.GradientTransformation, *, seed: int, ema: bool):
    """`make(model_state | None) -> TrainState`: from a given model state, or a random init from `seed`.

    Meant for `jax.eval_shape(make, ...)` (the abstract state) and `jax.jit(make, out_shardings=...)`.
    """

    def make(model_state):
        if model_state is None:
            model_state = nnx.split(F.CLIP(model_config, rngs=nnx.Rngs(seed)))[1]
        return create_state(model_state, optimizer, seed=seed, ema=ema)

    return make


def init_state(model_config: CLIPConfig, optimizer: optax.GradientTransformation, *, seed: int, ema: bool,
               mesh: Mesh | None = None, model_state: nnx.State | None = None) -> tuple[TrainState, Any]:
    """Create the train state (random init from `seed`, or from `model_state`), sharded on `mesh`.

    Returns `(state, shardings)`; `shardings` is None without a mesh.
    """
    make = state_factory(model_config, optimizer, seed=seed, ema=ema)
    shardings = state_shardings(jax.eval_shape(make, model_state), mesh) if mesh is not None else None
    with mesh_context(mesh):
        return jax.jit(make, out_shardings=shardings)(model_state), shardings


def mesh_context(mesh: Mesh | None):
    """`jax.set_mesh(mesh)` (activation constraints see the mesh), or nothing without one."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
