"""Sharded losses on 8 fake CPU devices equal the single-device global-batch losses.

Tolerances: the sharded loss sums the same float32 terms in a different
order (per-device partial sums, psum), so values agree to rtol 1e-5 and
gradients to atol 1e-5 * max(1, max|g|). The open_clip distributed parity
runs open_clip's own `ClipLoss(local_loss, gather_with_grad)` and
`SigLipLoss(dist_impl=...)` in 4 gloo processes (float32 torch): same bounds.
"""

import os
import socket
import subprocess
import sys
import textwrap
from functools import partial

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.losses import (
    clip_loss,
    clip_loss_local,
    cloob_loss,
    sharded_clip_loss,
    sharded_cloob_loss,
    sharded_siglip_loss,
    siglip_loss,
    siglip_loss_local,
)
from clipjax.sharding import make_mesh


def _unit(rng, b, d):
    x = rng.normal(size=(b, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_tree_close(got, want, rel=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=rel * max(1.0, np.abs(w).max()))


_ARGS4 = (0, 1, 2, 3)


@partial(jax.jit, static_argnames=("eps",))
def _clip_ref(x, y, s, b, eps):
    return jax.value_and_grad(lambda *a: clip_loss(*a, label_smoothing=eps), _ARGS4)(x, y, s, b)


@partial(jax.jit, static_argnames=("mesh", "block", "eps"))
def _clip_sharded(x, y, s, b, mesh, block, eps):
    fn = lambda *a: sharded_clip_loss(*a, mesh=mesh, block_size=block, label_smoothing=eps)  # noqa: E731
    return jax.value_and_grad(fn, _ARGS4)(x, y, s, b)


@jax.jit
def _siglip_ref(x, y, s, b):
    return jax.value_and_grad(siglip_loss, _ARGS4)(x, y, s, b)


@partial(jax.jit, static_argnames=("mesh", "block"))
def _siglip_sharded(x, y, s, b, mesh, block):
    return jax.value_and_grad(lambda *a: sharded_siglip_loss(*a, mesh=mesh, block_size=block), _ARGS4)(x, y, s, b)


@jax.jit
def _cloob_ref(x, y, t, beta):
    return jax.value_and_grad(lambda *a: cloob_loss(*a[:3], hopfield_beta=a[3]), (0, 1, 2, 3))(x, y, t, beta)


@partial(jax.jit, static_argnames=("mesh",))
def _cloob_sharded(x, y, t, beta, mesh):
    fn = lambda *a: sharded_cloob_loss(*a[:3], hopfield_beta=a[3], mesh=mesh)  # noqa: E731
    return jax.value_and_grad(fn, (0, 1, 2, 3))(x, y, t, beta)


@pytest.mark.parametrize("b,block", [(8, 5), (24, None), (64, None), (64, 5)])
def test_sharded_clip_equals_global(mesh8, b, block):
    rng = np.random.default_rng(b)
    x, y = _unit(rng, b, 16), _unit(rng, b, 16)
    for scale, bias, eps in [(1.0, 0.0, 0.0), (100.0, -2.0, 0.1), (14.285, 5.0, 0.0)]:
        v0, g0 = _clip_ref(x, y, scale, bias, eps=eps)
        v1, g1 = _clip_sharded(x, y, scale, bias, mesh=mesh8, block=block, eps=eps)
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
        assert_tree_close(g1, g0)


@pytest.mark.parametrize("b,block", [(8, None), (24, 3), (64, None), (64, 3)])
def test_sharded_siglip_equals_global(mesh8, b, block):
    rng = np.random.default_rng(100 + b)
    x, y = _unit(rng, b, 16), _unit(rng, b, 16)
    for scale, bias in [(10.0, -10.0), (1.0, 0.0), (117.0, 4.0)]:
        v0, g0 = _siglip_ref(x, y, scale, bias)
        v1, g1 = _siglip_sharded(x, y, scale, bias, mesh=mesh8, block=block)
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
        assert_tree_close(g1, g0)


@pytest.mark.parametrize("b", [8, 32])
def test_sharded_cloob_equals_global(mesh8, b):
    rng = np.random.default_rng(200 + b)
    x, y = _unit(rng, b, 16), _unit(rng, b, 16)
    for inv_tau, beta in [(14.3, 14.3), (30.0, 8.0), (100.0, 1.0)]:
        v0, g0 = _cloob_ref(x, y, inv_tau, beta)
        v1, g1 = _cloob_sharded(x, y, inv_tau, beta, mesh=mesh8)
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
        assert_tree_close(g1, g0)


def test_two_axis_mesh_and_presharded_inputs():
    """Batch split over ("data", "fsdp") = 4 x 2, inputs already placed on the mesh, under jit."""
    mesh = make_mesh(data=4, fsdp=2)
    rng = np.random.default_rng(9)
    x, y = _unit(rng, 32, 8), _unit(rng, 32, 8)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    xs, ys = jax.device_put(x, sharding), jax.device_put(y, sharding)
    v0, g0 = _siglip_ref(x, y, 10.0, -10.0)
    v1, g1 = _siglip_sharded(xs, ys, 10.0, -10.0, mesh=mesh, block=None)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)
    v0, g0 = _clip_ref(x, y, 20.0, 0.0, eps=0.0)
    v1, g1 = _clip_sharded(xs, ys, 20.0, 0.0, mesh=mesh, block=4, eps=0.0)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    assert_tree_close(g1, g0)


def test_local_functions_inside_a_user_shard_map(mesh8):
    """`*_local` run inside the caller's own shard_map over the "data" axis."""
    rng = np.random.default_rng(4)
    x, y = _unit(rng, 16, 8), _unit(rng, 16, 8)

    @jax.jit
    def both(x, y, s, b):
        def body(xl, yl, s, b):
            return (clip_loss_local(xl, yl, s, axis_name="data"),
                    siglip_loss_local(xl, yl, s, b, axis_name="data", block_size=2))

        spec = P("data", None)
        return jax.shard_map(body, mesh=mesh8, in_specs=(spec, spec, P(), P()), out_specs=(P(), P()))(x, y, s, b)

    c, s_ = both(x, y, 10.0, -10.0)
    np.testing.assert_allclose(float(c), float(clip_loss(x, y, 10.0)), rtol=1e-5)
    np.testing.assert_allclose(float(s_), float(siglip_loss(x, y, 10.0, -10.0)), rtol=1e-5)


def test_sharded_bad_inputs(mesh8):
    x = np.ones((12, 4), np.float32)
    with pytest.raises(ValueError, match=r"B=12 is not divisible by the 8 devices.*\('data', 'fsdp'\)"):
        sharded_clip_loss(x, x, 1.0, mesh=mesh8)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharded_siglip_loss(x, x, 1.0, 0.0, mesh=mesh8)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharded_cloob_loss(x, x, 1.0, mesh=mesh8)
    y = np.ones((16, 4), np.float32)
    with pytest.raises(ValueError, match="axis 'model' is not in the mesh axes"):
        sharded_clip_loss(y, y, 1.0, mesh=mesh8, axis_names=("model",))
    with pytest.raises(ValueError, match="same shape"):
        sharded_siglip_loss(y, y[:8], 1.0, 0.0, mesh=mesh8)
    bad = y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="image_features has 1 non-finite"):
        sharded_clip_loss(bad, y, 1.0, mesh=mesh8)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        sharded_siglip_loss(y, y, 1.0, 0.0, mesh=mesh8, block_size=-1)


# ---------------------------------------------------------------- open_clip's distributed losses (gloo)

_WORKER = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np, torch, torch.distributed as dist
    rank, world, port, path, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    spec = importlib.util.spec_from_file_location("oc_loss", path)  # open_clip/loss.py alone: fast import
    oc = importlib.util.module_from_spec(spec); spec.loader.exec_module(oc)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = np.load(folder + "/inputs.npz")
    b = data["img"].shape[0] // world
    cases = {"clip": lambda: oc.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)}
    for impl in ("bidir", "shift", "reduce", "gather"):
        cases[impl] = lambda impl=impl: oc.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
    out = {}
    for name, make in cases.items():
        img = torch.tensor(data["img"][rank * b:(rank + 1) * b], requires_grad=True)
        txt = torch.tensor(data["txt"][rank * b:(rank + 1) * b], requires_grad=True)
        s = torch.tensor(float(data["scale"]), requires_grad=True)
        bias = torch.tensor(float(data["bias"]), requires_grad=True)
        loss = make()(img, txt, s) if name == "clip" else make()(img, txt, s, bias)
        loss.backward()
        out.update({name + "_loss": loss.item(), name + "_img": img.grad.numpy(), name + "_txt": txt.grad.numpy(),
                    name + "_s": s.grad.item(), name + "_b": 0.0 if bias.grad is None else bias.grad.item()})
    np.savez(folder + f"/rank{rank}.npz", **out)
    dist.destroy_process_group()
""")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parity
def test_matches_open_clip_distributed_losses(tmp_path):
    """open_clip in 4 gloo processes vs our sharded losses on a 4-device mesh.

    DDP semantics: rank r's loss is its local loss; parameter gradients are
    averaged over ranks, so the global loss is the mean of the rank losses,
    and the global gradient w.r.t. rank r's features is torch's gradient on
    rank r divided by the world size (scale/bias: the mean over ranks).
    """
    import open_clip.loss

    world, b, d, scale, bias = 4, 24, 16, 10.0, -5.0
    rng = np.random.default_rng(0)
    x, y = _unit(rng, b, d), _unit(rng, b, d)
    np.savez(tmp_path / "inputs.npz", img=x, txt=y, scale=np.float32(scale), bias=np.float32(bias))
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(world), port, open_clip.loss.__file__,
                               str(tmp_path)], env=env, stderr=subprocess.PIPE) for r in range(world)]
    errors = [p.communicate(timeout=240)[1].decode()[-2000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(world)]

    mesh = make_mesh(data=world, devices=jax.devices()[:world])
    ours = {"clip": _clip_sharded(x, y, scale, bias, mesh=mesh, block=None, eps=0.0),
            "siglip": _siglip_sharded(x, y, scale, bias, mesh=mesh, block=None)}
    for name in ("clip", "bidir", "shift", "reduce", "gather"):
        value, grads = ours["clip" if name == "clip" else "siglip"]
        torch_loss = np.mean([r[name + "_loss"] for r in ranks])
        torch_img = np.concatenate([r[name + "_img"] for r in ranks]) / world
        torch_txt = np.concatenate([r[name + "_txt"] for r in ranks]) / world
        torch_s = np.mean([r[name + "_s"] for r in ranks])
        np.testing.assert_allclose(float(value), torch_loss, rtol=1e-5, err_msg=name)
        assert_tree_close(grads[:3], [torch_img, torch_txt, torch_s])
        if name != "clip":
            np.testing.assert_allclose(float(grads[3]), np.mean([r[name + "_b"] for r in ranks]),
                                       rtol=1e-5, err_msg=name)
