"""Adversarial fine-tuning steps (`clipjax.train.adversarial`) against their PyTorch transcriptions.

The same tiny open_clip model (random init, randomised norms) is fine-tuned for 2 steps by

* torch: the official algorithms transcribed on open_clip's model: TeCoA's `attack_pgd` (no random
  start, so both sides start from delta = 0) and CE on 100 * cos against fixed class weights,
  PMG-AFT's CE + KL(sum) terms, FARE's momentum-sign PGD and squared-L2 loss, AdvFLYP's CLIP loss on
  adversarial pairs; torch `SGD(momentum)` / `AdamW` with open_clip's weight-decay groups and
  `cosine_lr`, the text tower frozen where the method freezes it;
* clipjax: the model converted by `clipjax.convert`, `clipjax.train` with the same config;

on the same batches of real photos (scikit-image) and labels. Losses agree to 1e-5 relative at
every step (FARE's 1e-4: see the test), params to 1e-6 absolute plus 1e-4 of their change (FARE's
2e-3) after each step (they move by 1e-4 or
more; PMG-AFT's batch-summed KL moves them by up to ~1e-2).
Sign steps compare exactly because both sides differentiate the same fp32 function at `highest`
precision; a pixel whose gradient rounds to a different sign would show as a loss mismatch.
"""

import copy
import math

import numpy as np
import pytest

pytestmark = pytest.mark.parity

BATCH, STEPS, CLASSES = 8, 2, 4
WD = 0.1
LR = 1e-2
# Adam's eps = 1 makes its update ~ lr * g (no 1 / |g| amplification of fp32 rounding in near-zero
# gradients, see test_train_parity.py), so the params compare the gradients with a tight bound
ADAM_EPS = 1.0
EPS, ALPHA, ATTACK_STEPS = 4 / 255, 2 / 255, 2
PARAM_ATOL = 1e-6
# the classifier's multiplier: TeCoA's 100 cos; the stored PMG-AFT code's classifier gives plain cosines
SCALE = {"tecoa": 100.0, "pmg-aft": 1.0}


def _batches(photos, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = [np.asarray(Image.fromarray(p).resize((48, 48), Image.BICUBIC)) for p in photos]
    out = []
    for _ in range(STEPS):
        picks = rng.integers(len(small), size=BATCH)
        imgs = [small[i][y:y + 32, x:x + 32] for i, (y, x) in zip(picks, rng.integers(0, 17, (BATCH, 2)))]
        ids = rng.integers(1, 990, (BATCH, 16)).astype(np.int32)
        ids[:, 12] = 999  # EOT (the largest id), then padding
        ids[:, 13:] = 0
        out.append({"image": np.stack(imgs).astype(np.uint8), "text": ids, "label": (picks % CLASSES).astype(np.int32)})
    return out


def _open_clip_model(torch, open_clip):
    from helpers import randomise_norms

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64),
        text_cfg=dict(context_length=16, vocab_size=1000, width=128, heads=2, layers=1), output_dict=True)
    randomise_norms(model)
    return model


@pytest.fixture(scope="module")
def setup(photos):
    import torch
    import open_clip

    from clipjax.checkpoint import pure_to_params
    from clipjax.convert.core import infer_config, state_dict_to_pure

    model = _open_clip_model(torch, open_clip)
    sd0 = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = infer_config(sd0, "openai")
    ids = np.random.default_rng(1).integers(1, 990, (CLASSES, 16))
    ids[:, 10], ids[:, 11:] = 999, 0
    with torch.no_grad():
        w = torch.nn.functional.normalize(model.encode_text(torch.from_numpy(ids).long()), dim=-1).numpy()
    return dict(model=model, sd0=sd0, cfg=cfg, class_weights=w, batches=_batches(photos),
                initial=lambda: pure_to_params(state_dict_to_pure(sd0, cfg, "openai"), cfg))


# ----------------------------------------------------------------------------- torch transcriptions


def _torch_pixels(torch, images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / np.float32(255.0))


def _embed(torch, model, x, mean, std):
    return model.encode_image((x - mean) / std)


def _tecoa_pgd(torch, logits_fn, x, y):
    """TeCoA `attack_pgd` (CE), without the random start: delta = 0."""
    delta = torch.zeros_like(x)
    for _ in range(ATTACK_STEPS):
        delta.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(logits_fn(x + delta), y)
        g, = torch.autograd.grad(loss, delta)
        delta = torch.clamp(delta.detach() + ALPHA * torch.sign(g), -EPS, EPS)
        delta = torch.max(torch.min(delta, 1 - x), -x)
    return (x + delta).detach()


def _fare_pgd(torch, embed, x, target, delta0):
    """FARE `train/pgd_train.py:pgd` (linf, momentum 0.9) on `l2(reduction="mean")` from `delta0`."""
    pert, velocity = delta0.clone(), torch.zeros_like(x)
    for _ in range(ATTACK_STEPS):
        pert.requires_grad_(True)
        loss = ((embed(x + pert) - target) ** 2).sum(dim=1).mean()
        g, = torch.autograd.grad(loss, pert)
        g[torch.isnan(g)] = 0
        velocity = torch.sign(0.9 * velocity + torch.sign(g))
        pert = torch.clamp(pert.detach() + ALPHA * velocity, -EPS, EPS)
        pert = torch.clamp(x + pert, 0, 1) - x
    return (x + pert).detach()


def _advflyp_pgd(torch, logits_fn, x):
    """AdvFLYP `attack_pgd_captions` (linf) on the symmetric contrastive loss, started at 0."""
    delta, labels = torch.zeros_like(x), torch.arange(x.shape[0])
    ce = torch.nn.functional.cross_entropy
    for _ in range(ATTACK_STEPS):
        delta.requires_grad_(True)
        z = logits_fn(x + delta)
        g, = torch.autograd.grad((ce(z, labels) + ce(z.t(), labels)) / 2, delta)
        delta = torch.clamp(delta.detach() + ALPHA * torch.sign(g), -EPS, EPS)
        delta = torch.max(torch.min(delta, 1 - x), -x)
    return (x + delta).detach()


def _kl(torch, p_logits, q_logits):
    """torch `KLDivLoss(reduction="sum")(log_softmax(q), softmax(p))` = sum KL(p || q)."""
    f = torch.nn.functional
    return f.kl_div(f.log_softmax(q_logits, dim=1), f.softmax(p_logits, dim=1), reduction="sum")


def _norm(torch, d):
    """`torch.norm(d, dim=-1)`, without gradient where it is within rounding of 0 (as clipjax's): at the first
    step f_theta = f_0 and ||a - a0|| is rounding noise (~2e-7 in torch, between its grad and no-grad
    paths), whose gradient would be a unit vector in a random direction on either side."""
    n = torch.norm(d, dim=-1)
    return torch.where(n > 4 * torch.finfo(d.dtype).eps * d.shape[-1] ** 0.5, n, n.detach())


def _advflyp_loss(torch, model, frozen, x, x_adv, ids, mean, std):
    """`Sxing2/AdvFLYP` training_epoch.py: CLIP loss + (||a - a0|| + ||a - c||) + (KL(a || a0) + KL(a || c))."""
    f = torch.nn.functional
    norm = lambda v: f.normalize(v, dim=-1)  # noqa: E731
    a, c = norm(_embed(torch, model, x_adv, mean, std)), norm(_embed(torch, model, x, mean, std))
    t = norm(model.encode_text(ids))
    with torch.no_grad():
        a0 = norm(_embed(torch, frozen, x_adv, mean, std))
    s, s0 = model.logit_scale.exp(), frozen.logit_scale.exp().detach()
    labels = torch.arange(x.shape[0])
    z = s * a @ t.t()
    loss = (f.cross_entropy(z, labels) + f.cross_entropy(z.t(), labels)) / 2
    loss = loss + _norm(torch, a - a0).mean() + _norm(torch, a - c).mean()

    def kl_div(p, q):
        return (p * (p.log() - q.log())).sum(dim=1).mean()

    p = z.softmax(dim=1)
    return loss + kl_div(p, (s0 * a0 @ t.t()).softmax(dim=1)) + kl_div(p, (s * c @ t.t()).softmax(dim=1))


def _torch_run(torch, method, setup, optimizer, starts=None):
    from open_clip_train.scheduler import cosine_lr

    model = copy.deepcopy(setup["model"])
    frozen = copy.deepcopy(setup["model"]).eval()
    cfg = setup["cfg"]
    mean = torch.tensor(cfg.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.preprocess.std).view(1, 3, 1, 1)
    w = torch.from_numpy(setup["class_weights"])
    named = list(model.named_parameters())
    for n, p in named:  # lock_text: open_clip's lock_text_tower freezes every text param
        if method != "advflyp" and not (n.startswith("visual.") or n == "logit_scale"):
            p.requires_grad_(False)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n  # noqa: E731
    groups = [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD}]
    opt = (torch.optim.SGD(groups, lr=LR, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=ADAM_EPS))
    scheduler = cosine_lr(opt, LR, 1, STEPS)

    def class_logits(m, xa):
        return SCALE[method] * torch.nn.functional.normalize(_embed(torch, m, xa, mean, std), dim=-1) @ w.T

    losses, snapshots = [], []
    for step, b in enumerate(setup["batches"]):
        scheduler(step)
        x, y = _torch_pixels(torch, b["image"]), torch.from_numpy(b["label"]).long()
        ce = torch.nn.functional.cross_entropy
        if method in ("tecoa", "pmg-aft"):
            x_adv = _tecoa_pgd(torch, lambda xa: class_logits(model, xa), x, y)
            z_adv = class_logits(model, x_adv)
            loss = ce(z_adv, y)
            if method == "pmg-aft":  # PMG_AFT.py: criterion_kl(log_softmax(other), softmax(output_adv)), summed
                with torch.no_grad():
                    z0 = class_logits(frozen, x_adv)
                loss = loss + _kl(torch, z_adv, class_logits(model, x)) + _kl(torch, z_adv, z0)
        elif method == "fare":
            with torch.no_grad():
                target = _embed(torch, frozen, x, mean, std)
            x_adv = _fare_pgd(torch, lambda xa: _embed(torch, model, xa, mean, std), x, target,
                              _torch_pixels(torch, starts[step] * 255.0))
            loss = ((_embed(torch, model, x_adv, mean, std) - target) ** 2).sum(dim=1).mean()
        else:
            ids = torch.from_numpy(b["text"]).long()
            with torch.no_grad():
                t = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
                s = model.logit_scale.exp()
            x_adv = _advflyp_pgd(torch, lambda xa: s * torch.nn.functional.normalize(
                _embed(torch, model, xa, mean, std), dim=-1) @ t.t(), x)
            loss = _advflyp_loss(torch, model, frozen, x, x_adv, ids, mean, std)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        snapshots.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    del frozen
    return losses, snapshots


# ----------------------------------------------------------------------------- clipjax


def _train_config(method, optimizer, adv_random_start=False):
    from clipjax.train.config import TrainConfig

    return TrainConfig(loss=method, batch_size=BATCH, total_steps=STEPS, lr=LR, warmup_steps=1, weight_decay=WD,
                       optimizer=optimizer, eps=ADAM_EPS, lock_text=method != "advflyp", adv_eps=EPS, adv_alpha=ALPHA,
                       adv_steps=ATTACK_STEPS, adv_random_start=adv_random_start,
                       adv_logit_scale=SCALE.get(method, 100.0))


def _clipjax_run(setup, tc, mesh=None):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from clipjax.models.clip import split_trainable
    from clipjax.train.optim import make_optimizer
    from clipjax.train.state import init_state
    from clipjax.train.step import make_train_step

    cfg, initial = setup["cfg"], setup["initial"]()
    optimizer = make_optimizer(tc, split_trainable(initial)[0], cfg)
    state, shardings = init_state(cfg, optimizer, seed=0, ema=False, model_state=initial, mesh=mesh)
    frozen = {"params": setup["initial"](), "class_weights": jnp.asarray(setup["class_weights"])}
    frozen_sh = None
    if mesh is not None:
        frozen = jax.device_put(frozen, NamedSharding(mesh, P()))
        frozen_sh = jax.tree.map(lambda a: a.sharding, frozen)
    step = make_train_step(cfg, tc, optimizer, mesh=mesh, state_shardings=shardings, reference_config=cfg,
                           frozen_shardings=frozen_sh)
    losses, snapshots, starts = [], [], []
    for b in setup["batches"]:
        # FARE's attack always starts at U(-eps, eps) noise (from delta = 0 at f = f_0 its gradient is
        # rounding noise): the step draws it from this key; the torch run starts from the same noise
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)
        starts.append(np.asarray(jax.random.uniform(key, b["image"].shape, jnp.float32, -EPS, EPS)))
        state, metrics = step(state, b, frozen)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
        snapshots.append(jax.device_get(state.params.to_pure_dict()))
    return losses, snapshots, starts


def _compare_params(got, want_sd, sd0, cfg, step, rel=1e-4):
    import jax

    from clipjax.convert.core import state_dict_to_pure

    want, start = state_dict_to_pure(want_sd, cfg, "openai"), state_dict_to_pure(sd0, cfg, "openai")
    moved = 0.0
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        g = got
        p0 = start
        for p in path:
            g, p0 = g[p.key], p0[p.key]
        g, w, p0 = (np.asarray(a, np.float64) for a in (g, w, p0))
        err, change = float(np.abs(g - w).max()), float(np.abs(w - p0).max())
        assert err <= PARAM_ATOL + rel * change, \
            f"step {step}: {jax.tree_util.keystr(path)} differs by {err:.3g} (it moved by {change:.3g})"
        moved = max(moved, change)
    assert moved > 100 * PARAM_ATOL, f"the params barely moved ({moved:.3g}): the comparison would be vacuous"


CASES = [("tecoa", "sgd"), ("pmg-aft", "sgd"), ("fare", "adamw"), ("advflyp", "sgd")]


@pytest.mark.parametrize("method,optimizer", CASES, ids=[c[0] for c in CASES])
def test_adversarial_steps_match_torch(method, optimizer, setup):
    import torch

    losses, params, starts = _clipjax_run(setup, _train_config(method, optimizer, adv_random_start=method == "fare"))
    want_losses, want_params = _torch_run(torch, method, setup, optimizer, starts)
    # FARE's loss is the squared distance of two nearly equal embeddings: fp32 rounding at 1e-7 of the
    # embedding scale is ~1e-5 of the loss (measured 8e-6 and 2e-5 relative); a pixel stepped the other
    # way would change it by far more
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4 if method == "fare" else 1e-5)
    for i in range(STEPS):
        # FARE's gradient is 2 (f(x_adv) - f_0(x)) J: the same cancellation, ~5e-4 of the update
        _compare_params(params[i], want_params[i], setup["sd0"], setup["cfg"], i + 1,
                        rel=2e-3 if method == "fare" else 1e-4)
    if method != "advflyp":  # the text tower is frozen
        assert np.array_equal(params[-1]["text"]["token_embed"], setup["initial"]().to_pure_dict()["text"]
                              ["token_embed"])


def test_sharded_adversarial_step_equals_single_device(setup, mesh8):
    tc = _train_config("tecoa", "sgd")
    want_losses, want, _ = _clipjax_run(setup, tc)
    losses, got, _ = _clipjax_run(setup, tc, mesh=mesh8)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    import jax

    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got[-1])[0], jax.tree.leaves(want[-1])):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=PARAM_ATOL, err_msg=jax.tree_util.keystr(path))


def test_adversarial_configs_and_batches_are_refused_by_name(setup, tmp_path):
    import clipjax
    from clipjax.config import ConfigError
    from clipjax.train.config import TrainConfig
    from clipjax.train.loop import check_batch, train
    from clipjax.train.step import check_compatible

    cfg = setup["cfg"]
    with pytest.raises(ConfigError, match="set lock_text=True"):
        check_compatible(cfg, TrainConfig(loss="tecoa", batch_size=8), None)
    resnet = clipjax.get_config("RN50")
    with pytest.raises(ConfigError, match="needs a ViT image tower"):
        check_compatible(resnet, TrainConfig(loss="fare", batch_size=8, lock_text=True), None)
    with pytest.raises(ConfigError, match="patch_dropout=0.5 is not supported"):
        check_compatible(cfg, TrainConfig(loss="advflyp", batch_size=8, patch_dropout=0.5), None)
    with pytest.raises(ConfigError, match="adv_eps=2.0"):
        TrainConfig(loss="fare", adv_eps=2.0)
    b = dict(setup["batches"][0])
    check_batch(b, cfg, BATCH, "tecoa", CLASSES)
    with pytest.raises(ValueError, match="needs batch key 'label'"):
        check_batch({k: v for k, v in b.items() if k != "label"}, cfg, BATCH, "pmg-aft", CLASSES)
    with pytest.raises(ValueError, match=r"expected \[0, 4\)"):
        check_batch(dict(b, label=b["label"] + 4), cfg, BATCH, "tecoa", CLASSES)
    with pytest.raises(ValueError, match="must be uint8"):
        check_batch(dict(b, image=b["image"].astype(np.float32)), cfg, BATCH, "fare", CLASSES)
    tc = _train_config("tecoa", "sgd")
    work = tmp_path / "w"
    with pytest.raises(ConfigError, match="needs class_weights"):
        train(cfg, tc, str(work), iter(setup["batches"]), model_state=setup["initial"](), progress=False)
    with pytest.raises(ConfigError, match="needs a reference model"):
        train(cfg, _train_config("fare", "adamw"), str(work), iter(setup["batches"]), progress=False)
    with pytest.raises(ValueError, match=r"class_weights has shape \(4, 7\)"):
        train(cfg, tc, str(work), iter(setup["batches"]), class_weights=np.ones((4, 7), np.float32), progress=False)
    assert not work.exists(), "a refused run must not write its workdir"
