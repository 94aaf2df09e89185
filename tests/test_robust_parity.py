"""`clipjax.robust` against AutoAttack (pip `pyautoattack` 0.2.0) and torchattacks 3.5.1.

1. APGD trajectory, exactly: on a linear "CLIP" (pixels -> CLIP mean/std -> A x -> normalise -> 100 cos)
   in float64 on both sides (`jax.enable_x64`, `torch.set_default_dtype(float64)`), clipjax's
   `apgd` / `apgd_targeted` with an injected start `x_init` against pyautoattack's own
   `APGDAttack.attack_single_run(x, y, x_init)` (resp. `APGDAttack_targeted` with `y_target` = the
   runner-up clean class), 30 iterations (checkpoints at 5, 10, 14, 17, 19, 20, ..., 29, including
   AutoAttack's wrap-around read of the loss history), masked as `perturb` does: max abs difference 1e-10
   for L-inf CE, L-inf DLR, L2 CE and L-inf targeted DLR.
2. Robust accuracy on a tiny random-init open_clip ViT (width 32, 1 layer, 32 px) converted by clipjax,
   on real digits (sklearn, 8 -> 32 px nearest): 24 test digits the classifier gets right and 8 it gets
   wrong. The class embeddings are the centred mean image embeddings of the training digits (a random
   text tower would give meaningless text weights), used as zero-shot class weights (100 cos).
   * TeCoA's protocol (eps 1/255): PGD (alpha 1/255, 5 steps) vs torchattacks `PGD` (the same update as
     TeCoA's `attack_pgd`); AutoAttack as TeCoA's `attack_auto` runs it (version 'standard', then
     attacks_to_run = [apgd-ce, apgd-dlr]) vs `robust_after` / `autoattack_accuracy`; APGD-CE vs
     torchattacks `APGD` too.
   * FARE's protocol (eps 1/255 here): AutoAttack version 'custom' with (apgd-ce, apgd-t), 5 restarts,
     9 targets, 100 iterations.
   Tolerance: robust counts equal within 2 of the 24 clean-correct digits (measured: equal). The random
   starts differ (JAX threefry vs torch's generator), and float32 sums run in a different order, so a
   point near the decision boundary may fall on either side; clean predictions are equal.
   eps = 1/255 leaves robust accuracy strictly between 0 and the clean accuracy (asserted).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchattacks
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from clipjax.robust.apgd import apgd, apgd_targeted
from clipjax.robust.evaluate import robust_accuracy, zero_shot_logits_fn

pytestmark = pytest.mark.parity

MEAN = np.array((0.48145466, 0.4578275, 0.40821073))
STD = np.array((0.26862954, 0.26130258, 0.27577711))
EPS = 1 / 255


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _digits(scale: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = np.repeat(np.repeat(data.images / 16.0, scale, 1), scale, 2)[..., None].repeat(3, -1)
    return x, data.target


@pytest.fixture(autouse=True, scope="module")
def _quiet_single_thread():
    """AutoAttack's log off; torch on one thread: tiny models, and on a shared 2-core machine torch's
    OpenMP threads make each step about 20x slower (measured)."""
    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- 1. the APGD trajectory
@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")  # misclassified points, y == target
@pytest.mark.parametrize("norm,loss,eps", [("linf", "ce", 1.5 / 255), ("linf", "dlr", 1.5 / 255),
                                           ("l2", "ce", 0.25), ("linf", "dlr-targeted", 1.5 / 255)])
def test_apgd_single_run_matches_autoattack(norm, loss, eps):
    x, y = _digits(2)
    x, y = x[1::2][:32], y[1::2][:32]  # 16 px
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16 * 16 * 3, 24)) / 16.0
    train, train_y = _digits(2)
    emb = _unit(((train[::2] - MEAN) / STD).reshape(len(train[::2]), -1) @ a)
    means = np.stack([emb[train_y[::2] == k].mean(0) for k in range(10)])
    t = _unit(means - means.mean(0))
    if norm == "linf":
        x_init = np.clip(x + rng.uniform(-eps, eps, x.shape), 0, 1)
    else:
        n = rng.normal(size=x.shape)
        x_init = np.clip(x + 0.5 * eps * n / np.linalg.norm(n.reshape(len(n), -1), axis=1)[:, None, None, None], 0, 1)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ta, tt = torch.tensor(a), torch.tensor(t)
        tmean, tstd = torch.tensor(MEAN), torch.tensor(STD)

        def predict(z):  # NHWC works: APGD only flattens per example
            e = ((z - tmean) / tstd).reshape(z.shape[0], -1) @ ta
            return 100.0 * (e / e.norm(dim=1, keepdim=True)) @ tt.T

        big_x, big_y = torch.tensor(x), torch.tensor(y)
        kw = dict(n_iter=30, norm="Linf" if norm == "linf" else "L2", eps=eps, device="cpu")
        if loss == "dlr-targeted":
            attack = APGDAttack_targeted(predict, **kw)
            attack.y_target = predict(big_x).sort(dim=1)[1][:, -2]
        else:
            attack = APGDAttack(predict, loss=loss, **kw)
        attack.init_hyperparam(big_x)
        _, acc, _, x_best_adv = attack.attack_single_run(big_x, big_y, x_init=torch.tensor(x_init))
        clean = (predict(big_x).argmax(1) == big_y).numpy()
        acc = acc.detach()
        fooled = clean & ~acc.numpy().astype(bool)
        ref = np.where(fooled[:, None, None, None], x_best_adv.detach().numpy(), x)
    finally:
        torch.set_default_dtype(previous)

    with jax.enable_x64(True):
        ja, jt = jnp.asarray(a), jnp.asarray(t)

        def logits_fn(z):
            e = ((z - MEAN) / STD).reshape(z.shape[0], -1) @ ja
            return 100.0 * (e / jnp.linalg.norm(e, axis=1, keepdims=True)) @ jt.T

        if loss == "dlr-targeted":
            out = apgd_targeted(logits_fn, x, y, None, eps=eps, norm=norm, steps=30, n_target_classes=1,
                                x_init=x_init)
        else:
            out = apgd(logits_fn, x, y, None, eps=eps, norm=norm, steps=30, loss=loss, x_init=x_init)
        out = np.asarray(out)
    assert out.dtype == np.float64
    assert 0 < fooled.sum() < clean.sum()  # some points fooled, some not: the whole schedule matters
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- 2. robust accuracy on a ViT
@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    from clipjax.models.clip import encode_image

    from helpers import open_clip_and_clipjax

    tm, model = open_clip_and_clipjax(tmp_path_factory.mktemp("vit"))

    x, y = _digits(4)
    x = x.astype(np.float32)
    mean, std = MEAN.astype(np.float32), STD.astype(np.float32)
    emb = np.asarray(encode_image(model.params, (x[::2] - mean) / std, config=model.config))
    means = np.stack([emb[y[::2] == k].mean(0) for k in range(10)])
    w = _unit(means - means.mean(0)).astype(np.float32)
    logits_fn = zero_shot_logits_fn(model.params, model.config, w)
    test_x, test_y = x[1::2], y[1::2]
    right = np.asarray(logits_fn(test_x)).argmax(1) == test_y
    pick = np.concatenate([np.flatnonzero(right)[:24], np.flatnonzero(~right)[:8]])

    class ZeroShot(torch.nn.Module):  # TeCoA's forward without the resize: normalise, encode, 100 cos
        def __init__(self):
            super().__init__()
            self.model, self.w = tm, torch.tensor(w)
            self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

        def forward(self, images):
            z = self.model.encode_image((images - self.mean) / self.std)
            return 100.0 * (z / z.norm(dim=-1, keepdim=True)) @ self.w.T

    x, y = test_x[pick], test_y[pick]
    return dict(f=logits_fn, net=ZeroShot().eval(), x=x, y=y, tx=torch.tensor(x).permute(0, 3, 1, 2).contiguous(),
                ty=torch.tensor(y))


def _accuracy(net, images, labels):
    with torch.no_grad():
        return (net(images).argmax(1) == labels).numpy()


def test_tecoa_protocol_matches_torchattacks_and_autoattack(vit):
    f, net, tx, ty = vit["f"], vit["net"], vit["tx"], vit["ty"]
    ours = robust_accuracy(f, vit["x"], vit["y"], jax.random.key(0), protocol="tecoa", eps=EPS)
    clean = _accuracy(net, tx, ty)
    np.testing.assert_array_equal(ours["clean_correct"], clean)
    assert clean.sum() == 24

    torch.manual_seed(0)
    pgd_images = torchattacks.PGD(net, eps=EPS, alpha=1 / 255, steps=5, random_start=True)(tx, ty)
    pgd_correct = _accuracy(net, pgd_images, ty).sum()  # TeCoA: accuracy on the attacked images
    assert abs(round(ours["attack_accuracy"]["pgd"] * 32) - pgd_correct) <= 2

    apgd_images = torchattacks.APGD(net, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=0)(tx, ty)
    apgd_robust = (_accuracy(net, apgd_images, ty) & clean).sum()
    assert abs(round(ours["robust_after"]["apgd-ce"] * 32) - apgd_robust) <= 2

    adversary = AutoAttack(net, norm="Linf", eps=EPS, version="standard", seed=0)  # TeCoA's attack_auto
    adversary.attacks_to_run = ["apgd-ce", "apgd-dlr"]
    adv, _ = adversary.run_standard_evaluation(tx, ty, batch_size=32)
    aa_robust = _accuracy(net, adv, ty).sum()
    ours_robust = round(ours["autoattack_accuracy"] * 32)
    assert abs(ours_robust - aa_robust) <= 2, (ours_robust, aa_robust)
    assert 0 < ours_robust < 24 and 0 < aa_robust < 24
    assert ours["robust"].sum() <= min(ours_robust, round(ours["attack_accuracy"]["pgd"] * 32))


def test_fare_protocol_matches_autoattack(vit):
    f, net, tx, ty = vit["f"], vit["net"], vit["tx"], vit["ty"]
    ours = robust_accuracy(f, vit["x"], vit["y"], jax.random.key(1), protocol="fare", eps=EPS)
    adversary = AutoAttack(net, attacks=["apgd-ce", "apgd-t"], norm="Linf", eps=EPS, version="custom", seed=0)
    assert adversary.apgd.n_restarts == 5 and adversary.apgd_targeted.n_target_classes == 9
    adv, _ = adversary.run_standard_evaluation(tx, ty, batch_size=32)
    aa_robust = _accuracy(net, adv, ty).sum()
    ours_robust = int(ours["robust"].sum())
    assert abs(ours_robust - aa_robust) <= 2, (ours_robust, aa_robust)
    assert 0 < ours_robust < 24
    assert ours["attacks"] == (("apgd-ce", {"restarts": 5, "steps": 100}),
                               ("apgd-t", {"n_target_classes": 9, "restarts": 1, "steps": 100}))
