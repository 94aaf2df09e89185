"""An experiment for `benchmarks/encode.py --variant variants.fused_attention:call` (2026-11-30).

A fused `[D, 3H, Dh]` QKV projection and attention written out as einsums (softmax in float32), in
place of clipjax's three projections and `jax.nn.dot_product_attention`. Measured on the 2-core CPU,
interleaved with open_clip (results/encode-ViT-B-32-cpu.json, two runs): no gain (image 1.05-1.07
vs clipjax's 1.07-1.09 of open_clip's speed, text 0.95-0.99 vs 0.99-1.02), and a gradient step
within noise (before/after 1.00 [0.82, 1.17]); so it is not in clipjax.
Kept so the measurement can be repeated on other machines (a GPU/TPU may differ).
"""
import jax
import jax.numpy as jnp


def call(self, x, kv=None, *, causal=False, mask=None):
    if kv is not None:
        q, k, v = (self._proj(a, w, b) for a, w, b in ((x, self.q_kernel, self.q_bias), (kv, self.k_kernel, self.k_bias),
                                                       (kv, self.v_kernel, self.v_bias)))
    else:
        h = self.q_kernel.shape[1]
        w = jnp.concatenate([self.q_kernel[...], self.k_kernel[...], self.v_kernel[...]], axis=1)
        b = jnp.concatenate([self.q_bias[...], self.k_bias[...], self.v_bias[...]], axis=0)
        qkv = jnp.einsum("btd,dhk->bthk", x, w.astype(x.dtype)) + b.astype(x.dtype)
        q, k, v = qkv[:, :, :h], qkv[:, :, h:2 * h], qkv[:, :, 2 * h:]
    s = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    keep = mask
    if causal:
        tri = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        keep = tri if keep is None else keep & tri
    if keep is not None:
        s = jnp.where(keep, s, jnp.finfo(jnp.float32).min)
    return self.output(jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(s, axis=-1).astype(v.dtype), v))
