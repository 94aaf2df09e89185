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


def tiny_checkpoint(folder: str) -> str:
    """A random-init clipjax checkpoint of a tiny ViT-B-32-shaped model (CLIP vocabulary), saved to `folder`."""
    import dataclasses

    import clipjax
    from clipjax.checkpoint import save
    from clipjax.models.clip import init_params

    cfg = clipjax.get_config("ViT-B-32")
    cfg = cfg.replace(embed_dim=16,
                      vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=16, width=32, layers=1,
                                                 heads=2, mlp_dim=64),
                      text=dataclasses.replace(cfg.text, width=32, heads=2, layers=1, mlp_dim=64))
    save(folder, cfg, init_params(cfg, seed=0))
    return folder


def randomise_norms(model):
    """Random LayerNorm/BatchNorm affine params, BN statistics and LayerScale gammas of a torch model, in
    place: the defaults (1, 0) would hide mapping bugs."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(m.running_var.shape, generator=g))
            if type(m).__name__ == "LayerScale":
                m.gamma.copy_(0.5 + 0.5 * torch.rand(m.gamma.shape, generator=g))


TINY_OPEN_CLIP = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))


def randomise_attention_biases(model):
    """Random q/k/v and out-proj biases of a torch model, in place: torch starts them at zero, which would hide
    bias-mapping bugs (and the out-bias share of a decomposition)."""
    import torch

    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.MultiheadAttention):
                mod.in_proj_bias.copy_(0.1 * torch.randn(mod.in_proj_bias.shape, generator=g))
                mod.out_proj.bias.copy_(0.1 * torch.randn(mod.out_proj.bias.shape, generator=g))


def randomise_zero_biases(model, scale: float):
    """Random values (std `scale`) for every bias of a torch model that is still all zeros (transformers starts
    its linear biases at zero, which would hide bias-mapping bugs), in place."""
    import torch

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.abs().sum() == 0:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def digit_images(n: int):
    """The first n of scikit-learn's real handwritten digits as uint8 [n, 16, 16, 3] RGB images (8x8, values 0-16,
    scaled to 0-255 and repeated 2x2), and their labels [n]."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.repeat(np.kron(d.images[:n] * (255 / 16), np.ones((2, 2))).round().astype(np.uint8)[..., None], 3, -1)
    return images, d.target[:n].astype(int)


def read_all(config, tokenizer, *, image_size: int, batch: int = 4, **kw):
    """One eval-mode pass over `clipjax.data.make_batches(config, ...)`: `(batches, bad_counts(), classnames)`."""
    from clipjax.data import make_batches

    it = make_batches(config, image_size=image_size, tokenizer=tokenizer, batch_size=batch, train=False,
                      num_epochs=1, **kw)
    batches = list(it)
    it.close()
    return batches, it.bad_counts(), it.classnames


def key_labels(batches) -> dict:
    """{key: label} over `batches`, each key once (an example read twice fails), labels int32 `[b]`."""
    import numpy as np

    out = {}
    for b in batches:
        assert b["label"].dtype == np.int32 and b["label"].shape == b["__key__"].shape
        for k, y in zip(b["__key__"], b["label"]):
            assert k not in out, f"{k} read twice"
            out[str(k)] = int(y)
    return out


def open_clip_and_clipjax(folder, cfg: dict | None = None, *, randomise: bool = False):
    """A random-init `open_clip.CLIP(**cfg)` (eval mode; seed 0) and the clipjax `Model` converted from its saved
    state dict with the open_clip JSON (`load_pytorch(..., config=...)`). `randomise`: random norms and attention
    biases first (`randomise_norms`, `randomise_attention_biases`)."""
    import json
    import os

    import open_clip
    import torch

    from clipjax.convert.api import load_pytorch

    cfg = TINY_OPEN_CLIP if cfg is None else cfg
    torch.manual_seed(0)
    tm = open_clip.CLIP(**cfg).eval()
    if randomise:
        randomise_norms(tm)
        randomise_attention_biases(tm)
    folder = str(folder)
    torch.save(tm.state_dict(), os.path.join(folder, "m.bin"))
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return tm, load_pytorch(os.path.join(folder, "m.bin"), config=os.path.join(folder, "cfg.json"))
