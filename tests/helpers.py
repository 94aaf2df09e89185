"""Shared test helpers (imported as `helpers`: tests/ is on sys.path under pytest)."""


def assert_close_scaled(actual, expected, rel=1e-5, what="values"):
    """max|a - b| <= rel * scale, scale = the largest row L2 norm of `expected` (the embedding scale)."""
    import numpy as np

    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = float(np.linalg.norm(b.reshape(-1, b.shape[-1]), axis=-1).max())
    err = float(np.abs(a - b).max())
    assert err <= rel * scale, f"{what}: max abs diff {err:.3g} > {rel:g} x scale {scale:.3g}"
    return err
