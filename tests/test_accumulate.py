"""Feature-caching gradient accumulation equals the full-batch gradient.

A tiny two-tower encoder (linear image tower, embedding-bag text tower, a
learned log logit scale) is differentiated three ways: `jax.grad` of the
full-batch loss, `accumulate_contrastive_grads` over K micro-batches, and
torch autograd of open_clip's `ClipLoss` on the same weights and batch.
Tolerances: float32 throughout, gradients O(1): atol 1e-5 * max(1, max|g|),
loss rtol 1e-5.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from clipjax.losses import accumulate_contrastive_grads, clip_loss, siglip_loss, split_micro_batches

B, P_IMG, VOCAB, SEQ, D = 24, 10, 30, 5, 8


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "img_w": jnp.asarray(rng.normal(size=(P_IMG, D)) / np.sqrt(P_IMG), jnp.float32),
        "img_b": jnp.asarray(0.1 * rng.normal(size=D), jnp.float32),
        "tok": jnp.asarray(rng.normal(size=(VOCAB, D)), jnp.float32),
        "txt_w": jnp.asarray(rng.normal(size=(D, D)) / np.sqrt(D), jnp.float32),
        "log_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),
        "bias": jnp.asarray(-2.0, jnp.float32),
    }


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    return {"images": jnp.asarray(rng.normal(size=(B, P_IMG)), jnp.float32),
            "tokens": jnp.asarray(rng.integers(0, VOCAB, size=(B, SEQ)), jnp.int32)}


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def encode(params, batch):
    img = jnp.tanh(batch["images"] @ params["img_w"] + params["img_b"])
    txt = jnp.mean(params["tok"][batch["tokens"]], axis=1) @ params["txt_w"]
    return _normalize(img), _normalize(txt)


def clip_objective(params, feats):
    return clip_loss(*feats, jnp.exp(params["log_scale"]))


def siglip_objective(params, feats):
    return siglip_loss(*feats, jnp.exp(params["log_scale"]), params["bias"])


def assert_tree_close(got, want, rel=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        w = np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=rel * max(1.0, np.abs(w).max()))


@pytest.mark.parametrize("objective", [clip_objective, siglip_objective])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_accumulated_grads_equal_full_batch(objective, k):
    params, batch = _params(), _batch()
    full_loss, full_grads = jax.jit(jax.value_and_grad(lambda p: objective(p, encode(p, batch))))(params)
    acc = jax.jit(lambda p, mb: accumulate_contrastive_grads(encode, objective, p, mb))
    loss, grads = acc(params, split_micro_batches(batch, k))
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
    assert_tree_close(grads, full_grads)
    if objective is clip_objective:
        assert float(jnp.abs(grads["bias"])) == 0.0  # unused param: exact zero gradient


def test_independent_micro_batches_would_lose_negatives():
    """Sanity check that the test above can fail: averaging per-micro-batch grads differs."""
    params, batch = _params(), _batch()
    grad = jax.jit(jax.grad(lambda p, mb: clip_objective(p, encode(p, mb))))
    full = grad(params, batch)
    mbs = split_micro_batches(batch, 4)
    naive = jax.tree.map(lambda *g: sum(g) / 4, *[grad(params, jax.tree.map(lambda x: x[i], mbs)) for i in range(4)])
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(naive), jax.tree.leaves(full)))
    assert diff > 1e-3


@pytest.mark.parity
def test_accumulated_grads_match_open_clip_full_batch():
    """torch autograd through the same tiny encoder and open_clip's ClipLoss (world_size=1)."""
    import torch
    from open_clip.loss import ClipLoss

    params, batch = _params(), _batch()
    t = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in params.items()}
    img = torch.tanh(torch.tensor(np.asarray(batch["images"])) @ t["img_w"] + t["img_b"])
    txt = t["tok"][torch.tensor(np.asarray(batch["tokens"]), dtype=torch.long)].mean(1) @ t["txt_w"]
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    ref = ClipLoss()(img, txt, t["log_scale"].exp())
    ref.backward()
    loss, grads = jax.jit(lambda p, mb: accumulate_contrastive_grads(encode, clip_objective, p, mb))(
        params, split_micro_batches(batch, 6))
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
    for name in ("img_w", "img_b", "tok", "txt_w", "log_scale"):
        assert_tree_close(grads[name], t[name].grad.numpy())


def test_split_micro_batches_errors():
    with pytest.raises(ValueError, match="B=24 is not divisible into 5 micro-batches"):
        split_micro_batches(_batch(), 5)
    with pytest.raises(ValueError, match="share the leading size B"):
        split_micro_batches({"a": jnp.ones((4, 2)), "b": jnp.ones((6, 2))}, 2)
    with pytest.raises(ValueError, match="no arrays"):
        split_micro_batches({}, 2)
    shapes = jax.tree.map(jnp.shape, split_micro_batches(_batch(), 4))
    assert shapes == {"images": (4, 6, P_IMG), "tokens": (4, 6, SEQ)}


def _wide_params(hidden=2048, seed=0):
    rng = np.random.default_rng(seed)
    p = _params(seed)
    p["img_w"] = jnp.asarray(rng.normal(size=(P_IMG, hidden)) / np.sqrt(P_IMG), jnp.float32)
    p["img_b"] = jnp.zeros((hidden,), jnp.float32)
    p["img_out"] = jnp.asarray(rng.normal(size=(hidden, D)) / np.sqrt(hidden), jnp.float32)
    return p


def wide_encode(params, batch):
    """An image tower with a wide hidden layer, so activation memory grows with the micro-batch."""
    h = jnp.tanh(batch["images"] @ params["img_w"] + params["img_b"])
    img = jnp.tanh(h @ params["img_out"])
    txt = jnp.mean(params["tok"][batch["tokens"]], axis=1) @ params["txt_w"]
    return _normalize(img), _normalize(txt)


def test_strided_micro_batches_stay_on_every_device(mesh8):
    """Each micro-batch of a batch sharded over 8 devices keeps rows on all 8 (contiguous split would not)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    x = jax.device_put(jnp.arange(64.0).reshape(64, 1), NamedSharding(mesh8, P("data")))
    with jax.set_mesh(mesh8):
        mb = jax.jit(lambda a: split_micro_batches(a, 4))(x)
    assert mb.shape == (4, 16, 1)
    np.testing.assert_array_equal(np.asarray(mb)[1, :, 0], np.arange(1, 64, 4))  # rows k, k+K, ...
    for k in range(4):
        owners = {s.device for s in mb.addressable_shards if s.index[0].start in (None, k) or
                  (s.index[0].start or 0) <= k < (s.index[0].stop or 4)}
        assert len(owners) == 8, f"micro-batch {k} lives on {len(owners)} devices"


def test_accumulated_grads_on_mesh_equal_full_batch_and_save_memory(mesh8):
    """8-device mesh: accumulation equals the full-batch gradient; peak temp memory falls with K.

    The loss is streamed (`chunked_clip_loss`), so the per-device logits do not dominate memory and
    the micro-batch's activations (512 / K rows x 2048 per device) do.
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    from clipjax.losses import chunked_clip_loss

    def objective(p, feats):
        return chunked_clip_loss(*feats, jnp.exp(p["log_scale"]), block_size=128)

    b = 4096
    rng = np.random.default_rng(3)
    batch = {"images": rng.normal(size=(b, P_IMG)).astype(np.float32),
             "tokens": rng.integers(0, VOCAB, size=(b, SEQ)).astype(np.int32)}
    params = _wide_params()
    batch = jax.device_put(batch, NamedSharding(mesh8, P("data")))
    params = jax.device_put(params, NamedSharding(mesh8, P()))

    def full(p, bt):
        return jax.value_and_grad(lambda q: objective(q, wide_encode(q, bt)))(p)

    def accumulated(k):
        return lambda p, bt: accumulate_contrastive_grads(wide_encode, objective, p, split_micro_batches(bt, k))

    temps = {}
    with jax.set_mesh(mesh8):
        want_loss, want = jax.jit(full)(params, batch)
        temps[1] = jax.jit(full).lower(params, batch).compile().memory_analysis().temp_size_in_bytes
        for k in (2, 4, 8):
            fn = jax.jit(accumulated(k))
            loss, grads = fn(params, batch)
            np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
            assert_tree_close(grads, want)
            temps[k] = fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    assert temps[2] < temps[1] and temps[4] < temps[2] and temps[8] < temps[4], temps
