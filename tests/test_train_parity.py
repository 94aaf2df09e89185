"""Parity of the train step with open_clip's training loop (fp32).

The same tiny open_clip model (random init, randomised norms) is trained for 5 steps by

* open_clip: `ClipLoss` / `SigLipLoss`, torch `AdamW` with open_clip's two param groups
  (`open_clip_train/main.py`'s exclusion rule), `open_clip_train.scheduler.cosine_lr`,
  `clip_grad_norm_` and the `logit_scale.clamp_(0, ln 100)` after each step
  (`open_clip_train/train.py`);
* clipjax: the model converted by `clipjax.convert`, `clipjax.train` with the same config;

on the same batches of real photos (scikit-image) and token ids. Losses agree to 1e-5 relative at
every step; every param after 1 and 5 steps to 1e-6 absolute (they move by up to 3.5e-3; measured 4e-7).
Adam's eps is 1e-4 here, not open_clip's ViT default 1e-6: Adam divides by sqrt(v) + eps, which
turns fp32 rounding of a gradient near eps into an update difference of up to lr / (4 eps) times
it (250x at 1e-6, so rarely used token-embedding rows differed by ~1e-5 and the bound would have to
be loose); at 1e-4 the same code path is compared with a tight bound."""

import math

import numpy as np
import pytest

pytestmark = pytest.mark.parity

STEPS = 5
BATCH = 8
LR, WD, WARMUP, CLIP_NORM = 1e-3, 0.2, 2, 1.0
PARAM_ATOL = 1e-6
EPS = 1e-4


def _batches(photos, n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = [np.asarray(Image.fromarray(p).resize((48, 48), Image.BICUBIC)) for p in photos]
    out = []
    for _ in range(n):
        imgs = []
        for _ in range(BATCH):
            p = small[rng.integers(len(small))]
            y, x = rng.integers(0, 17, 2)
            crop = p[y:y + 32, x:x + 32]
            imgs.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
        ids = rng.integers(1, 990, (BATCH, 16)).astype(np.int32)
        ends = rng.integers(4, 16, BATCH)
        for i, e in enumerate(ends):  # EOT = the largest id, then padding
            ids[i, e] = 999
            ids[i, e + 1:] = 0
        out.append({"image": np.stack(imgs).astype(np.uint8), "text": ids})
    return out


def _open_clip_model(torch, open_clip, siglip: bool):
    torch.manual_seed(0)
    kw = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0) if siglip else {}
    model = open_clip.model.CLIP(
        embed_dim=64,
        vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64, mlp_ratio=4.0),
        text_cfg=dict(context_length=16, vocab_size=1000, width=128, heads=2, layers=2),
        output_dict=True, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # defaults (1, 0) would hide mapping bugs
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def _torch_train(torch, model, batches, siglip: bool, mean, std):
    from open_clip.loss import ClipLoss, SigLipLoss
    from open_clip_train.scheduler import cosine_lr

    # open_clip_train/main.py, verbatim rule
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E731
    named = list(model.named_parameters())
    gain_or_bias = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    opt = torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": WD}],
                            lr=LR, betas=(0.9, 0.98), eps=EPS)
    scheduler = cosine_lr(opt, LR, WARMUP, STEPS)
    loss_fn = SigLipLoss() if siglip else ClipLoss()
    model.train()
    losses, snapshots = [], []
    for step, b in enumerate(batches):
        scheduler(step)
        px = (b["image"].astype(np.float32) / np.float32(255.0) - mean) / std
        px = torch.from_numpy(np.ascontiguousarray(px.transpose(0, 3, 1, 2)))
        out = model(px, torch.from_numpy(b["text"]).long())
        if siglip:
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        else:
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        snapshots.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    return losses, snapshots


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_train_steps_match_open_clip(loss, photos):
    import torch
    import open_clip
    import jax

    from clipjax.checkpoint import pure_to_params
    from clipjax.convert.core import infer_config, state_dict_to_pure
    from clipjax.models.clip import split_trainable
    from clipjax.train.config import TrainConfig
    from clipjax.train.optim import make_optimizer
    from clipjax.train.state import init_state
    from clipjax.train.step import make_train_step

    siglip = loss == "siglip"
    model = _open_clip_model(torch, open_clip, siglip)
    sd0 = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = infer_config(sd0, "openai")
    assert cfg.is_siglip == siglip
    batches = _batches(photos, STEPS)
    mean = np.asarray(cfg.preprocess.mean, np.float32)
    std = np.asarray(cfg.preprocess.std, np.float32)
    ref_losses, ref_params = _torch_train(torch, model, batches, siglip, mean, std)

    tc = TrainConfig(loss=loss, batch_size=BATCH, total_steps=STEPS, lr=LR, warmup_steps=WARMUP, weight_decay=WD,
                     grad_clip_norm=CLIP_NORM, eps=EPS)
    initial = pure_to_params(state_dict_to_pure(sd0, cfg, "openai"), cfg)
    trainable = split_trainable(initial)[0]
    optimizer = make_optimizer(tc, trainable, cfg)
    state, _ = init_state(cfg, optimizer, seed=0, ema=False, model_state=initial)
    step = make_train_step(cfg, tc, optimizer)
    for i, b in enumerate(batches):
        state, metrics = step(state, b)
        assert bool(metrics["finite"])
        np.testing.assert_allclose(float(metrics["loss"]), ref_losses[i], rtol=1e-5,
                                   err_msg=f"loss at step {i}")
        if i in (0, STEPS - 1):
            want = state_dict_to_pure(ref_params[i], cfg, "openai")
            start = state_dict_to_pure(sd0, cfg, "openai")
            got = state.params.to_pure_dict()
            moved = worst = 0.0
            for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
                g, w, p0 = (np.asarray(x, np.float64) for x in (_get(got, path), w, _get(start, path)))
                err = float(np.abs(g - w).max())
                assert err <= PARAM_ATOL, f"step {i + 1}: {jax.tree_util.keystr(path)} differs by {err:.3g}"
                worst = max(worst, float(np.abs(g - w).max()))
                moved = max(moved, float(np.abs(w - p0).max()))
            assert moved > 100 * PARAM_ATOL, f"the params barely moved ({moved:.3g}): the comparison would be vacuous"
            print(f"{loss} step {i + 1}: max |param diff| {worst:.3g}, max |param change| {moved:.3g}")


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


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
