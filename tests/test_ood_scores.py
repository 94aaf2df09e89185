"""MSP, max-logit, energy, MCM, GL-MCM and CLIPN scores: parity, known-answer data, sharding, bad input.

References:
  * pytorch-ood 0.4.0 detectors (`MaxSoftmax.score`, `MaxLogit.score`, `EnergyBased.score`,
    `MCM.predict_features`) -- they return *outlier* scores, the negation of ours. pytorch-ood
    0.4's MCM divides the cosines by `temperature` (default 1); older releases multiplied.
  * GL-MCM: a float64 numpy transcription of `AtsuMiyai/GL-MCM:utils/detection_util.py:
    get_ood_scores_clip` (normalise, softmax(cos / T), negated max over classes / patches).
  * CLIPN: a float64 torch transcription of `xmed-lab/CLIPN:src/zero_shot_infer.py:cal_all_metric`.

Tolerance: float32 kernels vs float64 references, rtol 2e-5 / atol 1e-6 (softmax of
cosines / T with T >= 0.01; values in [0, 1] or logsumexp of O(100) logits).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.ood import (auroc, clipn_scores, energy, gl_mcm, local_mcm, max_logit, mcm, msp, neglabel_score)

RTOL, ATOL = 2e-5, 1e-6


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    text = _unit(rng.normal(size=(7, 24))).astype(np.float32)
    images = rng.normal(size=(16, 24)).astype(np.float32)  # unnormalised on purpose
    local = rng.normal(size=(16, 5, 24)).astype(np.float32)
    return text, images, local


@pytest.mark.parity
@pytest.mark.parametrize("t", [1.0, 0.5, 0.01])
def test_logit_scores_match_pytorch_ood(t):
    import torch
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(16, 9)) * 5).astype(np.float32)
    lt = torch.from_numpy(logits.astype(np.float64))
    np.testing.assert_allclose(msp(logits, t), -MaxSoftmax.score(lt, t).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(energy(logits, t), -EnergyBased.score(lt, t).numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(max_logit(logits), -MaxLogit.score(lt).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parity
@pytest.mark.parametrize("t", [1.0, 0.5])
def test_mcm_matches_pytorch_ood(data, t):
    import torch
    from pytorch_ood.detector import MCM

    text, images, _ = data
    ref = MCM(None, torch.from_numpy(text.astype(np.float64)), temperature=t)
    want = -ref.predict_features(torch.from_numpy(images.astype(np.float64))).numpy()
    np.testing.assert_allclose(mcm(images, text, t), want, rtol=RTOL, atol=ATOL)


def _glmcm_oracle(global_f, local_f, text, t, lam):
    """The GL-MCM repository's `get_ood_scores_clip` in float64, negated back to ID-ness."""
    g = _unit(global_f.astype(np.float64))
    loc = _unit(local_f.astype(np.float64))
    tf = _unit(text.astype(np.float64))

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    smax_global = softmax(g @ tf.T / t)
    smax_local = softmax(loc @ tf.T / t)  # [B, P, K]
    mcm_global = -np.max(smax_global, axis=1)
    mcm_local = -np.max(smax_local, axis=(1, 2))
    return -(mcm_global + lam * mcm_local), -mcm_local


@pytest.mark.parametrize("t,lam", [(1.0, 0.5), (0.1, 1.0)])
def test_gl_mcm_matches_reference_formula(data, t, lam):
    text, images, local = data
    want, want_local = _glmcm_oracle(images, local, text, t, lam)
    np.testing.assert_allclose(gl_mcm(images, local, text, t, lam), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(local_mcm(local, text, t), want_local, rtol=RTOL, atol=ATOL)


@pytest.mark.parity
def test_clipn_matches_reference_code():
    import torch

    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(12, 16))).astype(np.float32)
    w_yes = _unit(rng.normal(size=(6, 16))).astype(np.float32)
    w_no = _unit(rng.normal(size=(6, 16))).astype(np.float32)
    xt, yt, nt = (torch.from_numpy(a.astype(np.float64)) for a in (x, w_yes, w_no))
    logits, logits_no = 100 * xt @ yt.T, 100 * xt @ nt.T  # ViT_Classifier.forward: 100 * cos
    idex = torch.argmax(logits, -1).unsqueeze(-1)
    yesno = torch.cat([logits.unsqueeze(-1), logits_no.unsqueeze(-1)], -1)
    yesno = torch.softmax(yesno, dim=-1)[:, :, 0]
    ctw = torch.gather(yesno, dim=1, index=idex)[:, 0].numpy()
    atd = (yesno * torch.softmax(logits, -1)).sum(1).numpy()
    got = clipn_scores(x, w_yes, w_no)
    np.testing.assert_allclose(got.ctw, ctw, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got.atd, atd, rtol=RTOL, atol=ATOL)


def _clusters(seed=0, k=10, d=64, n=1000):
    """ID: noisy copies of K random unit prototypes. OOD: the same noise around a shifted centre
    orthogonal to every prototype."""
    rng = np.random.default_rng(seed)
    text = _unit(rng.normal(size=(k, d)))
    shift = rng.normal(size=d)
    shift -= text.T @ np.linalg.lstsq(text.T, shift, rcond=None)[0]
    shift = _unit(shift)
    noise = 0.6 / np.sqrt(d)
    id_x = _unit(text[rng.integers(0, k, n)] + noise * rng.normal(size=(n, d)))
    ood_x = _unit(shift + noise * rng.normal(size=(n, d)))
    return text.astype(np.float32), id_x.astype(np.float32), ood_x.astype(np.float32), rng


def test_gaussian_clusters_known_answer():
    """The right scores separate a shifted OOD cluster almost perfectly; shuffled labels give chance."""
    text, id_x, ood_x, rng = _clusters()
    negatives = _unit(rng.normal(size=(300, text.shape[1]))).astype(np.float32)
    scores = {
        "mcm": lambda x: mcm(x, text),
        "msp": lambda x: msp(100 * x @ text.T),
        "max_logit": lambda x: max_logit(x @ text.T),
        "energy": lambda x: energy(100 * x @ text.T),
        "neglabel": lambda x: neglabel_score(x, text, negatives, num_groups=3),
    }
    for name, fn in scores.items():
        s_in, s_out = np.asarray(fn(id_x)), np.asarray(fn(ood_x))
        assert float(auroc(s_in, s_out)) > 0.99, name
        both = np.concatenate([s_in, s_out])
        perm = rng.permutation(both.size)  # shuffled ID/OOD assignment: no information left
        shuffled = float(auroc(both[perm[: s_in.size]], both[perm[s_in.size:]]))
        assert abs(shuffled - 0.5) < 0.05, (name, shuffled)  # null std ~0.009 at n = 1000 + 1000


def test_scores_sharded_over_8_devices_equal_unsharded(mesh8, data):
    text, _, _ = data
    rng = np.random.default_rng(4)
    images = rng.normal(size=(32, 24)).astype(np.float32)
    local = rng.normal(size=(32, 5, 24)).astype(np.float32)
    no = _unit(rng.normal(size=(7, 24))).astype(np.float32)
    neg = _unit(rng.normal(size=(20, 24))).astype(np.float32)
    row = NamedSharding(mesh8, P("data"))
    img_s, loc_s = jax.device_put(images, row), jax.device_put(local, row)
    logits_s = jax.device_put(100 * images @ text.T, row)
    assert len(img_s.sharding.device_set) == 8
    cases = {
        "mcm": (lambda x: mcm(x, text), img_s, images),
        "msp": (lambda l: msp(l), logits_s, 100 * images @ text.T),
        "energy": (lambda l: energy(l), logits_s, 100 * images @ text.T),
        "max_logit": (lambda l: max_logit(l), logits_s, 100 * images @ text.T),
        "gl_mcm": (lambda x, lo: gl_mcm(x, lo, text), (img_s, loc_s), (images, local)),
        "neglabel": (lambda x: neglabel_score(x, text, neg, num_groups=4), img_s, images),
        "clipn_atd": (lambda x: clipn_scores(x, text, no).atd, img_s, images),
    }
    for name, (fn, sharded, plain) in cases.items():
        sharded = sharded if isinstance(sharded, tuple) else (sharded,)
        plain = plain if isinstance(plain, tuple) else (plain,)
        got = jax.jit(fn)(*sharded)
        np.testing.assert_allclose(got, fn(*plain), rtol=1e-6, atol=1e-7, err_msg=name)


def test_bad_input(data):
    text, images, local = data
    nan_images = images.copy()
    nan_images[3, 2] = np.nan
    with pytest.raises(ValueError, match="empty"):
        mcm(images, np.zeros((0, 24), np.float32))  # empty label list
    with pytest.raises(ValueError, match="duplicate"):
        mcm(images, np.concatenate([text, text[2:3]]))  # duplicate label
    with pytest.raises(ValueError, match="dimensions differ"):
        mcm(images[:, :20], text)
    with pytest.raises(ValueError, match="NaN"):
        mcm(nan_images, text)
    with pytest.raises(ValueError, match="NaN"):
        energy(100 * nan_images @ text.T)
    with pytest.raises(TypeError, match="floating"):
        msp(np.ones((3, 4), np.int32))
    with pytest.raises(ValueError, match="rank 2"):
        max_logit(np.ones((3,), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        mcm(images, text, 0.0)
    with pytest.raises(ValueError, match="different lengths"):
        gl_mcm(images, local[:4], text)
    with pytest.raises(ValueError, match="rank 3"):
        gl_mcm(images, images, text)
    with pytest.raises(ValueError, match="different lengths"):
        clipn_scores(images, text, text[:3])
    # validate=False skips the value checks (for use inside larger jitted code) but not the shape checks
    assert np.isnan(np.asarray(mcm(nan_images, text, validate=False))[3])
    jitted = jax.jit(lambda x: mcm(x, text))
    assert jitted(jnp.asarray(images)).shape == (16,)
