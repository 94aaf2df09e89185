"""OpenAI's ModifiedResNet image tower (RN50, RN101, ...) with attention pooling.

Matches `open_clip.modified_resnet.ModifiedResNet` in eval mode (default) and train mode
(`train=True`, see BatchNorm below):

- a 3-conv stem (3x3 stride 2, 3x3, 3x3, each BN + ReLU) then a 2x2 average pool;
- four stages of Bottleneck blocks (1x1, 3x3, 1x1 convs); a stride-2 block
  average-pools after its 3x3 conv (anti-aliased striding), and its shortcut is
  avgpool -> 1x1 conv -> BN;
- a QKV attention pool: the mean feature is prepended as a query token,
  positional embeddings are added and one multi-head attention step reads out
  that token, projected to `embed_dim` by `c_proj`.

Pixels are NHWC `[B, H, W, 3]`, already normalised, with `H == W == cfg.image_size`
for the pooled output (the trunk and the positional-embedding-free dense features
take any multiple of 32). Conv kernels are HWIO `[kh, kw, in, out]`.

BatchNorm: `scale`/`bias` are `nnx.Param`s; the running statistics `mean`/`var` are
`nnx.BatchStat`s (torch buffers), so `nnx.state(model, nnx.Param)` is exactly what an
optimiser (and weight decay) should see, and `nnx.state(model, nnx.BatchStat)` holds the
statistics. Both carry `out_sharding` metadata (replicated) for `clipjax.sharding`. The
pure-dict layout (`...bn1.mean`, `...bn1.var`) is the same as before the split, so
existing checkpoints load unchanged.

- `train=False` (default; inference, open_clip `.eval()`): normalise with the running
  statistics, which get no gradient.
- `train=True` (open_clip `.train()`, training from scratch): normalise with the batch
  mean and biased batch variance over `(B, H, W)` in float32, with gradients through
  them; the running statistics are updated in place with torch's momentum 0.1
  (`mean <- 0.9 mean + 0.1 batch_mean`, `var <- 0.9 var + 0.1 batch_var * n / (n - 1)`,
  n = B*H*W), so a train-mode call must run on a mutable module (e.g. `nnx.merge`
  inside `jit`, then `nnx.state(model, nnx.BatchStat)`). The statistics are computed in
  the global view (`jnp.mean` over the whole batch): under `jit` with the batch sharded
  on a mesh, XLA reduces them across devices, i.e. synchronised BatchNorm over the batch
  mesh axes (torch `SyncBatchNorm`), never per-device statistics.

Init follows open_clip: conv kernels U(+-1/sqrt(fan_in)) (torch default),
attention-pool kernels and positional embedding N(0, width*32 ** -0.5); the
attention-pool biases start at zero (torch: uniform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError

from clipjax.config import VisionConfig
from clipjax.layers import Dense, ones, param, zeros
from clipjax.sharding import constrain

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch BatchNorm2d default: running = (1 - m) * running + m * batch
EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION
_ACT = ("batch", None, None, "act_embed")  # logical names of an NHWC activation


def _uniform(bound: float):
    """torch's default conv/linear init, `U(-bound, bound)` with `bound = 1/sqrt(fan_in)`."""
    return lambda key, shape, dtype: jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
    """torch `AvgPool2d(k)` (stride k, no padding, floor) on `[B, H, W, C]`, accumulated in float32."""
    if k == 1:
        return x
    b, h, w, c = x.shape
    ho, wo = h // k, w // k
    y = x[:, : ho * k, : wo * k].reshape(b, ho, k, wo, k, c)
    return y.mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


class Conv(nnx.Module):
    """Bias-free 2-D convolution, kernel HWIO `[k, k, in, out]`, torch-style symmetric padding `k // 2`."""

    def __init__(self, d_in: int, d_out: int, k: int, *, stride: int = 1, param_dtype, rngs: nnx.Rngs):
        self.stride = stride
        names = (None, None, "embed" if d_in > 3 else None, "mlp")
        self.kernel = param(rngs, _uniform((d_in * k * k) ** -0.5), (k, k, d_in, d_out), names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, in]` -> `[B, H', W', out]` in `x.dtype`."""
        k = self.kernel.shape[0]
        pad = k // 2
        return jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
    """BatchNorm2d over the channel axis of `[B, H, W, C]`: `(x - mean) / sqrt(var + eps) * scale + bias`.

    Computed in float32 and cast back to `x.dtype`. `mean`/`var` are `nnx.BatchStat`s: the
    running statistics in eval mode (no gradient), updated with momentum 0.1 in train mode,
    where the batch statistics normalise (torch `BatchNorm2d.train()`).
    """

    def __init__(self, dim: int, *, scale_init=ones, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, scale_init, (dim,), (None,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (None,), param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros((dim,), param_dtype), out_sharding=(None,), eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((dim,), param_dtype), out_sharding=(None,), eager_sharding=False)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """`[B, H, W, C]` -> same shape and dtype; `train=True` also updates `mean`/`var` in place."""
        if not train:
            mean = jax.lax.stop_gradient(self.mean[...]).astype(jnp.float32)
            var = jax.lax.stop_gradient(self.var[...]).astype(jnp.float32)
            y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + BN_EPS)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
            return y.astype(x.dtype)
        axes = tuple(range(x.ndim - 1))
        n = 1
        for a in axes:
            n *= x.shape[a]
        if n < 2:
            raise ValueError(f"train-mode BatchNorm needs more than 1 value per channel, got input shape {x.shape}")
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=axes)  # global view: a cross-device reduction when the batch is sharded
        var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # biased (two-pass), used to normalise
        m = BN_MOMENTUM
        unbiased = jax.lax.stop_gradient(var) * (n / (n - 1))
        old_mean, old_var = self.mean[...], self.var[...]
        batch_mean = jax.lax.stop_gradient(mean)
        self._update("mean", ((1 - m) * old_mean.astype(jnp.float32) + m * batch_mean).astype(old_mean.dtype))
        self._update("var", ((1 - m) * old_var.astype(jnp.float32) + m * unbiased).astype(old_var.dtype))
        y = (x32 - mean) * jax.lax.rsqrt(var + BN_EPS)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)

    def _update(self, name: str, value: jax.Array) -> None:
        """Write a running statistic in place.

        A statistic whose Variable belongs to an outer JAX trace cannot be mutated (flax raises
        `TraceContextError`), e.g. when the statistics are a non-differentiated argument of
        `jax.grad(loss)(params, batch_stats)` that `loss` merges into the module: then a fresh
        BatchStat with the same metadata replaces it on this (inner-trace) module, so
        `nnx.state(module, nnx.BatchStat)` still returns the updated values and the caller's
        Variable is left as it was.
        """
        var = getattr(self, name)
        try:
            var[...] = value
        except TraceContextError:
            setattr(self, name, type(var)(value, **var.get_metadata()))


class Downsample(nnx.Module):
    """Bottleneck shortcut: AvgPool(stride) -> 1x1 conv -> BN (torch `downsample.{-1,0,1}`)."""

    def __init__(self, d_in: int, d_out: int, stride: int, *, param_dtype, rngs: nnx.Rngs):
        self.stride = stride
        self.conv = Conv(d_in, d_out, 1, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(d_out, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.bn(self.conv(_avg_pool(x, self.stride)), train=train)


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 -> (avgpool if strided) -> 1x1 with ReLUs; residual add then ReLU.

    `bn3.scale` starts at zero (open_clip `init_parameters`), so a fresh block is the identity
    shortcut followed by ReLU.
    """

    def __init__(self, d_in: int, planes: int, stride: int, *, param_dtype, rngs: nnx.Rngs):
        d_out = planes * EXPANSION
        self.stride = stride
        self.conv1 = Conv(d_in, planes, 1, param_dtype=param_dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = Conv(planes, planes, 3, param_dtype=param_dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, param_dtype=param_dtype, rngs=rngs)
        self.conv3 = Conv(planes, d_out, 1, param_dtype=param_dtype, rngs=rngs)
        self.bn3 = BatchNorm(d_out, scale_init=zeros, param_dtype=param_dtype, rngs=rngs)
        needs_shortcut = stride > 1 or d_in != d_out
        self.downsample = (Downsample(d_in, d_out, stride, param_dtype=param_dtype, rngs=rngs)
                           if needs_shortcut else None)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """`[B, H, W, in]` -> `[B, H / stride, W / stride, planes * 4]`; `train`: batch-statistics BN."""
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = jax.nn.relu(self.bn2(self.conv2(out), train=train))
        out = self.bn3(self.conv3(_avg_pool(out, self.stride)), train=train)
        identity = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(out + identity)


class AttentionPool2d(nnx.Module):
    """open_clip `AttentionPool2d`: mean token + positional embedding, one MHA read-out, `c_proj`.

    Params: `positional_embedding` `[grid**2 + 1, C]`; `q_proj`, `k_proj`, `v_proj` `[C, C]`;
    `c_proj` `[C, embed_dim]` (kernels are torch Linear weights transposed), each with a bias.
    """

    def __init__(self, grid: int, dim: int, heads: int, embed_dim: int, *, param_dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"attention-pool width {dim} is not divisible by heads={heads}")
        self.heads = heads
        std = dim**-0.5  # open_clip init_parameters: std = c_proj.in_features ** -0.5
        self.positional_embedding = param(rngs, lambda k, s, d: (jax.random.normal(k, s) * std).astype(d),
                                          (grid * grid + 1, dim), (None, "embed"), param_dtype)
        self.q_proj = Dense(dim, dim, names=("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = Dense(dim, dim, names=("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)
        self.v_proj = Dense(dim, dim, names=("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)
        self.c_proj = Dense(dim, embed_dim, names=("embed", "mlp"), std=std, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Pool a feature map `[B, g, g, C]` -> `[B, embed_dim]`.

        Only the mean token's query is computed: the other output tokens are discarded by
        open_clip (`x[0]`), so this is the same result with 1/(g*g+1) of the query work.
        """
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        mean = tokens.mean(axis=1, keepdims=True, dtype=jnp.float32).astype(x.dtype)
        tokens = jnp.concatenate([mean, tokens], axis=1)  # [B, g*g + 1, C]
        tokens = tokens + self.positional_embedding[...].astype(x.dtype)
        n, dh = self.heads, c // self.heads
        q = self.q_proj(tokens[:, :1]).reshape(b, 1, n, dh)
        k = self.k_proj(tokens).reshape(b, h * w + 1, n, dh)
        v = self.v_proj(tokens).reshape(b, h * w + 1, n, dh)
        o = jax.nn.dot_product_attention(q, k, v)  # softmax in float32, scale 1/sqrt(dh)
        return self.c_proj(o.reshape(b, c))

    def dense(self, x: jax.Array, *, add_pos_embed: bool = False) -> jax.Array:
        """MaskCLIP's ResNet value path, per position: `c_proj(v_proj(x_hw))`, `[B, g, g, C]` -> `[B, g*g, E]`.

        This is the RN analogue of methods.md §19: the attention pool with the q.k mixing
        removed, so each spatial feature goes through the value and output projections on its
        own. MaskCLIP (`MaskClipHead.forward`, non-ViT branch: `c_proj(v_proj(x))` as 1x1 convs)
        and GL-MCM (`AttentionPool2d.forward`, `x_local`) both apply it to the raw layer4
        features WITHOUT the positional embedding, which is the default here;
        `add_pos_embed=True` adds the per-position embedding `pos[1:]` first.
        """
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if add_pos_embed:
            tokens = tokens + self.positional_embedding[1:].astype(x.dtype)
        return self.c_proj(self.v_proj(tokens))


class ModifiedResNet(nnx.Module):
    """OpenAI CLIP's ResNet image tower: `[B, S, S, 3]` pixels -> `[B, embed_dim]` (not normalised).

    Args:
      cfg: a `VisionConfig` with `arch='resnet'`: `layers` (4 bottleneck counts), `width`
        (stem width; features are `width * 32` wide), `heads` (attention-pool heads),
        `image_size` (a multiple of 32).
      embed_dim: output width of the attention pool (open_clip `output_dim`).
      param_dtype: storage dtype of every Param.
      rngs: initialisation keys (not stored).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.arch != "resnet":
            raise ValueError(f"ModifiedResNet needs VisionConfig(arch='resnet'), got arch={cfg.arch!r}")
        if cfg.image_size % 32:
            raise ValueError(f"ModifiedResNet image_size must be a multiple of 32, got {cfg.image_size}")
        self.cfg = cfg
        w = cfg.width
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.conv1 = Conv(3, w // 2, 3, stride=2, **kw)
        self.bn1 = BatchNorm(w // 2, **kw)
        self.conv2 = Conv(w // 2, w // 2, 3, **kw)
        self.bn2 = BatchNorm(w // 2, **kw)
        self.conv3 = Conv(w // 2, w, 3, **kw)
        self.bn3 = BatchNorm(w, **kw)
        d_in = w
        stages = []
        for i, blocks in enumerate(cfg.layers):
            planes, stride = w * 2**i, 1 if i == 0 else 2
            stage = [Bottleneck(d_in, planes, stride, **kw)]
            d_in = planes * EXPANSION
            stage += [Bottleneck(d_in, planes, 1, **kw) for _ in range(1, blocks)]
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(cfg.grid, w * 32, cfg.heads, embed_dim, **kw)

    def _check(self, x: jax.Array, *, exact: bool) -> None:
        """Static checks: NHWC float pixels; side = cfg.image_size (`exact`) or any multiple of 32."""
        s = self.cfg.image_size
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"pixels must be NHWC [B, H, W, 3] (e.g. [B, {s}, {s}, 3]), got shape {x.shape}")
        if exact and x.shape[1:3] != (s, s):
            raise ValueError(f"the attention pool's positional embedding fixes the input to cfg.image_size={s}: "
                             f"pixels must be [B, {s}, {s}, 3], got shape {x.shape}")
        if x.shape[1] % 32 or x.shape[2] % 32:
            raise ValueError(f"pixel height and width must be multiples of 32, got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("pixels batch is empty (B=0)")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"pixels must be a float array (normalised), got dtype {x.dtype}")

    def stem(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Three conv-BN-ReLU then AvgPool(2): `[B, S, S, 3]` -> `[B, S/4, S/4, width]`."""
        x = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        x = jax.nn.relu(self.bn2(self.conv2(x), train=train))
        x = jax.nn.relu(self.bn3(self.conv3(x), train=train))
        return _avg_pool(x, 2)

    def features(self, x: jax.Array, *, dtype=jnp.float32, train: bool = False) -> jax.Array:
        """Trunk output (open_clip's layer4): `[B, H, W, 3]` -> `[B, H/32, W/32, width * 32]` in `dtype`.

        Any H, W that are multiples of 32 work here (the trunk is fully convolutional).
        `train=True`: BatchNorm normalises with (global) batch statistics and updates its running
        statistics in place (see the module docstring).
        """
        self._check(x, exact=False)
        x = constrain(x.astype(dtype), _ACT)
        x = self.stem(x, train=train)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, train=train)
            x = constrain(x, _ACT)
        return x

    def __call__(self, x: jax.Array, *, dtype=jnp.float32, train: bool = False) -> jax.Array:
        """Pixels `[B, S, S, 3]` (S = cfg.image_size) -> attention-pooled `[B, embed_dim]` in `dtype`.

        Same as open_clip's `visual(x)` in `.eval()` mode, or in `.train()` mode with `train=True`
        (batch-statistics BatchNorm; the running statistics are updated in place). Not L2-normalised.
        """
        self._check(x, exact=True)
        return self.attnpool(self.features(x, dtype=dtype, train=train))

    def dense(self, x: jax.Array, *, dtype=jnp.float32, add_pos_embed: bool = False) -> jax.Array:
        """MaskCLIP dense features `[B, h*w, embed_dim]` (row-major positions, h = H/32); see `AttentionPool2d.dense`.

        Without the positional embedding (the MaskCLIP / GL-MCM default) any H, W that are
        multiples of 32 work, e.g. MaskCLIP's larger segmentation inputs; `add_pos_embed=True`
        needs `cfg.image_size`.
        """
        if add_pos_embed:
            self._check(x, exact=True)
        return self.attnpool.dense(self.features(x, dtype=dtype), add_pos_embed=add_pos_embed)
