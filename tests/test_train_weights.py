"""WiSE-FT against a float64 numpy oracle of its definition."""

import dataclasses

import jax
import numpy as np
import pytest

import clipjax
from clipjax.models.clip import init_params
from clipjax.train import wise_ft


def _tiny():
    cfg = clipjax.get_config("ViT-B-32")
    return cfg.replace(embed_dim=8, vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=16,
                                                                layers=1, heads=1, mlp_dim=16),
                       text=dataclasses.replace(cfg.text, width=16, heads=1, layers=1, mlp_dim=16, context_length=4,
                                                vocab_size=20))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wise_ft_matches_definition(alpha):
    cfg = _tiny()
    t0, t1 = init_params(cfg, seed=0), init_params(cfg, seed=1)
    mixed = wise_ft(t0, t1, alpha)
    for a, b, m in zip(jax.tree.leaves(t0), jax.tree.leaves(t1), jax.tree.leaves(mixed)):
        want = (1 - alpha) * np.asarray(a, np.float64) + alpha * np.asarray(b, np.float64)
        np.testing.assert_allclose(np.asarray(m, np.float64), want, rtol=0, atol=1e-6)
    assert jax.tree.structure(mixed) == jax.tree.structure(t1)


def test_wise_ft_refuses_mismatches():
    cfg = _tiny()
    with pytest.raises(ValueError, match="alpha must be in"):
        wise_ft(init_params(cfg), init_params(cfg), 1.5)
    other = cfg.replace(embed_dim=4)
    with pytest.raises(ValueError, match="shape"):
        wise_ft(init_params(cfg), init_params(other), 0.5)
