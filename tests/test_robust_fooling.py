"""CLIPMasterPrints (`clipjax.robust.fooling`) against float64 numpy oracles and pip `cma` 4.5.0.

References and tolerances:
- loss, gap, shift: float64 numpy transcriptions of `clip_loss.py` (`CLIPLoss.score_images` +
  `global_min`, `ShiftedCLIPLoss`) and `train/mine.py`'s gap (incl. its scalar text mean); abs 1e-12
  under `jax.enable_x64`, 1e-6 in float32.
- fooling accuracy: a float64 transcription of `utils/features.py:eval_fooling_accuracy` (loop over
  classes, strict `result < fooling_result`); equal exactly in float64, and in float32 (the data's
  smallest |cos(t_c, CMP) - cos(t_c, x)| is checked to exceed 1e-5).
- `mine_pixels`, on a tiny random-init clipjax ViT over real digits (sklearn): the loss falls by > 0.3
  in 60 Adam steps, the returned image is in [0, 1] and scores the best loss seen, and its fooling
  accuracy exceeds that of the U(0, 1) starting image (the same key).
- `mine_pixels` vs a float64 torch transcription of the reference's `GradientOptimizer` (`torch.optim.Adam`,
  lr 0.1, 5 steps from the same U(0, 1) start, linear embedding, both bounds): losses and image atol 1e-5.
- `decode_pixel_latent` vs torch `F.interpolate(bilinear, align_corners=False)` + `clamp((x + 1) / 2, 0, 1)`
  (the Stable Diffusion wrapper's postprocessing) in float64: atol 2e-6.
- `mine_cmaes` vs pycma (`cma.CMAEvolutionStrategy`, same mean0, sigma0 = 1, popsize 15 = both
  defaults for n = 48, same 80 generations, the same float32 objective): CMA-ES implementations differ
  (eigendecomposition timing, random streams, ...), so only the achieved objective is
  compared: over 2 seeds, evosax's mean best loss is within 0.03 of pycma's, and each run beats random
  search with the same 1200 evaluations by > 0.1. On a problem with a known optimum (one caption,
  linear embedding, identity decode) it reaches -cos < -0.99.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clipjax
from clipjax.models import clip
from clipjax.robust import fooling


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _emb(n, e=16, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(size=(n, e)) + shift


# ----------------------------------------------------------------------------- oracles
def _loss_oracle(image, text, gap=None, amount=0.25):
    """`CLIPLoss.loss_grad` (`ShiftedCLIPLoss` when `gap` is given), float64."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    if gap is not None:
        text = text + amount * gap  # process_captions: text_features += gap_vector
        image = image - amount * gap  # score_images: image_features -= gap_vector
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    image = image / np.linalg.norm(image, axis=-1, keepdims=True)
    similarities = text @ image.T  # [K, B]
    return -np.min(similarities, axis=0)  # global_min, smaller_is_better


def _eval_fooling_accuracy(image_features, image_labels, text_features, fooling_vec, classes):
    """`utils/features.py:eval_fooling_accuracy`, numpy float64, on normalised features."""
    elements_total = 0
    elements_fooled = 0
    for c in classes:
        text_vec = text_features[c].reshape(1, -1)
        image_vecs = image_features[image_labels == c]
        result = text_vec @ image_vecs.T
        fooling_result = text_vec @ fooling_vec.reshape(1, -1).T
        elements_total += result.flatten().shape[0]
        elements_fooled += np.sum(np.ones_like(result)[result < fooling_result])
    return elements_fooled / elements_total


# ----------------------------------------------------------------------------- loss, gap, shift
def test_master_print_loss_matches_oracle():
    image, text = _emb(6, seed=1), _emb(5, seed=2)
    ref = _loss_oracle(image, text)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(fooling.master_print_loss(image, text)), ref, atol=1e-12)
    got = fooling.master_print_loss(image.astype(np.float32), text.astype(np.float32))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)
    # normalised inputs give the same loss; one caption is the plain negative cosine
    np.testing.assert_allclose(np.asarray(fooling.master_print_loss(_unit(image), _unit(text))), ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fooling.master_print_loss(image, text[:1])),
                               -(_unit(image) @ _unit(text[0])), atol=1e-6)


def test_shifted_loss_gap_and_shift_match_oracle():
    image = _emb(40, seed=3, shift=2.0)  # raw embeddings with a gap between the modalities
    text = _emb(7, seed=4, shift=-1.0)
    gap_ref = image.mean(axis=0) - text.mean(axis=0)
    quirk_ref = image.mean(axis=0) - text.mean()  # torch.mean(text_features): one scalar
    with jax.enable_x64(True):
        gap = fooling.embedding_gap(image, text)
        np.testing.assert_allclose(np.asarray(gap), gap_ref, atol=1e-12)
        np.testing.assert_allclose(np.asarray(fooling.embedding_gap(image, text, quirk=True)), quirk_ref, atol=1e-12)
        x, t = fooling.shift_embeddings(image, text, gap_ref, amount=0.25)
        np.testing.assert_allclose(np.asarray(x), _unit(image - 0.25 * gap_ref), atol=1e-12)
        np.testing.assert_allclose(np.asarray(t), _unit(text + 0.25 * gap_ref), atol=1e-12)
        shifted = fooling.master_print_loss(image[:5], text, gap=gap_ref)
        np.testing.assert_allclose(np.asarray(shifted), _loss_oracle(image[:5], text, gap_ref), atol=1e-12)
    assert np.abs(quirk_ref - gap_ref).max() > 0.5  # the quirk is a different vector
    assert np.abs(_loss_oracle(image[:5], text, gap_ref) - _loss_oracle(image[:5], text)).max() > 0.05
    x32, t32 = fooling.shift_embeddings(image.astype(np.float32), text.astype(np.float32),
                                        gap_ref.astype(np.float32), amount=0.5)
    np.testing.assert_allclose(np.asarray(t32), _unit(text + 0.5 * gap_ref), atol=1e-6)
    np.testing.assert_allclose(np.asarray(x32), _unit(image - 0.5 * gap_ref), atol=1e-6)


def _fooling_data(seed=5, n=120, c=6, e=16):
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(c, e))
    labels = rng.integers(0, c, n)
    image = text[labels] * 0.6 + rng.normal(size=(n, e))  # images near their class caption
    master = text.sum(axis=0) * 0.3 + rng.normal(size=e)  # a moderately good master print
    return text, master, image, labels


@pytest.mark.parametrize("classes", [None, [4, 0, 2]])
def test_fooling_accuracy_matches_eval_fooling_accuracy(classes):
    text, master, image, labels = _fooling_data()
    ref = _eval_fooling_accuracy(_unit(image), labels, _unit(text), _unit(master),
                                 range(len(text)) if classes is None else classes)
    assert 0.2 < ref < 0.8  # neither trivial outcome
    t = _unit(text)
    margins = np.abs(np.sum(t[labels] * _unit(image), axis=1) - t[labels] @ _unit(master))
    assert margins.min() > 1e-5
    with jax.enable_x64(True):
        got64 = fooling.fooling_accuracy(text, master, image, labels, classes=classes)
    assert float(got64) == ref
    f32 = [a.astype(np.float32) for a in (text, master, image)]
    assert float(fooling.fooling_accuracy(f32[0], f32[1], f32[2], labels, classes=classes)) == pytest.approx(ref,
                                                                                                           abs=1e-7)


# ----------------------------------------------------------------------------- miners
@pytest.fixture(scope="module")
def tiny_clip():
    """A random-init tiny clipjax ViT (width 32, 1 layer, 32 px) with an embed_fn on [0, 1] pixels."""
    cfg = clipjax.get_config("ViT-B-32")
    cfg = cfg.replace(embed_dim=16,
                      vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=32, layers=1,
                                                 heads=2, mlp_dim=64),
                      text=dataclasses.replace(cfg.text, width=32, heads=2, layers=1, mlp_dim=64))
    params = clip.init_params(cfg, seed=0)
    mean, std = jnp.asarray(cfg.preprocess.mean), jnp.asarray(cfg.preprocess.std)

    def embed(pixels01):
        return clip.encode_image(params, (pixels01 - mean) / std, config=cfg, normalize=False)

    return cfg, params, embed


def test_mine_pixels_on_tiny_clip_over_digits(tiny_clip):
    from sklearn.datasets import load_digits

    from clipjax.tokenizer import Tokenizer

    cfg, params, embed = tiny_clip
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    text = clip.encode_text(params, Tokenizer.openai()([f"the digit {n}" for n in names]), config=cfg,
                            normalize=False)
    digits = load_digits()
    pick = np.arange(0, 200, 2)
    small = digits.images[pick] / 16.0
    pixels = np.repeat(np.kron(small, np.ones((4, 4)))[..., None], 3, axis=-1).astype(np.float32)  # 8 -> 32 px
    image_emb = embed(pixels)
    labels = digits.target[pick]

    key = jax.random.key(0)
    image, losses = fooling.mine_pixels(embed, text, key, image_size=32, steps=60)
    losses = np.asarray(losses)
    assert image.shape == (32, 32, 3) and float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert losses[-1] < losses[0] - 0.3
    final = float(fooling.master_print_loss(embed(image[None]), text)[0])
    assert final <= losses.min() + 1e-5  # the best iterate comes back
    start = jax.random.uniform(key, (1, 32, 32, 3), jnp.float32)  # mine_pixels' U(0, 1) start
    assert float(fooling.master_print_loss(embed(start), text)[0]) == pytest.approx(losses[0], abs=1e-5)
    mined_acc = float(fooling.fooling_accuracy(text, embed(image[None])[0], image_emb, labels))
    start_acc = float(fooling.fooling_accuracy(text, embed(start)[0], image_emb, labels))
    assert mined_acc > start_acc + 0.2 and mined_acc > 0.9

    projected, proj_losses = fooling.mine_pixels(embed, text, key, image_size=32, steps=30, bound="project")
    assert float(projected.min()) >= 0.0 and float(projected.max()) <= 1.0
    assert float(proj_losses[-1]) < float(proj_losses[0]) - 0.2


def _torch_mine_pixels(embed_w, text, v0, steps, lr, bound):
    """float64 torch transcription of `optimizers/gradient.py:GradientOptimizer.optimize` on pixels: `torch.optim.Adam`
    on v from the given start, loss = sum over the batch of `CLIPLoss.loss_grad` (-min_k cos) of the image
    clamp(v, 0, 1) ("clamp") or of v projected back to [0, 1] after each step ("project"), embedding
    (image - 0.5) @ w; plus the best-of-(steps + 1)-iterates bookkeeping `mine_pixels` documents."""
    import torch

    w = torch.from_numpy(np.asarray(embed_w, np.float64))
    t = torch.from_numpy(np.asarray(text, np.float64))
    t = t / t.norm(dim=-1, keepdim=True)

    def loss_and_image(v):
        image = torch.clamp(v, 0.0, 1.0) if bound == "clamp" else v
        x = (image.reshape(image.shape[0], -1) - 0.5) @ w
        x = x / x.norm(dim=-1, keepdim=True)
        return torch.sum(-torch.min(t @ x.T, dim=0).values), image

    v = torch.nn.Parameter(torch.from_numpy(np.asarray(v0, np.float64)))
    optimizer = torch.optim.Adam([v], lr=lr)
    losses, best, best_loss = [], None, np.inf
    for _ in range(steps):
        loss, image = loss_and_image(v)
        losses.append(loss.item())
        if loss.item() < best_loss:
            best, best_loss = image.detach().clone(), loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if bound == "project":
            with torch.no_grad():
                v.clamp_(0.0, 1.0)
    with torch.no_grad():
        loss, image = loss_and_image(v)
    if loss.item() < best_loss:
        best = image.detach().clone()
    return np.array(losses), best[0].numpy()


@pytest.mark.parity
@pytest.mark.parametrize("bound", ["clamp", "project"])
def test_mine_pixels_matches_torch_adam(bound):
    """5 Adam steps (lr 0.1) from the same U(0, 1) start on a linear embedding, against `_torch_mine_pixels` in
    float64: per-step losses and the returned image to atol 1e-5 (float32 vs float64 through 5 Adam steps,
    whose updates are ~lr * sign(grad) with |grad| >> eps; measured 1.8e-6 and 3.9e-6)."""
    size, steps = 8, 5
    rng = np.random.default_rng(7)
    w = rng.normal(size=(size * size * 3, 8)) / np.sqrt(size * size * 3)
    text = rng.normal(size=(4, 8))
    w32 = jnp.asarray(w, jnp.float32)

    def embed(pixels01):
        return (pixels01.reshape(pixels01.shape[0], -1) - 0.5) @ w32

    key = jax.random.key(11)
    image, losses = fooling.mine_pixels(embed, text.astype(np.float32), key, image_size=size, steps=steps,
                                        bound=bound)
    v0 = np.asarray(jax.random.uniform(key, (1, size, size, 3), jnp.float32))  # mine_pixels' documented start
    want_losses, want_image = _torch_mine_pixels(w, text, v0, steps, 0.1, bound)
    assert want_losses[-1] < want_losses[0] - 0.05  # the steps do something
    np.testing.assert_allclose(np.asarray(losses), want_losses, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(image), want_image, rtol=0, atol=1e-5)


@pytest.mark.parity
def test_decode_pixel_latent_matches_torch_interpolate():
    """`decode_pixel_latent` against torch in float64: `F.interpolate(z, (S, S), mode="bilinear",
    align_corners=False)` then the Stable Diffusion wrapper's postprocessing `clamp((x + 1) / 2, 0, 1)`
    (`decoders/stable_diffusion_wrapper.py`), on upsampling by integer and non-integer factors (and the identity),
    with latents that reach both clamps. atol 2e-6 (float32 interpolation weights; measured 1.1e-6)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(8)
    for shape, size in (((3, 4, 4, 3), 32), ((2, 5, 5, 3), 32), ((2, 7, 7, 3), 24), ((1, 3, 3, 3), 3)):
        z = (1.5 * rng.normal(size=shape)).astype(np.float32)
        got = np.asarray(fooling.decode_pixel_latent(z, size))
        up = F.interpolate(torch.from_numpy(z.astype(np.float64)).permute(0, 3, 1, 2), size=(size, size),
                           mode="bilinear", align_corners=False)
        want = torch.clamp((up + 1.0) / 2.0, min=0.0, max=1.0).permute(0, 2, 3, 1).numpy()
        assert (want == 0).any() and (want == 1).any() and ((want > 0) & (want < 1)).mean() > 0.3
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=str((shape, size)))


def _linear_problem(size=32, k=8, e=16, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(size * size * 3, e)) / np.sqrt(size * size * 3), jnp.float32)
    text = jnp.asarray(rng.normal(size=(k, e)), jnp.float32)

    def embed(pixels01):
        return (pixels01.reshape(pixels01.shape[0], -1) - 0.5) @ w

    return embed, text


def test_mine_cmaes_matches_pycma_objective():
    import cma

    size, generations, shape = 32, 80, (4, 4, 3)
    embed, text = _linear_problem(size)
    objective = jax.jit(lambda z: fooling.master_print_loss(embed(fooling.decode_pixel_latent(z, size)), text,
                                                            validate=False))
    ours, theirs = [], []
    for seed in range(2):
        mean0 = np.random.default_rng(100 + seed).normal(size=shape)
        image, history = fooling.mine_cmaes(embed, text, jax.random.key(seed), image_size=size,
                                            generations=generations, mean0=mean0)
        assert history["best_latent"].shape == shape and history["best_loss"].shape == (generations,)
        best = float(history["best_loss"][-1])
        assert float(objective(history["best_latent"][None])[0]) == pytest.approx(best, abs=1e-6)
        assert float(fooling.master_print_loss(embed(image[None]), text)[0]) == pytest.approx(best, abs=1e-6)
        assert np.all(np.diff(np.asarray(history["best_loss"])) <= 0)
        es = cma.CMAEvolutionStrategy(mean0.ravel(), 1.0, {"seed": seed + 1, "verbose": -9})
        assert es.popsize == 15
        for _ in range(generations):
            candidates = es.ask()
            losses = objective(jnp.asarray(np.reshape(candidates, (-1, *shape)), jnp.float32))
            es.tell(candidates, np.asarray(losses, np.float64).tolist())
        random_search = np.random.default_rng(seed).normal(size=(generations * 15, *shape)) + mean0
        random_best = float(jnp.min(objective(jnp.asarray(random_search, jnp.float32))))
        assert best < random_best - 0.1 and es.result.fbest < random_best - 0.1
        ours.append(best)
        theirs.append(es.result.fbest)
    assert np.mean(ours) <= np.mean(theirs) + 0.03, (ours, theirs)


def test_mine_cmaes_reaches_known_optimum_with_custom_decode():
    """One caption, a linear embedding and an identity decode: min -cos = -1 is reachable."""
    size = 4
    embed, text = _linear_problem(size, k=1, e=8, seed=1)
    image, history = fooling.mine_cmaes(embed, text, jax.random.key(3), image_size=size, generations=150,
                                        latent_shape=(size, size, 3), decode=lambda z: z, popsize=16)
    assert float(history["best_loss"][-1]) < -0.99
    assert image.shape == (size, size, 3)


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    image, text = _emb(4, seed=6).astype(np.float32), _emb(3, seed=7).astype(np.float32)
    with pytest.raises(ValueError, match="embedding dimensions differ"):
        fooling.master_print_loss(image, text[:, :-1])
    with pytest.raises(ValueError, match="text_embeddings is empty"):
        fooling.master_print_loss(image, text[:0])
    bad = text.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="text_embeddings has 1 non-finite"):
        fooling.master_print_loss(image, bad)
    with pytest.raises(ValueError, match="all-zero row"):
        fooling.master_print_loss(np.zeros_like(image), text)
    with pytest.raises(ValueError, match="gap must have shape"):
        fooling.master_print_loss(image, text, gap=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="paired inputs have different lengths"):
        fooling.fooling_accuracy(text, image[0], image, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fooling.fooling_accuracy(text, image[0], image, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="classes has duplicate rows"):
        fooling.fooling_accuracy(text, image[0], image, np.array([0, 1, 2, 0]), classes=[1, 1])
    with pytest.raises(ValueError, match="no image belongs"):
        fooling.fooling_accuracy(text, image[0], image, np.array([0, 1, 1, 0]), classes=[2])
    with pytest.raises(ValueError, match="text_embeddings is empty"):
        fooling.embedding_gap(image, text[:0])

    def embed(p):
        return p.reshape(p.shape[0], -1)[:, :5]

    with pytest.raises(ValueError, match=r"embed_fn must map pixels .* to embeddings \[B, E\]"):
        fooling.mine_pixels(embed, _emb(3, e=16), jax.random.key(0), image_size=8, steps=2)
    with pytest.raises(ValueError, match="bound must be one of"):
        fooling.mine_pixels(embed, _emb(3, e=5), jax.random.key(0), image_size=8, steps=2, bound="sigmoid")
    with pytest.raises(ValueError, match="latent_shape is required"):
        fooling.mine_cmaes(embed, _emb(3, e=5), jax.random.key(0), image_size=8, generations=2, decode=lambda z: z)
    with pytest.raises(ValueError, match="decode must map latents"):
        fooling.mine_cmaes(embed, _emb(3, e=5), jax.random.key(0), image_size=8, generations=2,
                           latent_shape=(2, 2, 3), decode=lambda z: z)
    with pytest.raises(ValueError, match="mean0 must have the latent shape"):
        fooling.mine_cmaes(embed, _emb(3, e=5), jax.random.key(0), image_size=8, generations=2,
                           mean0=np.zeros((2, 2, 1)))
