"""The modality gap of paired image-text embeddings and the shift experiment (Liang et al., NeurIPS 2022).

Reference: `Weixin-Liang/Modality-Gap`, `Table_1_Implications_CLIP_Zero_Shot/shifting/shift_features.ipynb`
(`move_features`, `evaluate_retrieval`), on paired, L2-normalised embeddings x (image) and y (text):

- gap: delta = mean_i x_i - mean_i y_i (`[E]`) and its length ||delta|| (0.82 in the paper's README;
  0.8514 for the repo's `features_clip.npy`, 500 COCO pairs, ViT-B/16);
- shift along d = delta / ||delta|| by lambda: x' = normalize(x - (lambda / 2) d),
  y' = normalize(y + (lambda / 2) d); lambda > 0 closes the gap, lambda < 0 widens it. The notebook
  sweeps lambda over `np.arange(-5, 5, 0.25)` (`DEFAULT_LAMBDAS`) and reports the gap distance
  ||mean y' - mean x'|| and the image->text top-1 accuracy over the pairs (image i retrieves text i;
  the notebook's "Text R@1").

Ties in the top-1 accuracy resolve to the lowest text index (`argmax`); the notebook's
`argsort(...)[-1:]` takes the highest. With float embeddings exact ties do not occur in practice.

CLIPMasterPrints' mitigation uses a different, unnormalised gap (raw embeddings, both modalities
moved by 0.25 g): see `clipjax.robust.fooling.embedding_gap` / `shift_embeddings`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks

__all__ = ["DEFAULT_LAMBDAS", "gap_sweep", "modality_gap", "shift_modalities"]

DEFAULT_LAMBDAS = np.arange(-5.0, 5.0, 0.25)  # move_features' sweep, 40 values


def _pairs(image_embeddings, text_embeddings, normalize: bool, validate: bool):
    """Checked `[N, E]` pairs, L2-normalised when `normalize` (unit norms required otherwise)."""
    x = checks.array("image_embeddings", image_embeddings, "[N, E]")
    y = checks.array("text_embeddings", text_embeddings, "[N, E]")
    checks.same_dim(image_embeddings=x, text_embeddings=y)
    checks.same_len(image_embeddings=x, text_embeddings=y)
    for name, v in (("image_embeddings", x), ("text_embeddings", y)):
        checks.values(name, v, unit_norm=not normalize, nonzero=normalize, validate=validate,
                      hint=" or pass normalize=True")
    dtype = jnp.promote_types(jnp.result_type(x.dtype, y.dtype), jnp.float32)
    x, y = x.astype(dtype), y.astype(dtype)
    if normalize:
        x, y = checks.l2_normalize(x), checks.l2_normalize(y)
    return x, y


def _direction(x, y, direction, validate):
    """d = delta / ||delta|| from the pairs, or the given `[E]` direction used as is."""
    if direction is None:
        delta = jnp.mean(x, axis=0) - jnp.mean(y, axis=0)
        checks.nonzero_rows("the modality gap (mean image - mean text embedding)", delta[None], validate=validate)
        return checks.l2_normalize(delta)
    d = checks.array("direction", direction, "[E]", sizes={"E": x.shape[1]})
    checks.finite("direction", d, validate=validate)
    return d.astype(x.dtype)


@jax.jit
def _gap(x, y):
    delta = jnp.mean(x, axis=0) - jnp.mean(y, axis=0)
    return delta, jnp.linalg.norm(delta)


def modality_gap(image_embeddings, text_embeddings, *, normalize: bool = False,
                 validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """The modality gap delta = mean image embedding - mean text embedding, and its L2 norm.

    Args:
      image_embeddings: `[N, E]` image embeddings x, L2-normalised unless `normalize=True`.
      text_embeddings: `[N, E]` text embeddings y paired with the images.
      normalize: L2-normalise both first.
      validate: check NaN/inf and unit norms (all-zero rows with `normalize=True`) when concrete.

    Returns:
      `(delta [E], norm)`: the gap vector and ||delta|| (0 when the modalities coincide; delta changes
      sign when they are swapped).
    """
    x, y = _pairs(image_embeddings, text_embeddings, normalize, validate)
    return _gap(x, y)


def _shift(x, y, lam, d):
    half = 0.5 * lam
    return checks.l2_normalize(x - half * d), checks.l2_normalize(y + half * d)


def shift_modalities(image_embeddings, text_embeddings, lam, *, direction=None, normalize: bool = False,
                     validate: bool = True) -> tuple[jax.Array, jax.Array]:
    """`move_features` for one lambda: x' = normalize(x - lam/2 d), y' = normalize(y + lam/2 d).

    Args:
      image_embeddings: `[N, E]` image embeddings x, L2-normalised unless `normalize=True`.
      text_embeddings: `[N, E]` text embeddings y paired with the images.
      lam: the shift lambda (a number or a scalar array, may be traced); positive closes the gap.
      direction: `[E]` direction d used as is (e.g. a unit gap from another dataset, as the notebook's
        COCO direction applied to SVHN); None means delta / ||delta|| of these pairs.
      normalize: L2-normalise the inputs first.
      validate: check NaN/inf, unit norms and a non-zero gap when concrete.

    Returns:
      `(image', text')`, each `[N, E]` and L2-normalised.
    """
    x, y = _pairs(image_embeddings, text_embeddings, normalize, validate)
    checks.scalar("lam", lam)
    d = _direction(x, y, direction, validate)
    return _shift(x, y, jnp.reshape(jnp.asarray(lam), ()).astype(x.dtype), d)


@functools.partial(jax.jit, static_argnames=("lambda_batch",))
def _sweep(x, y, lambdas, d, lambda_batch):
    targets = jnp.arange(x.shape[0])

    def one(lam):
        xs, ys = _shift(x, y, lam, d)
        gap = jnp.linalg.norm(jnp.mean(ys, axis=0) - jnp.mean(xs, axis=0))
        top1 = jnp.argmax(xs @ ys.T, axis=-1)
        return gap, jnp.mean((top1 == targets).astype(x.dtype))

    return jax.lax.map(one, lambdas, batch_size=lambda_batch)


def gap_sweep(image_embeddings, text_embeddings, lambdas=DEFAULT_LAMBDAS, *, direction=None,
              normalize: bool = False, lambda_batch: int | None = None,
              validate: bool = True) -> dict[str, jax.Array]:
    """The shift experiment: gap distance and image->text top-1 accuracy for each lambda.

    One jitted program; lambdas run `lambda_batch` at a time through `vmap` (`lax.map` with
    `batch_size`; None vmaps all of them, which holds L `[N, N]` similarity matrices at once).

    Args:
      image_embeddings: `[N, E]` image embeddings x, L2-normalised unless `normalize=True`.
      text_embeddings: `[N, E]` text embeddings y; row i is image i's caption.
      lambdas: `[L]` shifts (default `np.arange(-5, 5, 0.25)`, the notebook's sweep).
      direction: `[E]` direction d used as is; None means delta / ||delta|| of these pairs.
      normalize: L2-normalise the inputs first.
      lambda_batch: lambdas per vmapped chunk (None: all).
      validate: check NaN/inf, unit norms and a non-zero gap when concrete.

    Returns:
      dict of `[L]` arrays: "lambda", "gap" (||mean y' - mean x'||) and "accuracy" (fraction of images
      whose most similar shifted text is their own).
    """
    x, y = _pairs(image_embeddings, text_embeddings, normalize, validate)
    lam = checks.array("lambdas", lambdas, "[L]", dtype=None).astype(x.dtype)
    checks.finite("lambdas", lam, validate=validate)
    if lambda_batch is not None:
        lambda_batch = checks.positive_int("lambda_batch", lambda_batch)
    d = _direction(x, y, direction, validate)
    gap, accuracy = _sweep(x, y, lam, d, lambda_batch)
    return {"lambda": lam, "gap": gap, "accuracy": accuracy}
