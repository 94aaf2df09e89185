"""Key tables between PyTorch state dicts and clipjax params, in both directions.

A `Rule` maps one source key (optionally per layer, `{i}` in the key) to one
or more clipjax param paths, with a forward transform (torch -> clipjax) and
its inverse (clipjax -> torch, used by `export`). `apply_rules` consumes the
state dict and reports missing and leftover keys by name; nothing is loaded
partially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from clipjax.config import CLIPConfig
from clipjax.convert.errors import ConversionError

Array = np.ndarray


@dataclass(frozen=True)
class Rule:
    source: str  # torch key, "{i}" for the layer index
    targets: tuple[str, ...]  # dotted clipjax param paths
    fwd: Callable[[Array], tuple[Array, ...]]
    inv: Callable[..., Array]
    layers: int = 0  # > 0: stacked over this many layers


def same(x):
    return (x,)


def ident(x):
    return x


def linear_t(x):  # torch Linear [out, in] -> kernel [in, out]
    return (x.T,)


def linear_inv(k):
    return k.T


def rule(source, target, fwd=same, inv=ident, layers=0) -> Rule:
    targets = (target,) if isinstance(target, str) else tuple(target)
    return Rule(source, targets, fwd, inv, layers)


def squeeze0(x):
    return (x.reshape(x.shape[1:]),)


def attention_rules(src: str, dst: str, dim: int, heads: int, layers: int, style: str,
                    kv_dim: int | None = None) -> list[Rule]:
    """q/k/v/out of one attention module: `style` "mha" (packed in_proj), "qkv" (timm) or "hf" (q/k/v_proj).

    `kv_dim` (style "mha" only): the key/value width of `nn.MultiheadAttention(dim, heads, kdim=vdim=kv_dim)`;
    when it differs from `dim`, torch keeps separate `q_proj_weight` `[dim, dim]`, `k_proj_weight` and
    `v_proj_weight` `[dim, kv_dim]` and one packed `in_proj_bias` `[3 dim]`.
    """
    hd = dim // heads
    if style == "mha" and kv_dim not in (None, dim):
        bnames = tuple(f"{dst}.{n}" for n in ("q_bias", "k_bias", "v_bias"))
        out = [rule(f"{src}.q_proj_weight", f"{dst}.q_kernel", lambda w: (w.T.reshape(dim, heads, hd),),
                    lambda k: k.reshape(dim, dim).T, layers)]
        out += [rule(f"{src}.{n}_proj_weight", f"{dst}.{n}_kernel", lambda w: (w.T.reshape(kv_dim, heads, hd),),
                     lambda k: k.reshape(kv_dim, dim).T, layers) for n in "kv"]
        out.append(rule(f"{src}.in_proj_bias", bnames, lambda b: tuple(p.reshape(heads, hd) for p in np.split(b, 3)),
                        lambda *bs: np.concatenate([b.reshape(dim) for b in bs]), layers))
        return out + [rule(f"{src}.out_proj.weight", f"{dst}.out_kernel", lambda w: (w.T.reshape(heads, hd, dim),),
                           lambda k: k.reshape(dim, dim).T, layers),
                      rule(f"{src}.out_proj.bias", f"{dst}.out_bias", layers=layers)]

    def split3(w):  # [3D, D] or [3D] -> three [D, H, Dh] / [H, Dh]
        if w.ndim == 2:
            return tuple(p.T.reshape(dim, heads, hd) for p in np.split(w, 3, axis=0))
        return tuple(p.reshape(heads, hd) for p in np.split(w, 3))

    def join3(*parts):
        if parts[0].ndim == 3:
            return np.concatenate([p.reshape(dim, dim).T for p in parts], axis=0)
        return np.concatenate([p.reshape(dim) for p in parts])

    out = []
    names = [f"{dst}.{n}" for n in ("q_kernel", "k_kernel", "v_kernel")]
    bnames = [f"{dst}.{n}" for n in ("q_bias", "k_bias", "v_bias")]
    if style in ("mha", "qkv"):
        w, b = ("in_proj_weight", "in_proj_bias") if style == "mha" else ("qkv.weight", "qkv.bias")
        out += [rule(f"{src}.{w}", names, split3, join3, layers), rule(f"{src}.{b}", bnames, split3, join3, layers)]
        o = "out_proj" if style == "mha" else "proj"
    else:
        for p, n, bn in zip("qkv", names, bnames):
            out += [rule(f"{src}.{p}_proj.weight", n, lambda w: (w.T.reshape(dim, heads, hd),),
                         lambda k: k.reshape(dim, dim).T, layers),
                    rule(f"{src}.{p}_proj.bias", bn, lambda b: (b.reshape(heads, hd),), lambda b: b.reshape(dim),
                         layers)]
        o = "out_proj"
    out += [rule(f"{src}.{o}.weight", f"{dst}.out_kernel", lambda w: (w.T.reshape(heads, hd, dim),),
                 lambda k: k.reshape(dim, dim).T, layers),
            rule(f"{src}.{o}.bias", f"{dst}.out_bias", layers=layers)]
    return out


def ln_rules(src: str, dst: str, layers=0) -> list[Rule]:
    return [rule(f"{src}.weight", f"{dst}.scale", layers=layers), rule(f"{src}.bias", f"{dst}.bias", layers=layers)]


def dense_rules(src: str, dst: str, layers=0, bias=True) -> list[Rule]:
    out = [rule(f"{src}.weight", f"{dst}.kernel", linear_t, linear_inv, layers)]
    return out + ([rule(f"{src}.bias", f"{dst}.bias", layers=layers)] if bias else [])


def block_rules(src: str, dst: str, dim: int, heads: int, layers: int, style: str,
                layer_scale: bool = False) -> list[Rule]:
    """One transformer stack. style: "openai" (resblocks), "timm" (blocks), "hf" (encoder.layers).

    `layer_scale` (style "openai"): open_clip's LayerScale gammas `ls_1.gamma`, `ls_2.gamma` -> `ls1`, `ls2`."""
    if layer_scale and style != "openai":
        raise ValueError(f"LayerScale keys are mapped for open_clip's resblocks only, not style {style!r}")
    if style == "openai":
        b = f"{src}.resblocks.{{i}}"
        names = ("ln_1", "attn", "ln_2", "mlp.c_fc", "mlp.c_proj", "mha")
    elif style == "timm":
        b = f"{src}.{{i}}"
        names = ("norm1", "attn", "norm2", "mlp.fc1", "mlp.fc2", "qkv")
    else:
        b = f"{src}.layers.{{i}}"
        names = ("layer_norm1", "self_attn", "layer_norm2", "mlp.fc1", "mlp.fc2", "hf")
    ln1, attn, ln2, fc1, fc2, astyle = names
    d = f"{dst}.blocks"
    ls = ([rule(f"{b}.ls_1.gamma", f"{d}.ls1", layers=layers), rule(f"{b}.ls_2.gamma", f"{d}.ls2", layers=layers)]
          if layer_scale else [])
    return (ln_rules(f"{b}.{ln1}", f"{d}.ln1", layers) + attention_rules(f"{b}.{attn}", f"{d}.attn", dim, heads,
                                                                        layers, astyle)
            + ln_rules(f"{b}.{ln2}", f"{d}.ln2", layers) + dense_rules(f"{b}.{fc1}", f"{d}.mlp.fc1", layers)
            + dense_rules(f"{b}.{fc2}", f"{d}.mlp.fc2", layers) + ls)


def conv_patch(w):  # torch [D, 3, p, p] -> [p, p, 3, D]
    return (w.transpose(2, 3, 1, 0),)


def conv_patch_inv(k):
    return k.transpose(3, 2, 0, 1)


# ----------------------------------------------------------------------------- per source family


def openai_vision_rules(cfg: CLIPConfig, p: str = "visual") -> list[Rule]:
    """open_clip's `VisionTransformer` (OpenAI layout), with LayerScale and CoCa's `attn_pool` when configured."""
    v = cfg.vision
    pool = []
    if v.pool == "attn":
        a = f"{p}.attn_pool"
        pool = ([rule(f"{a}.query", "visual.attn_pool.query")] + ln_rules(f"{a}.ln_q", "visual.attn_pool.ln_q")
                + ln_rules(f"{a}.ln_k", "visual.attn_pool.ln_k")
                + attention_rules(f"{a}.attn", "visual.attn_pool.attn", cfg.embed_dim, v.attn_pool_heads, 0, "mha",
                                  kv_dim=v.width))
    return ([rule(f"{p}.conv1.weight", "visual.patch_kernel", conv_patch, conv_patch_inv),
             rule(f"{p}.class_embedding", "visual.class_embedding"),
             rule(f"{p}.positional_embedding", "visual.pos_embed")]
            + (ln_rules(f"{p}.ln_pre", "visual.ln_pre") if v.ln_pre else [])
            + block_rules(f"{p}.transformer", "visual.transformer", v.width, v.heads, v.layers, "openai",
                          layer_scale=v.layer_scale)
            + pool + ln_rules(f"{p}.ln_post", "visual.ln_post") + [rule(f"{p}.proj", "visual.proj")])


def openai_text_rules(cfg: CLIPConfig, p: str = "") -> list[Rule]:
    """open_clip's `TextTransformer` (keys under `p`), with LayerScale and CoCa's `cls_emb` when configured."""
    t = cfg.text
    out = [rule(f"{p}token_embedding.weight", "text.token_embed"),
           rule(f"{p}positional_embedding", "text.pos_embed")]
    if t.embed_cls:
        out.append(rule(f"{p}cls_emb", "text.cls_emb"))
    out += block_rules(f"{p}transformer", "text.transformer", t.width, t.heads, t.layers, "openai",
                       layer_scale=t.layer_scale)
    out += ln_rules(f"{p}ln_final", "text.ln_final")
    if not cfg.text_proj:
        return out
    if t.proj_bias:
        out += [rule(f"{p}text_projection.weight", "text.proj", linear_t, linear_inv),
                rule(f"{p}text_projection.bias", "text.proj_bias")]
    else:
        out.append(rule(f"{p}text_projection", "text.proj"))
    return out


def timm_siglip_vision_rules(cfg: CLIPConfig, p: str = "visual.trunk") -> list[Rule]:
    v = cfg.vision
    m = f"{p}.attn_pool"

    def kv_split(w):
        k, vv = np.split(w, 2, axis=0)
        if w.ndim == 2:
            return tuple(x.T.reshape(v.width, v.heads, v.width // v.heads) for x in (k, vv))
        return tuple(x.reshape(v.heads, v.width // v.heads) for x in (k, vv))

    def kv_join(k, vv):
        if k.ndim == 3:
            return np.concatenate([x.reshape(v.width, v.width).T for x in (k, vv)], axis=0)
        return np.concatenate([x.reshape(v.width) for x in (k, vv)])

    hd = v.width // v.heads
    return ([rule(f"{p}.patch_embed.proj.weight", "visual.patch_kernel", conv_patch, conv_patch_inv),
             rule(f"{p}.patch_embed.proj.bias", "visual.patch_bias"),
             rule(f"{p}.pos_embed", "visual.pos_embed", squeeze0, lambda x: x[None])]
            + block_rules(f"{p}.blocks", "visual.transformer", v.width, v.heads, v.layers, "timm")
            + ln_rules(f"{p}.norm", "visual.ln_post")
            + [rule(f"{m}.latent", "visual.map_head.probe", squeeze0, lambda x: x[None]),
               rule(f"{m}.q.weight", "visual.map_head.attn.q_kernel", lambda w: (w.T.reshape(v.width, v.heads, hd),),
                    lambda k: k.reshape(v.width, v.width).T),
               rule(f"{m}.q.bias", "visual.map_head.attn.q_bias", lambda b: (b.reshape(v.heads, hd),),
                    lambda b: b.reshape(v.width)),
               rule(f"{m}.kv.weight", ("visual.map_head.attn.k_kernel", "visual.map_head.attn.v_kernel"), kv_split,
                    kv_join),
               rule(f"{m}.kv.bias", ("visual.map_head.attn.k_bias", "visual.map_head.attn.v_bias"), kv_split,
                    kv_join),
               rule(f"{m}.proj.weight", "visual.map_head.attn.out_kernel",
                    lambda w: (w.T.reshape(v.heads, hd, v.width),), lambda k: k.reshape(v.width, v.width).T),
               rule(f"{m}.proj.bias", "visual.map_head.attn.out_bias")]
            + ln_rules(f"{m}.norm", "visual.map_head.ln") + dense_rules(f"{m}.mlp.fc1", "visual.map_head.mlp.fc1")
            + dense_rules(f"{m}.mlp.fc2", "visual.map_head.mlp.fc2"))


def hf_vision_rules(cfg: CLIPConfig) -> list[Rule]:
    v = cfg.vision
    p = "vision_model"
    e = f"{p}.embeddings"
    out = [rule(f"{e}.patch_embedding.weight", "visual.patch_kernel", conv_patch, conv_patch_inv),
           rule(f"{e}.position_embedding.weight", "visual.pos_embed")]
    if v.patch_bias:
        out.append(rule(f"{e}.patch_embedding.bias", "visual.patch_bias"))
    if v.class_token:
        out.append(rule(f"{e}.class_embedding", "visual.class_embedding"))
    if v.ln_pre:
        out += ln_rules(f"{p}.pre_layrnorm", "visual.ln_pre")
    out += block_rules(f"{p}.encoder", "visual.transformer", v.width, v.heads, v.layers, "hf")
    out += ln_rules(f"{p}.post_layernorm", "visual.ln_post")
    if v.pool == "map":
        h = f"{p}.head"
        out += [rule(f"{h}.probe", "visual.map_head.probe", squeeze0, lambda x: x[None])]
        out += attention_rules(f"{h}.attention", "visual.map_head.attn", v.width, v.heads, 0, "mha")
        out += ln_rules(f"{h}.layernorm", "visual.map_head.ln")
        out += dense_rules(f"{h}.mlp.fc1", "visual.map_head.mlp.fc1") + dense_rules(f"{h}.mlp.fc2",
                                                                                   "visual.map_head.mlp.fc2")
    if cfg.vision_proj:
        out.append(rule("visual_projection.weight", "visual.proj", linear_t, linear_inv))
    return out


def hf_text_rules(cfg: CLIPConfig) -> list[Rule]:
    t = cfg.text
    p = "text_model"
    out = [rule(f"{p}.embeddings.token_embedding.weight", "text.token_embed"),
           rule(f"{p}.embeddings.position_embedding.weight", "text.pos_embed")]
    out += block_rules(f"{p}.encoder", "text.transformer", t.width, t.heads, t.layers, "hf")
    out += ln_rules(f"{p}.final_layer_norm", "text.ln_final")
    if cfg.is_siglip:
        out += [rule(f"{p}.head.weight", "text.proj", linear_t, linear_inv), rule(f"{p}.head.bias", "text.proj_bias")]
    elif cfg.text_proj:  # CLIPTextModel (a text tower alone) has no projection
        out.append(rule("text_projection.weight", "text.proj", linear_t, linear_inv))
    return out


def scalar_rules(cfg: CLIPConfig, hf: bool) -> list[Rule]:
    fwd = (lambda x: (x.reshape(()),))
    out = [rule("logit_scale", "log_logit_scale", fwd, lambda x: x.reshape((1,) if hf and cfg.is_siglip else ()))]
    if cfg.is_siglip:
        out.append(rule("logit_bias", "logit_bias", fwd, lambda x: x.reshape((1,))))
    return out


# ----------------------------------------------------------------------------- application


def _keys(r: Rule) -> list[str]:
    return [r.source.format(i=i) for i in range(r.layers)] if r.layers else [r.source]


def apply_rules(rules: list[Rule], sd: dict[str, Array], prefix_ignore: tuple[str, ...] = ()) -> dict[str, Array]:
    """Torch state dict -> flat `{dotted clipjax path: array}`. Raises on missing or leftover keys."""
    needed = [k for r in rules for k in _keys(r)]
    missing = [k for k in needed if k not in sd]
    extra = sorted(set(sd) - set(needed) - {k for k in sd if k.startswith(prefix_ignore) or _ignorable(k)})
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            msg.append(f"unexpected keys ({len(extra)}): {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        raise ConversionError("state dict does not match the architecture: " + "; ".join(msg))
    out: dict[str, Array] = {}
    for r in rules:
        try:
            parts = [r.fwd(np.asarray(sd[k])) for k in _keys(r)]
        except ValueError as e:  # reshape of a wrongly sized tensor
            raise ConversionError(f"{r.source}: shape {np.shape(sd[_keys(r)[0]])} does not fit the architecture "
                                  f"({e})") from None
        for j, t in enumerate(r.targets):
            out[t] = np.stack([p[j] for p in parts]) if r.layers else parts[0][j]
    return out


def _ignorable(key: str) -> bool:
    """Buffers that carry no weights: BatchNorm counters, HF position ids, attention masks."""
    return key.endswith(("num_batches_tracked", "position_ids")) or key in ("attn_mask", "text.attn_mask")


def invert_rules(rules: list[Rule], flat: dict[str, Array]) -> dict[str, Array]:
    """Flat clipjax params -> torch state dict (the inverse of `apply_rules`)."""
    sd: dict[str, Array] = {}
    for r in rules:
        arrays = [np.asarray(flat[t]) for t in r.targets]
        if r.layers:
            for i, k in enumerate(_keys(r)):
                sd[k] = np.array(r.inv(*[a[i] for a in arrays]), order="C")
        else:
            sd[r.source] = np.array(r.inv(*arrays), order="C")
    return sd
