"""Parity of the train step with torch training loops (fp32), for every loss and FLIP patch dropout.

The same tiny open_clip model (random init, randomised norms) is trained by

* torch: torch `AdamW` with open_clip's two param groups (`open_clip_train/main.py`'s exclusion rule),
  `open_clip_train.scheduler.cosine_lr`, `clip_grad_norm_` and the `logit_scale.clamp_(0, ln 100)` after
  each step (`open_clip_train/train.py`), with the loss of the method:
  - clip / siglip: open_clip `ClipLoss` / `SigLipLoss` (5 steps);
  - distill: open_clip `DistillClipLoss` (contrastive + distillation term) against a frozen open_clip
    teacher of another architecture, in eval mode under `no_grad` (`open_clip_train/train.py`, `--distill-model`);
  - cloob: CLOOB's loss written in torch from `ml-jku/cloob:src/training/methods.py` (its Hopfield layer has
    no projections: `softmax(beta xi P^T) P`), the inverse temperature being `exp(logit_scale)` as CLOOB's
    `logit_inv_tau.exp()` (clamped to [0, ln 100] the same way);
  - longclip: Long-CLIP's fine-tuning loss (`beichenzbc/Long-CLIP:model/model_longclip.py`: label-smoothed
    CLIP loss of the long captions, plus that of the short captions against the `torch.linalg.svd` PCA
    reconstruction of the image features) with Long-CLIP's position-embedding split: the first 20
    positions come from a frozen copy (`mask1`), the rest from a trainable one (`mask2`);
  - FLIP: open_clip's `PatchDropout` in train mode, its random scores replaced so that it keeps the patches
    clipjax keeps for the step's key (`drop_patches` of an arange), then `prob = 0` for the last step
    (clipjax `unmasked_steps=1`);
* clipjax: the model converted by `clipjax.convert`, `clipjax.train` with the same config;

on the same batches of real photos (scikit-image) and token ids. Losses agree to 1e-5 relative at
every step (measured at most 6e-7); every param after the first and the last step to 1e-6 absolute
(they move by up to 3.5e-3; measured at most 4e-7, 6e-7 for Long-CLIP's token embedding). Adam's
eps is 1e-4 here, not open_clip's ViT default 1e-6: Adam divides by sqrt(v) + eps, which turns fp32
rounding of a gradient near eps into an update difference of up to lr / (4 eps) times it (250x at
1e-6, so rarely used token-embedding rows differed by ~1e-5 and the bound would have to be loose); at
1e-4 the same code path is compared with a tight bound."""

import math

import numpy as np
import pytest

pytestmark = pytest.mark.parity

STEPS = 5  # clip / siglip
SHORT_STEPS = 3  # the other losses and FLIP (2 masked steps, then 1 unmasked)
BATCH = 8
LR, WD, WARMUP, CLIP_NORM = 1e-3, 0.2, 2, 1.0
PARAM_ATOL = 1e-6
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4  # the gradient norm the step logs vs clip_grad_norm_'s (trainable params only)
EPS = 1e-4
SMALL = dict(width=64, layers=1, embed_dim=32)  # one 64-wide head per tower (clipjax infers 64-wide heads)


def _batches(photos, n, seed=0, context=16, first_eot=4, short=0):
    """n batches: 32 px random crops / flips of the photos (uint8), token ids `[B, context]` with the EOT (999,
    the largest id) at a random position >= first_eot then zeros, and with `short` > 0 `short_text` ids
    `[B, short]` built the same way (Long-CLIP's short captions)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = [np.asarray(Image.fromarray(p).resize((48, 48), Image.BICUBIC)) for p in photos]

    def ids(length, first):
        out = rng.integers(1, 990, (BATCH, length)).astype(np.int32)
        ends = rng.integers(first, length, BATCH)
        for i, e in enumerate(ends):  # EOT = the largest id, then padding
            out[i, e] = 999
            out[i, e + 1:] = 0
        return out

    out = []
    for _ in range(n):
        imgs = []
        for _ in range(BATCH):
            p = small[rng.integers(len(small))]
            y, x = rng.integers(0, 17, 2)
            crop = p[y:y + 32, x:x + 32]
            imgs.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        out.append({"image": np.stack(imgs).astype(np.uint8), "text": ids(context, first_eot)})
        if short:
            out[-1]["short_text"] = ids(short, 3)
    return out


def _open_clip_model(torch, open_clip, siglip: bool = False, *, width=128, layers=2, embed_dim=64, context=16,
                     patch_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    kw = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0) if siglip else {}
    model = open_clip.model.CLIP(
        embed_dim=embed_dim,
        vision_cfg=dict(image_size=32, patch_size=8, width=width, layers=layers, head_width=64, mlp_ratio=4.0,
                        patch_dropout=patch_dropout),
        text_cfg=dict(context_length=context, vocab_size=1000, width=width, heads=width // 64, layers=layers),
        output_dict=True, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # defaults (1, 0) would hide mapping bugs
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _torch_train(torch, model, batches, loss_fn, mean, std, *, total_steps, snapshot=_numpy_state):
    """open_clip's training loop; `loss_fn(model, pixels NCHW, ids, batch, step)` gives the loss.

    Returns the loss of every step, `snapshot(model)` (a numpy state dict) after every step, and the gradient
    norm `clip_grad_norm_` saw at every step (frozen params have no grad and do not count)."""
    from open_clip_train.scheduler import cosine_lr

    # open_clip_train/main.py, verbatim rule
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    opt = torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": WD}],
                            lr=LR, betas=(0.9, 0.98), eps=EPS)
    scheduler = cosine_lr(opt, LR, WARMUP, total_steps)
    model.train()
    losses, snapshots, norms = [], [], []
    for step, b in enumerate(batches):
        scheduler(step)
        px = (b["image"].astype(np.float32) / np.float32(255.0) - mean) / std
        px = torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))
        loss = loss_fn(model, px, torch.from_numpy(b["text"]).long(), b, step)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)))
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        snapshots.append(snapshot(model))
    return losses, snapshots, norms


def _train_config(**kw):
    from clipjax.train.config import TrainConfig

    return TrainConfig(batch_size=BATCH, lr=LR, warmup_steps=WARMUP, weight_decay=WD, grad_clip_norm=CLIP_NORM,
                       eps=EPS, **kw)


def _clipjax_setup(sd0, tc, reference_config=None):
    """(config, step-0 TrainState, jitted step) of clipjax for the open_clip state dict `sd0`."""
    from clipjax.checkpoint import pure_to_params
    from clipjax.convert.core import infer_config, state_dict_to_pure
    from clipjax.models.clip import split_trainable
    from clipjax.train.optim import make_optimizer
    from clipjax.train.state import init_state
    from clipjax.train.step import make_train_step

    cfg = infer_config(sd0, "openai")
    initial = pure_to_params(state_dict_to_pure(sd0, cfg, "openai"), cfg)
    optimizer = make_optimizer(tc, split_trainable(initial)[0], cfg)
    state, _ = init_state(cfg, optimizer, seed=0, ema=False, model_state=initial)
    return cfg, state, make_train_step(cfg, tc, optimizer, reference_config=reference_config)


def _pixel_stats(cfg):
    return np.asarray(cfg.preprocess.mean, np.float32), np.asarray(cfg.preprocess.std, np.float32)


def _clipjax_matches(label, cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms, frozen=None):
    """Run the clipjax steps; loss of every step within LOSS_RTOL, the logged gradient norm within NORM_RTOL,
    params after the first and the last step within PARAM_ATOL of torch's. Returns the final state."""
    for i, b in enumerate(batches):
        state, metrics = step(state, b, frozen)
        assert bool(metrics["finite"])
        np.testing.assert_allclose(float(metrics["loss"]), ref_losses[i], rtol=LOSS_RTOL,
                                   err_msg=f"{label}: loss at step {i}")
        np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norms[i], rtol=NORM_RTOL,
                                   err_msg=f"{label}: gradient norm at step {i}")
        if i in (0, len(batches) - 1):
            _assert_params_match(label, i + 1, state.params, ref_params[i], sd0, cfg)
    return state


def _assert_params_match(label, steps, params, ref_sd, sd0, cfg):
    import jax

    from clipjax.convert.core import state_dict_to_pure

    want = state_dict_to_pure(ref_sd, cfg, "openai")
    start = state_dict_to_pure(sd0, cfg, "openai")
    got = params.to_pure_dict()
    moved = worst = 0.0
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        g, w, p0 = (np.asarray(x, np.float64) for x in (_get(got, path), w, _get(start, path)))
        err = float(np.abs(g - w).max())
        assert err <= PARAM_ATOL, f"{label} step {steps}: {jax.tree_util.keystr(path)} differs by {err:.3g}"
        worst = max(worst, err)
        moved = max(moved, float(np.abs(w - p0).max()))
    assert moved > 100 * PARAM_ATOL, f"the params barely moved ({moved:.3g}): the comparison would be vacuous"
    print(f"{label} step {steps}: max |param diff| {worst:.3g}, max |param change| {moved:.3g}")


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_train_steps_match_open_clip(loss, photos):
    import torch
    import open_clip
    from open_clip.loss import ClipLoss, SigLipLoss

    siglip = loss == "siglip"
    model = _open_clip_model(torch, open_clip, siglip)
    sd0 = _numpy_state(model)
    tc = _train_config(loss=loss, total_steps=STEPS)
    cfg, state, step = _clipjax_setup(sd0, tc)
    assert cfg.is_siglip == siglip
    batches = _batches(photos, STEPS)
    loss_fn = SigLipLoss() if siglip else ClipLoss()

    def torch_loss(m, px, ids, _batch, _step):
        out = m(px, ids)
        if siglip:
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    ref_losses, ref_params, ref_norms = _torch_train(torch, model, batches, torch_loss, *_pixel_stats(cfg),
                                                     total_steps=STEPS)
    _clipjax_matches(loss, cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms)


def test_distill_steps_match_open_clip_distill_loss(photos):
    """loss="distill": open_clip `DistillClipLoss` (both terms summed, as open_clip_train sums the loss
    dict) with a frozen teacher of another width and embedding size; losses 1e-5 relative, params 1e-6
    absolute after steps 1 and 3."""
    import torch
    import open_clip
    from open_clip.loss import DistillClipLoss

    from clipjax.convert.core import infer_config, state_dict_to_pure
    from clipjax.checkpoint import pure_to_params

    model = _open_clip_model(torch, open_clip, **SMALL)
    teacher = _open_clip_model(torch, open_clip, width=128, layers=1, embed_dim=48, seed=3).eval()
    sd0, sd_teacher = _numpy_state(model), _numpy_state(teacher)
    teacher_cfg = infer_config(sd_teacher, "openai")
    frozen = {"params": pure_to_params(state_dict_to_pure(sd_teacher, teacher_cfg, "openai"), teacher_cfg)}
    tc = _train_config(loss="distill", total_steps=SHORT_STEPS)
    cfg, state, step = _clipjax_setup(sd0, tc, reference_config=teacher_cfg)
    assert teacher_cfg.embed_dim != cfg.embed_dim
    batches = _batches(photos, SHORT_STEPS)
    loss_fn = DistillClipLoss()

    def torch_loss(m, px, ids, _batch, _step):
        out = m(px, ids)
        with torch.no_grad():
            t = teacher(px, ids)
        contrastive, distill = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                                       t["image_features"], t["text_features"], t["logit_scale"])
        return contrastive + distill

    ref_losses, ref_params, ref_norms = _torch_train(torch, model, batches, torch_loss, *_pixel_stats(cfg),
                                          total_steps=SHORT_STEPS)
    _clipjax_matches("distill", cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms, frozen=frozen)


def _torch_cloob(torch, image_features, text_features, inv_tau, beta):
    """CLOOB's loss (`ml-jku/cloob:src/training/methods.py` `cloob`), in torch for autograd.

    Hopfield retrieval of state patterns xi from stored patterns P: `softmax(beta xi P^T) P`, rows
    L2-normalised (CLOOB's `hflayers.Hopfield` with every projection and normalisation disabled).
    InfoLOOB `tau * (-mean(k_ii) + mean(logsumexp_{j != i} k_ij))`, `k = a b^T / tau`, the positive
    masked by -1000 in the log-sum-exp. Loss `L(U_x, V_x) + L(V_y, U_y)`."""
    def hopfield(state, stored):
        r = torch.softmax(beta * state @ stored.T, dim=1) @ stored
        return r / r.norm(dim=1, keepdim=True)

    def info_loob(a, b):
        tau = 1 / inv_tau
        k = a @ b.T / tau
        eye = torch.eye(k.shape[0], dtype=torch.bool)
        positives = -torch.mean(torch.sum(k * eye, dim=1))
        negatives = torch.mean(torch.logsumexp(k * ~eye + eye * -1000.0, dim=1))
        return tau * (positives + negatives)

    x, y = image_features, text_features
    p_xx, p_yy = hopfield(x, x), hopfield(y, y)
    p_xy, p_yx = hopfield(y, x), hopfield(x, y)  # text retrieving images, images retrieving texts
    return info_loob(p_xx, p_xy) + info_loob(p_yy, p_yx)


def test_cloob_steps_match_torch_cloob(photos):
    """loss="cloob": CLOOB's loss in torch with inverse temperature exp(logit_scale) (the model's scale,
    clamped to [0, ln 100] after each step as CLOOB clamps `logit_inv_tau`) and Hopfield beta 8; losses
    1e-5 relative, params 1e-6 absolute after steps 1 and 3."""
    import torch
    import open_clip

    beta = 8.0
    model = _open_clip_model(torch, open_clip, **SMALL)
    sd0 = _numpy_state(model)
    tc = _train_config(loss="cloob", total_steps=SHORT_STEPS, hopfield_beta=beta)
    cfg, state, step = _clipjax_setup(sd0, tc)
    batches = _batches(photos, SHORT_STEPS)

    def torch_loss(m, px, ids, _batch, _step):
        out = m(px, ids)
        return _torch_cloob(torch, out["image_features"], out["text_features"], out["logit_scale"], beta)

    ref_losses, ref_params, ref_norms = _torch_train(torch, model, batches, torch_loss, *_pixel_stats(cfg),
                                          total_steps=SHORT_STEPS)
    _clipjax_matches("cloob", cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms)


def _torch_longclip(torch, image, long_text, short_text, scale, components, smoothing):
    """Long-CLIP's `loss_itcl + loss_itcs` (`model_longclip.py` `CLIP.forward` on one device): label-smoothed
    CLIP losses of the long captions against the image features and of the short captions against
    `CLIP.PCA(image features, components)` (centre, `torch.linalg.svd`, keep the top right singular
    vectors, map back, add the mean)."""
    cross_entropy = torch.nn.functional.cross_entropy

    def pca(x):
        mean = torch.mean(x, dim=0)
        centred = x - mean.unsqueeze(0)
        _, _, vt = torch.linalg.svd(centred, full_matrices=False)
        pcs = vt.T[:, :components]
        return centred @ pcs @ pcs.T + mean

    def itc(img, txt):
        logits = scale * img @ txt.T
        targets = torch.arange(img.shape[0])
        return (cross_entropy(logits, targets, label_smoothing=smoothing)
                + cross_entropy(logits.T, targets, label_smoothing=smoothing)) / 2

    return itc(image, long_text) + itc(pca(image), short_text)


def _split_position_embedding(torch, model, keep):
    """Long-CLIP's text position embedding in an open_clip model: `positional_embedding` (a frozen
    Parameter, `requires_grad=False`) times `mask1` (rows < keep) plus the trainable `positional_embedding_res`
    times `mask2` (rows >= keep), both starting from the model's embedding. Returns `refresh(model)`, which
    sets the combined embedding open_clip's `encode_text` adds (call it before each forward), and
    `snapshot(model)`, the numpy state dict with the combined embedding under open_clip's name."""
    pe = model.positional_embedding.detach().clone()
    del model.positional_embedding
    model.positional_embedding_frozen = torch.nn.Parameter(pe.clone(), requires_grad=False)
    model.positional_embedding_res = torch.nn.Parameter(pe.clone())
    mask2 = (torch.arange(pe.shape[0]) >= keep).to(pe.dtype)[:, None]
    mask1 = 1 - mask2

    def refresh(m):
        m.positional_embedding = m.positional_embedding_frozen * mask1 + m.positional_embedding_res * mask2

    def snapshot(m):
        sd = {k: v for k, v in _numpy_state(m).items() if not k.startswith("positional_embedding")}
        refresh(m)
        sd["positional_embedding"] = m.positional_embedding.detach().numpy().copy()
        return sd

    return refresh, snapshot


def test_longclip_steps_match_torch_longclip(photos):
    """loss="longclip" (context 24, short captions of 10 tokens, label smoothing 0.1, 4 PCA components):
    Long-CLIP's loss and frozen first 20 positions; losses 1e-5 relative, params 1e-6 absolute after
    steps 1 and 3; the first 20 text positions exactly unchanged, the others moved."""
    import torch
    import open_clip

    from clipjax.models.longclip import KEEP

    components, smoothing, context = 4, 0.1, 24
    model = _open_clip_model(torch, open_clip, context=context, **SMALL)
    sd0 = _numpy_state(model)
    tc = _train_config(loss="longclip", total_steps=SHORT_STEPS, label_smoothing=smoothing,
                       longclip_components=components)
    cfg, state, step = _clipjax_setup(sd0, tc)
    before = np.asarray(state.params["text"]["pos_embed"][...]).copy()
    batches = _batches(photos, SHORT_STEPS, seed=2, context=context, first_eot=12, short=10)
    for b in batches:  # the EOT of some long captions lies past the frozen positions, so they get gradients
        assert (b["text"].argmax(1) >= KEEP).any()
    refresh, snapshot = _split_position_embedding(torch, model, KEEP)

    def torch_loss(m, px, ids, batch, _step):
        refresh(m)
        short = np.pad(batch["short_text"], ((0, 0), (0, context - batch["short_text"].shape[1])))
        image = m.encode_image(px, normalize=True)
        long_text = m.encode_text(ids, normalize=True)
        short_text = m.encode_text(torch.from_numpy(short).long(), normalize=True)
        return _torch_longclip(torch, image, long_text, short_text, m.logit_scale.exp(), components, smoothing)

    ref_losses, ref_params, ref_norms = _torch_train(torch, model, batches, torch_loss, *_pixel_stats(cfg),
                                          total_steps=SHORT_STEPS, snapshot=snapshot)
    state = _clipjax_matches("longclip", cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms)
    after = np.asarray(state.params["text"]["pos_embed"][...])
    np.testing.assert_array_equal(after[:KEEP], before[:KEEP])
    assert np.abs(after[KEEP:] - before[KEEP:]).min() > 0


def _kept_patches(rng_data, step, patches, ratio):
    """`[B, keep]` patch indices (0-based, class token excluded) clipjax's train step keeps at `step`: its key
    is `fold_in(state.rng, step)`; `drop_patches` of an arange shows which tokens survive."""
    import jax
    import jax.numpy as jnp

    from clipjax.models.vit import drop_patches

    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(rng_data)), step)
    tokens = jnp.broadcast_to(jnp.arange(1 + patches, dtype=jnp.float32)[None, :, None], (BATCH, 1 + patches, 1))
    kept = np.asarray(drop_patches(tokens, ratio, key, num_prefix=1)[:, 1:, 0]).astype(np.int64) - 1
    assert kept.shape == (BATCH, int(patches * (1 - ratio))) and kept.min() >= 0
    return kept


def test_flip_patch_dropout_steps_match_open_clip(photos):
    """patch_dropout=0.5, unmasked_steps=1 over 3 steps: steps 1-2 through open_clip's `PatchDropout` (train
    mode) made to keep clipjax's patches, step 3 with `prob = 0` (no dropping); `ClipLoss`; losses 1e-5
    relative, params 1e-6 absolute after steps 1 and 3."""
    import torch
    import open_clip
    from open_clip.loss import ClipLoss

    ratio, patches = 0.5, (32 // 8) ** 2
    model = _open_clip_model(torch, open_clip, patch_dropout=ratio, **SMALL)
    sd0 = _numpy_state(model)
    tc = _train_config(total_steps=SHORT_STEPS, patch_dropout=ratio, unmasked_steps=1)
    cfg, state, step = _clipjax_setup(sd0, tc)
    kept = [_kept_patches(np.asarray(state.rng), i, patches, ratio) for i in range(SHORT_STEPS - 1)]
    assert not np.array_equal(kept[0], kept[1])
    batches = _batches(photos, SHORT_STEPS)
    loss_fn = ClipLoss()
    masked_calls = []

    def torch_loss(m, px, ids, _batch, i):
        if i == SHORT_STEPS - 1:  # unmasked tuning
            m.visual.patch_dropout.prob = 0.0
            out = m(px, ids)
        else:  # PatchDropout keeps the top-k of torch.randn(B, P): score clipjax's kept patches 1, the rest 0
            scores = torch.zeros(BATCH, patches)
            scores[torch.arange(BATCH)[:, None], torch.from_numpy(kept[i])] = 1.0

            def randn(*size, **_):
                assert tuple(size) == (BATCH, patches), size
                masked_calls.append(i)
                return scores.clone()

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch, "randn", randn)
                out = m(px, ids)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])

    ref_losses, ref_params, ref_norms = _torch_train(torch, model, batches, torch_loss, *_pixel_stats(cfg),
                                          total_steps=SHORT_STEPS)
    assert masked_calls == [0, 1]
    _clipjax_matches("flip", cfg, state, step, batches, sd0, ref_losses, ref_params, ref_norms)


def test_bf16_compute_tracks_fp32(photos):
    """bf16 compute with fp32 master params: losses within 2% of the fp32 run over 3 steps, params fp32."""
    import jax

    import clipjax
    import dataclasses

    from clipjax.models.clip import init_params, split_trainable
    from clipjax.train.config import TrainConfig
    from clipjax.train.optim import make_optimizer
    from clipjax.train.state import init_state
    from clipjax.train.step import make_train_step

    base = clipjax.get_config("ViT-B-32")
    cfg = base.replace(embed_dim=64,
                       vision=dataclasses.replace(base.vision, image_size=32, patch_size=8, width=128, layers=2,
                                                  heads=2, mlp_dim=512),
                       text=dataclasses.replace(base.text, context_length=16, vocab_size=1000, width=128, heads=2,
                                                layers=2, mlp_dim=512))
    batches = _batches(photos, 3)
    initial = init_params(cfg, seed=0)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tc = TrainConfig(batch_size=BATCH, total_steps=3, lr=LR, warmup_steps=1, dtype=dtype)
        c = cfg.replace(dtype=dtype)
        optimizer = make_optimizer(tc, split_trainable(initial)[0], c)
        state, _ = init_state(c, optimizer, seed=0, ema=False, model_state=initial)
        step = make_train_step(c, tc, optimizer)
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        runs[dtype] = losses, state
    np.testing.assert_allclose(runs["bfloat16"][0], runs["float32"][0], rtol=2e-2)
    assert {leaf.dtype for leaf in jax.tree.leaves(runs["bfloat16"][1].params)} == {np.dtype("float32")}
