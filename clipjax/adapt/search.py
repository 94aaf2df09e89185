"""Hyper-parameter search for the training-free adapters on a *validation* split.

The reference repositories tune on the ImageNet test set (methods.md §13-14); these
functions take an explicit validation split so that the test split stays unseen.
The grids and the selection rule are the references': the first grid point (in the
reference's loop order) with the highest top-1 accuracy wins.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.adapt import gda, tip_adapter
from clipjax.adapt.gda import check_features_labels

__all__ = ["GDA_ALPHAS", "accuracy", "select_gda_alpha", "select_tip_alpha_beta", "tip_grid"]

GDA_ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)


def tip_grid(search_scale=(7.0, 3.0), search_step=(200, 20)) -> tuple[np.ndarray, np.ndarray]:
    """Tip-Adapter's `search_hp` grids: `beta_i = i (scale_0 - 0.1) / step_0 + 0.1`, same for alpha.

    The ImageNet config (scale (7, 3), steps (200, 20)) gives beta in [0.1, 7) and alpha in [0.1, 3).
    """
    betas = np.array([i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])])
    alphas = np.array([i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])])
    return betas, alphas


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy (a fraction) of `[B, K]` logits against `[B]` labels."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def _first_best(accs: np.ndarray) -> int:
    return int(np.argmax(np.asarray(accs).reshape(-1)))


@jax.jit
def _gda_accuracies(params, features, labels, alphas):
    base = jnp.zeros((features.shape[0], params.weight.shape[1]), features.dtype)
    if params.text_emb is not None:
        base = params.logit_scale * (features @ params.text_emb.T)
    head = features @ params.weight + params.bias
    return jax.vmap(lambda a: accuracy(base + a * head, labels))(alphas)


def select_gda_alpha(params: gda.GDAParams, val_features: jax.Array, val_labels: jax.Array,
                     alphas=GDA_ALPHAS) -> tuple[gda.GDAParams, np.ndarray]:
    """Pick GDA's alpha by validation accuracy.

    Args:
      params: from `gda.fit`.
      val_features: `[Nv, D]` validation features (normalised), disjoint from the test split.
      val_labels: `[Nv]` int labels.
      alphas: the grid (the reference's {1e-4, ..., 100}).

    Returns:
      `(params with the best alpha, [len(alphas)] validation accuracies)`.
    """
    val_features, val_labels, _ = check_features_labels(val_features, val_labels, params.weight.shape[1],
                                                        names=("val_features", "val_labels"),
                                                        dim=params.weight.shape[0])
    alphas = jnp.asarray(alphas, params.weight.dtype)
    accs = np.asarray(_gda_accuracies(params, val_features, val_labels, alphas))
    best = alphas[_first_best(accs)]
    return params._replace(alpha=best), accs


@jax.jit
def _tip_accuracies(params, features, labels, betas, alphas):
    clip_logits = jnp.zeros((features.shape[0], params.values.shape[1]), features.dtype)
    if params.text_emb is not None:
        clip_logits = params.logit_scale * (features @ params.text_emb.T)
    affinity = features @ params.keys.T

    def per_beta(beta):
        cache = jnp.exp(-beta * (1.0 - affinity)) @ params.values
        return jax.vmap(lambda a: accuracy(clip_logits + a * cache, labels))(alphas)

    return jax.lax.map(per_beta, betas)


def select_tip_alpha_beta(params: tip_adapter.TipAdapterParams, val_features: jax.Array, val_labels: jax.Array,
                          betas=None, alphas=None) -> tuple[tip_adapter.TipAdapterParams, np.ndarray]:
    """Pick Tip-Adapter's (alpha, beta) by validation accuracy over the reference grid.

    Args:
      params: from `tip_adapter.fit`.
      val_features: `[Nv, D]` normalised validation features, disjoint from the test split.
      val_labels: `[Nv]` int labels.
      betas, alphas: grids; default `tip_grid()` (ImageNet's 200 x 20). Beta is the outer loop.

    Returns:
      `(params with the best alpha and beta, [len(betas), len(alphas)] validation accuracies)`.
    """
    val_features, val_labels, _ = check_features_labels(val_features, val_labels, params.values.shape[1],
                                                        names=("val_features", "val_labels"),
                                                        dim=params.keys.shape[1])
    if betas is None or alphas is None:
        default_b, default_a = tip_grid()
        betas = default_b if betas is None else betas
        alphas = default_a if alphas is None else alphas
    betas = jnp.asarray(betas, params.keys.dtype)
    alphas = jnp.asarray(alphas, params.keys.dtype)
    accs = np.asarray(_tip_accuracies(params, val_features, val_labels, betas, alphas))
    i, j = np.unravel_index(_first_best(accs), accs.shape)
    return params._replace(alpha=alphas[j], beta=betas[i]), accs
