"""CLIPMasterPrints: mining one image that CLIP scores highly for many captions at once.

Reference: Freiberger et al., "CLIPMasterPrints: Fooling Contrastive Language-Image Pre-training
Using Latent Variable Evolution", `matfrei/CLIPMasterPrints` (commit 2eb72a8):

- loss (`clipmasterprints/losses/clip_loss.py`: `CLIPLoss.loss_grad` with `global_min`): for an image
  x and captions t_1..t_K, L(x) = -min_k cos(t_k, x); minimising it raises the worst caption score.
  The paper's captions are raw ImageNet class names (no template), K in {25, 50, 75, 100}.
- "SGD" miner (`clipmasterprints/optimizers/gradient.py`: `GradientOptimizer.optimize`): Adam (torch
  defaults; `config/cmp_imagenet_classes_sgd.yaml`: lr 0.1, 1000 iterations, batch 1), the variable
  initialised from U(0, 1), loss summed over the candidates. The range is kept by a *clamp*, not a
  sigmoid: in the stored `train/mine.py` the variable is decoded by
  `StableDiffusionWrapperWGradient.decode`, whose postprocessing is `torch.clamp((x + 1) / 2, 0, 1)`,
  and the variable itself is never projected. (That config names its method 'RAWSGD', the pixel-space
  variant robustness.md item 4 describes, whose code is not in the stored snapshot.) `mine_pixels`
  works in pixel space: `bound="clamp"` (default) keeps the reference's mechanism (image = clip(v, 0, 1)
  in the forward pass, zero gradient outside), `bound="project"` clips v to [0, 1] after each Adam
  step instead (projected Adam; image = v).
- LVE miner (`clipmasterprints/optimizers/cmaes.py`: `CMAESOptimizer`): pycma CMA-ES with its default
  population 4 + floor(3 ln n), sigma0 = 1, mean0 ~ N(0, I) ('norm' init), in the Stable Diffusion
  v1.4 VAE latent (4 x 28 x 28 for 224 px), images decoded as above. clipjax cannot ship that VAE:
  `mine_cmaes` by default searches a low-resolution pixel latent z `[S/8, S/8, 3]` (floor, at least 1)
  decoded by `decode_pixel_latent`: image = clip((resize(z, [S, S, 3]) + 1) / 2, 0, 1) with
  `jax.image.resize(method="linear")` (bilinear, half-pixel centres), i.e. the same [-1, 1] -> [0, 1]
  clamp as the SD decoder. Pass `decode` and `latent_shape` to search a real generative latent.
  CMA-ES is evosax 0.3.2's `CMA_ES` (ask/tell), which follows Hansen's tutorial as pycma does but
  differs in details (pycma updates its eigendecomposition lazily, evosax every generation; their
  random streams differ), so only achieved objectives are comparable, not trajectories.
- fooling accuracy (`clipmasterprints/utils/features.py`: `eval_fooling_accuracy`): over the pairs
  (class c, image i of class c), the fraction with cos(t_c, CMP) > cos(t_c, x_i), strictly.
- mitigation (`ShiftedCLIPLoss`, `train/mine.py`): g = mean raw image embedding (ImageNet train) - mean
  raw text embedding; text += 0.25 g, image -= 0.25 g, then normalise. `train/mine.py` takes the text
  mean without a dim (`torch.mean(text_features)`), so its text term is one scalar broadcast over E:
  `embedding_gap(..., quirk=True)` reproduces that.

`embed_fn(pixels01 [B, S, S, 3]) -> [B, E]` is the caller's image tower on pixels in [0, 1] (NHWC),
including resizing and CLIP mean/std normalisation, e.g.
`lambda p: clip.encode_image(params, (p - mean) / std, config=cfg, normalize=False)`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from clipjax import checks

__all__ = [
    "decode_pixel_latent",
    "embedding_gap",
    "fooling_accuracy",
    "master_print_loss",
    "mine_cmaes",
    "mine_pixels",
    "shift_embeddings",
]

SHIFT_AMOUNT = 0.25
LATENT_DOWNSAMPLING = 8
BOUNDS = ("clamp", "project")


# ----------------------------------------------------------------------------- loss and mitigation
def _text(text_embeddings, validate, name="text_embeddings"):
    t = checks.array(name, text_embeddings, "[K, E]")
    checks.nonzero_rows(name, t, validate=validate)
    return t


def _shifted(image, text, gap, amount):
    """(normalize(image - amount g), normalize(text + amount g)); no shift when `gap` is None."""
    if gap is not None:
        image = image - amount * gap
        text = text + amount * gap
    return checks.l2_normalize(image), checks.l2_normalize(text)


def _check_gap(gap, dim, amount, validate):
    checks.scalar("amount", amount)
    if gap is None:
        return None
    g = checks.array("gap", gap, "[E]", sizes={"E": dim})
    checks.finite("gap", g, validate=validate)
    return g


def _loss(image_emb, text_unit):
    """-min_k cos(t_k, x) for L2-normalised text rows `[K, E]` and raw or unit images `[B, E]`."""
    x = checks.l2_normalize(image_emb.astype(jnp.promote_types(image_emb.dtype, jnp.float32)))
    return -jnp.min(x @ text_unit.T.astype(x.dtype), axis=-1)


def master_print_loss(image_embeddings, text_embeddings, *, gap=None, amount: float = SHIFT_AMOUNT,
                      validate: bool = True) -> jax.Array:
    """CLIPMasterPrints loss -min_k cos(t_k, x) per image (`CLIPLoss.loss_grad`, `global_min`).

    Args:
      image_embeddings: `[B, E]` image embeddings, raw or L2-normalised (they are normalised here).
      text_embeddings: `[K, E]` caption embeddings, raw or normalised, K >= 1.
      gap: optional `[E]` raw modality gap (`embedding_gap`); when given, this is `ShiftedCLIPLoss`:
        images become x - amount g and texts t + amount g before normalising.
      amount: the shift fraction (0.25 in the reference).
      validate: check NaN/inf and all-zero rows when concrete.

    Returns:
      `[B]` losses in [-1, 1]; lower means every caption matches better.
    """
    x = checks.array("image_embeddings", image_embeddings, "[B, E]")
    t = _text(text_embeddings, validate)
    checks.same_dim(image_embeddings=x, text_embeddings=t)
    checks.nonzero_rows("image_embeddings", x, validate=validate)
    g = _check_gap(gap, t.shape[1], amount, validate)
    x, t = _shifted(x, t, g, amount)
    return _loss(x, t)


def embedding_gap(image_embeddings, text_embeddings, *, quirk: bool = False, validate: bool = True) -> jax.Array:
    """The raw modality gap g = mean raw image embedding - mean raw text embedding, `[E]`.

    Args:
      image_embeddings: `[N, E]` raw (unnormalised) image embeddings (ImageNet train in the reference).
      text_embeddings: `[K, E]` raw caption embeddings (all class names in the reference).
      quirk: reproduce `train/mine.py`, which averages the text embeddings over every element
        (`torch.mean(text_features)`, no dim), so the text term is one scalar subtracted from each
        component of the mean image embedding.
      validate: check NaN/inf when concrete.

    Returns:
      `[E]` gap (unscaled; `shift_embeddings` multiplies it by `amount`).
    """
    x = checks.array("image_embeddings", image_embeddings, "[N, E]")
    t = checks.array("text_embeddings", text_embeddings, "[K, E]")
    checks.same_dim(image_embeddings=x, text_embeddings=t)
    checks.finite("image_embeddings", x, validate=validate)
    checks.finite("text_embeddings", t, validate=validate)
    text_mean = jnp.mean(t) if quirk else jnp.mean(t, axis=0)
    return jnp.mean(x, axis=0) - text_mean


def shift_embeddings(image_embeddings, text_embeddings, gap, *, amount: float = SHIFT_AMOUNT,
                     validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """`ShiftedCLIPLoss`'s embeddings: normalize(image - amount g) and normalize(text + amount g).

    Args:
      image_embeddings: `[N, E]` raw image embeddings.
      text_embeddings: `[K, E]` raw text embeddings.
      gap: `[E]` raw gap from `embedding_gap`.
      amount: shift fraction (0.25 in the reference).
      validate: check NaN/inf when concrete.

    Returns:
      `(image', text')`, `[N, E]` and `[K, E]`, L2-normalised (a row that becomes exactly zero stays zero).
    """
    x = checks.array("image_embeddings", image_embeddings, "[N, E]")
    t = checks.array("text_embeddings", text_embeddings, "[K, E]")
    checks.same_dim(image_embeddings=x, text_embeddings=t)
    checks.finite("image_embeddings", x, validate=validate)
    checks.finite("text_embeddings", t, validate=validate)
    g = _check_gap(gap, t.shape[1], amount, validate)
    return _shifted(x, t, g, amount)


# ----------------------------------------------------------------------------- metric
@jax.jit
def _fooling_accuracy(text, master, image, labels, selected):
    t = checks.l2_normalize(text)[labels]  # [N, E]: each image's own class caption
    image_sim = jnp.sum(t * checks.l2_normalize(image), axis=-1)
    master_sim = t @ checks.l2_normalize(master)
    fooled = (image_sim < master_sim) & selected
    return jnp.sum(fooled) / jnp.sum(selected)


def fooling_accuracy(text_embeddings, master_embedding, image_embeddings, labels, *, classes=None,
                     validate: bool = True) -> jax.Array:
    """Fraction of pairs (class c, image of class c) with cos(t_c, CMP) > cos(t_c, image).

    `eval_fooling_accuracy` of `clipmasterprints/utils/features.py`, with every embedding normalised
    here (the reference receives normalised ones).

    Args:
      text_embeddings: `[C, E]` class caption embeddings (raw or normalised).
      master_embedding: `[E]` the master image's embedding.
      image_embeddings: `[N, E]` real image embeddings.
      labels: `[N]` integer classes in `[0, C)`.
      classes: optional `[K]` distinct class indices to evaluate (the reference passes the optimised
        classes); None means every class. Images of other classes are ignored.
      validate: check shapes' values (NaN/inf, zero rows, label range, duplicate classes, at least one
        selected image) when concrete.

    Returns:
      scalar in [0, 1], float32 (float64 with x64 enabled); NaN when no image is selected and `validate`
      is off or the inputs are traced.
    """
    t = _text(text_embeddings, validate)
    m = checks.array("master_embedding", master_embedding, "[E]", sizes={"E": t.shape[1]})
    x = checks.array("image_embeddings", image_embeddings, "[N, E]", sizes={"E": t.shape[1]})
    y = checks.array("labels", labels, "[N]", dtype="integer")
    checks.same_len(image_embeddings=x, labels=y)
    checks.nonzero_rows("master_embedding", m[None], validate=validate)
    checks.nonzero_rows("image_embeddings", x, validate=validate)
    checks.index_range("labels", y, t.shape[0], validate=validate)
    if classes is None:
        selected = jnp.ones(y.shape, bool)
    else:
        c = checks.array("classes", classes, "[K]", dtype="integer")
        checks.index_range("classes", c, t.shape[0], validate=validate)
        checks.unique_rows("classes", c[:, None], validate=validate)
        selected = jnp.any(y[:, None] == c[None, :], axis=1)
    if validate and checks.is_concrete(selected) and not bool(jnp.any(selected)):
        raise ValueError("labels: no image belongs to the evaluated classes, so the fooling accuracy is undefined")
    return _fooling_accuracy(t, m, x, y, selected)


# ----------------------------------------------------------------------------- miners
def _embedding_check(embed_fn, pixels_shape, dim):
    """Trace `embed_fn` abstractly; it must map `[B, S, S, 3]` to `[B, E]`."""
    out = jax.eval_shape(embed_fn, jax.ShapeDtypeStruct(pixels_shape, jnp.float32))
    if getattr(out, "shape", None) != (pixels_shape[0], dim):
        raise ValueError(f"embed_fn must map pixels [B, S, S, 3] = {pixels_shape} to embeddings [B, E] = "
                         f"{(pixels_shape[0], dim)} (E from text_embeddings), got {getattr(out, 'shape', out)}")


def _prepared_text(text_embeddings, gap, amount, validate):
    """Normalised (and shifted) caption embeddings, and the image shift to apply to every embedding."""
    t = _text(text_embeddings, validate).astype(jnp.float32)
    g = _check_gap(gap, t.shape[1], amount, validate)
    shift = jnp.zeros((t.shape[1],), t.dtype) if g is None else amount * g.astype(t.dtype)
    return checks.l2_normalize(t + shift), shift


def mine_pixels(embed_fn: Callable[[jax.Array], jax.Array], text_embeddings, key, *, image_size: int,
                steps: int = 1000, lr: float = 0.1, optimizer: Callable = optax.adam, bound: str = "clamp",
                gap=None, amount: float = SHIFT_AMOUNT, validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """The paper's "SGD" CLIPMasterPrint: Adam on the pixels of one image, from U(0, 1).

    One jitted program (`lax.scan` over the steps); it is compiled on each call.

    Args:
      embed_fn: differentiable `pixels01 [B, S, S, 3] -> [B, E]` (see the module docstring); raw
        (unnormalised) embeddings when `gap` is given, as the shift applies before normalising.
      text_embeddings: `[K, E]` caption embeddings (raw or normalised).
      key: PRNG key for the U(0, 1) start.
      image_size: S.
      steps: optimiser steps (1000 in the reference).
      lr: learning rate (0.1 in the reference's ImageNet configs).
      optimizer: optax factory called as `optimizer(lr)` (default Adam with torch's defaults).
      bound: "clamp" (image = clip(v, 0, 1), as the reference's decoder) or "project" (v clipped to
        [0, 1] after each step).
      gap: optional `[E]` raw gap for the `ShiftedCLIPLoss` mitigation; amount: its fraction.
      validate: check the captions (and gap) when concrete.

    Returns:
      `(image [S, S, 3] in [0, 1], losses [steps])`: the lowest-loss image among the steps + 1 iterates
      evaluated (the start, each update), and the loss of the iterate before each update.
    """
    size = checks.positive_int("image_size", image_size)
    steps = checks.positive_int("steps", steps)
    checks.positive_scalar("lr", lr)
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    text, shift = _prepared_text(text_embeddings, gap, amount, validate)
    _embedding_check(embed_fn, (1, size, size, 3), text.shape[1])
    tx = optimizer(lr)

    def image_of(v):
        return jnp.clip(v, 0.0, 1.0) if bound == "clamp" else v

    def loss_of(v):
        return jnp.sum(_loss(embed_fn(image_of(v)) - shift, text))

    def run(key, text, shift):
        v0 = jax.random.uniform(key, (1, size, size, 3), jnp.float32)

        def step(carry, _):
            v, opt_state, best, best_loss = carry
            loss, grad = jax.value_and_grad(loss_of)(v)
            better = loss < best_loss
            best = jnp.where(better, image_of(v), best)
            best_loss = jnp.where(better, loss, best_loss)
            updates, opt_state = tx.update(grad, opt_state, v)
            v = optax.apply_updates(v, updates)
            if bound == "project":
                v = jnp.clip(v, 0.0, 1.0)
            return (v, opt_state, best, best_loss), loss

        init = (v0, tx.init(v0), image_of(v0), jnp.asarray(jnp.inf, jnp.float32))
        (v, _, best, best_loss), losses = jax.lax.scan(step, init, None, length=steps)
        best = jnp.where(loss_of(v) < best_loss, image_of(v), best)
        return best[0], losses

    return jax.jit(run)(key, text, shift)


def decode_pixel_latent(latent: jax.Array, image_size: int) -> jax.Array:
    """The default CMA-ES decoder: `[P, h, w, 3]` latent in about [-1, 1] -> `[P, S, S, 3]` pixels in [0, 1].

    image = clip((jax.image.resize(z, [P, S, S, 3], "linear") + 1) / 2, 0, 1): bilinear upsampling with
    half-pixel centres, then the Stable Diffusion decoder's [-1, 1] -> [0, 1] clamp.
    """
    size = checks.positive_int("image_size", image_size)
    z = jnp.asarray(latent)
    up = jax.image.resize(z, (z.shape[0], size, size, z.shape[-1]), method="linear")
    return jnp.clip((up + 1.0) / 2.0, 0.0, 1.0)


def mine_cmaes(embed_fn: Callable[[jax.Array], jax.Array], text_embeddings, key, *, image_size: int,
               generations: int, popsize: int | None = None, sigma0: float = 1.0,
               latent_shape: tuple[int, ...] | None = None, decode: Callable | None = None, mean0=None,
               gap=None, amount: float = SHIFT_AMOUNT, validate: bool = True) -> tuple[jax.Array, dict]:
    """The paper's LVE CLIPMasterPrint: CMA-ES (evosax `CMA_ES`) on a latent decoded to an image.

    One jitted program (`lax.scan` over generations; each evaluates `popsize` candidates in one
    `embed_fn` batch); it is compiled on each call. Full-covariance CMA-ES holds an n x n matrix and
    eigendecomposes it every generation (n = prod(latent_shape)).

    Args:
      embed_fn: `pixels01 [P, S, S, 3] -> [P, E]` (no gradient needed); raw embeddings when `gap` is given.
      text_embeddings: `[K, E]` caption embeddings (raw or normalised).
      key: PRNG key (initial mean and sampling).
      image_size: S.
      generations: CMA-ES generations (the reference runs 50k).
      popsize: candidates per generation; None means pycma's default 4 + floor(3 ln n).
      sigma0: initial step size (1 in the reference).
      latent_shape: the latent's shape without the population axis; None means `[S/8, S/8, 3]` (floor,
        at least 1) for the default decoder; required with `decode`.
      decode: `latent [P, *latent_shape] -> pixels01 [P, S, S, 3]`; None means `decode_pixel_latent`.
      mean0: initial mean `latent_shape`; None draws N(0, I) from `key` (the reference's 'norm' init).
      gap: optional `[E]` raw gap for the `ShiftedCLIPLoss` mitigation; amount: its fraction.
      validate: check the captions (and gap) when concrete.

    Returns:
      `(image [S, S, 3], history)`: the decoded best candidate seen and a dict with "best_loss" `[G]`
      (best so far after each generation), "generation_loss" `[G]` (each generation's best) and
      "best_latent" `latent_shape`.
    """
    size = checks.positive_int("image_size", image_size)
    generations = checks.positive_int("generations", generations)
    checks.positive_scalar("sigma0", sigma0)
    if decode is None:
        decode = lambda z: decode_pixel_latent(z, size)  # noqa: E731
        if latent_shape is None:
            side = max(1, size // LATENT_DOWNSAMPLING)
            latent_shape = (side, side, 3)
    elif latent_shape is None:
        raise ValueError("latent_shape is required with a custom decode (the latent's shape without the "
                         "population axis)")
    latent_shape = tuple(checks.positive_int("latent_shape", int(d)) for d in latent_shape)
    dims = math.prod(latent_shape)
    popsize = 4 + int(3 * math.log(dims)) if popsize is None else checks.positive_int("popsize", popsize)
    if popsize < 2:
        raise ValueError(f"popsize must be at least 2 for CMA-ES, got {popsize}")
    text, shift = _prepared_text(text_embeddings, gap, amount, validate)
    if mean0 is not None:
        mean0 = checks.array("mean0", mean0, f"[{', '.join(map(str, latent_shape))}]", min_rows=0)
        if mean0.shape != latent_shape:
            raise ValueError(f"mean0 must have the latent shape {latent_shape}, got {mean0.shape}")
        checks.finite("mean0", mean0, validate=validate)
    out = jax.eval_shape(decode, jax.ShapeDtypeStruct((popsize, *latent_shape), jnp.float32))
    if getattr(out, "shape", None) != (popsize, size, size, 3):
        raise ValueError(f"decode must map latents [P, *latent_shape] = {(popsize, *latent_shape)} to pixels "
                         f"[P, S, S, 3] = {(popsize, size, size, 3)}, got {getattr(out, 'shape', out)}")
    _embedding_check(embed_fn, (popsize, size, size, 3), text.shape[1])

    from evosax.algorithms import CMA_ES  # optional dependency: the "robust" extra

    strategy = CMA_ES(population_size=popsize, solution=jnp.zeros(latent_shape, jnp.float32))
    params = strategy.default_params.replace(std_init=jnp.asarray(sigma0, jnp.float32))

    def fitness(latents, text, shift):
        return _loss(embed_fn(decode(latents)) - shift, text)

    def run(key, text, shift, mean0):
        key_mean, key_init, key_loop = jax.random.split(key, 3)
        mean = jax.random.normal(key_mean, latent_shape, jnp.float32) if mean0 is None else mean0
        state = strategy.init(key_init, mean.astype(jnp.float32), params)

        def generation(state, key):
            key_ask, key_tell = jax.random.split(key)
            population, state = strategy.ask(key_ask, state, params)
            loss = fitness(population, text, shift)
            state, _ = strategy.tell(key_tell, population, loss, state, params)
            return state, (state.best_fitness, jnp.min(loss))

        state, (best_loss, generation_loss) = jax.lax.scan(generation, state,
                                                           jax.random.split(key_loop, generations))
        best_latent = jnp.reshape(state.best_solution, latent_shape)
        return decode(best_latent[None])[0], best_latent, best_loss, generation_loss

    image, best_latent, best_loss, generation_loss = jax.jit(run)(key, text, shift, mean0)
    return image, {"best_loss": best_loss, "generation_loss": generation_loss, "best_latent": best_latent}
