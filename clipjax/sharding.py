"""One table of logical-axis sharding rules, meshes and activation constraints.

Every param carries logical axis names in its `out_sharding` metadata (for
example `("layers", "embed", "heads", "kv")`); activations are constrained
with `constrain(x, ("batch", "act_seq", "act_embed"))`. `RULES` maps logical
names to mesh axes. Without a mesh everything here is a no-op, so the same
code runs on one device and on a pod.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A `("data", "fsdp", "tensor")` mesh with Auto axis types; `-1` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not use the {len(devices)} devices")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None], rules=RULES, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> P:
    """Map logical axis names to a PartitionSpec.

    With `mesh` and `shape`, a dimension not divisible by its mesh axes is
    replicated instead (for example 12 heads over a tensor axis of 8), and a
    mesh axis is used at most once.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if mesh is not None:
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if shape is not None and axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_shardings(params: nnx.State, mesh: Mesh, rules=RULES):
    """NamedShardings for an `nnx.State` of params, from each Param's `out_sharding` names."""

    def one(v):
        names = v.get_metadata().get("out_sharding") or (None,) * v.get_value().ndim
        spec = logical_to_spec(names, rules, mesh, v.get_value().shape)
        return v.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None], rules=RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names under the current mesh; identity without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or x.ndim != len(names):
        return x
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def shard_params(params: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """Place an `nnx.State` of params on `mesh` by its logical names."""
    shardings = param_shardings(params, mesh, rules)
    return jax.tree.map(lambda v, s: v.replace(jax.device_put(v.get_value(), s.get_value())), params, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding for an input batch `[B, ...]`: batch over ("data", "fsdp"), rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh=mesh))
