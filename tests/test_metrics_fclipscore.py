"""`clipjax.metrics.fclipscore` (CLIP4DM, F-CLIPScore) and `clipjax score fclipscore` against the official code.

Model: a tiny random open_clip CLIP (text: 4 blocks, width 32, 2 heads, so "the last 3 blocks" is a proper
subset; random LayerNorms and attention biases), converted by clipjax. Images: real scikit-image photos.

- Relevance (float32 both sides): R equals a torch transcription of `CLIP4DM.get_attribution_map` on the open_clip
  text tower, whose blocks are re-run with the attention probabilities as graph tensors (one caption at a time,
  as the code; `torch.autograd.grad` of s = cos(image, text) w.r.t. each of the last 3 maps, cam = grad * attn,
  mean over heads, sum / 3); max abs diff <= 1e-5 x max |R| (float32 gradients through 4 blocks; seen: 1.4e-6). The
  similarity agrees to 1e-5. Token attributions are R[eot, i] at exactly the caption positions 4..eot-1 (the
  prefix "A photo depicts " is 3 BPE tokens after SOT).
- Word grouping: on real captions (punctuation, "...", contractions, accents, a caption past 77 tokens), the
  words and word attributions equal a transcription of `CLIP4DM.__call__`'s grouping with open_clip's own
  `SimpleTokenizer` and clip4dm's `space_tokenize` / `tokenizer2space` (float64, abs 1e-12).
- Misaligned words and F-CLIPScore: both modes against a float64 transcription of `__call__`'s list logic and
  `calculate_metrics` (neg * (1 - pair_score / 2.5), pair_score = 2.5 max(s, 0)) on random attributions that
  straddle the -5e-5 threshold (abs 1e-15).
- CLI: `clipjax score fclipscore` in-process on a tiny checkpoint and a folder of 2 photos: clip_score from the
  model's own `encode_image` / `encode_text` (Hessel's formula, rel 1e-5); words, attributions and F-CLIPScore
  from the library (rel 1e-5) and F-CLIPScore recomputed from the JSON's own attributions by the oracle.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import open_clip_and_clipjax, tiny_checkpoint
from open_clip.tokenizer import SimpleTokenizer

import clipjax
from clipjax.cli import main
from clipjax.metrics import fclipscore as fcs
from clipjax.preprocess import preprocess
from clipjax.tokenizer import Tokenizer

pytestmark = pytest.mark.parity

TEMPLATE = "A photo depicts "
CAPTIONS = ["a cup of coke", "An astronaut, holding a flag... near the rocket!", "don't panic: it's a 3-D cat",
            "café crème on a  wooden table .", "a " + "very " * 80 + "long caption"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=4))
    return open_clip_and_clipjax(tmp_path_factory.mktemp("fclip"), cfg, randomise=True)


# ----------------------------------------------------------------------------- official computation (torch)
def torch_text_with_attention(tm, ids):
    """open_clip's `encode_text` for one row `[1, L]`, blocks re-run so each attention map `[1, H, L, L]` is a
    tensor in the graph (HF's `output_attentions`)."""
    x = tm.token_embedding(ids) + tm.positional_embedding
    mask = tm.attn_mask
    attns = []
    for blk in tm.transformer.resblocks:
        y = blk.ln_1(x)
        mha = blk.attn
        h = mha.num_heads
        q, k, v = F.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        t, d = y.shape[1], y.shape[2]
        q, k, v = (a.reshape(1, t, h, d // h).transpose(1, 2) for a in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h) + mask, dim=-1)
        attns.append(attn)
        out = (attn @ v).transpose(1, 2).reshape(1, t, d)
        x = x + blk.ls_1(mha.out_proj(out))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    x = tm.ln_final(x)
    return x[torch.arange(1), ids.argmax(dim=-1)] @ tm.text_projection, attns


def official_attribution_map(tm, image_features, ids, start_layer_text=-3):
    """`CLIP4DM.get_attribution_map` (batch 1), float32: R_text [L, L] and the logit s."""
    text_features, text_attn_blocks = torch_text_with_attention(tm, ids)
    logit = F.normalize(text_features, dim=-1) @ F.normalize(image_features, dim=-1).T  # logits / logit_scale
    text_attn_blocks = text_attn_blocks[start_layer_text:]
    num_tokens = text_attn_blocks[0].shape[-1]
    r_text = torch.zeros(1, num_tokens, num_tokens)
    one_hot = torch.zeros(1, 1)
    one_hot[0, 0] = 1
    logit = torch.sum(one_hot * logit)
    for attn in text_attn_blocks[::-1]:
        grad = torch.autograd.grad(logit, [attn], retain_graph=True)[0].detach()
        cam = attn.detach().reshape(-1, num_tokens, num_tokens)
        cam = (grad * cam).mean(dim=1)
        r_text = r_text + cam
    return (r_text / len(text_attn_blocks))[0].numpy(), float(logit.detach())


def test_relevance_matches_official_torch(tiny, photos):
    tm, model = tiny
    tok = Tokenizer.openai()
    caps = CAPTIONS[:4]
    pixels = preprocess(photos, model.config.preprocess, 32)
    ids = tok([TEMPLATE + c for c in caps])
    with torch.no_grad():
        image = tm.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
    rmap, sim, pool = (np.asarray(a) for a in fcs.relevance_map(model.params, pixels, ids, config=model.config))
    rel = fcs.clip4dm_relevance(model.params, pixels, ids, config=model.config)
    for b in range(len(caps)):
        row = torch.from_numpy(ids[b:b + 1].astype(np.int64))
        with torch.no_grad():  # the transcription's text tower is open_clip's
            np.testing.assert_allclose(torch_text_with_attention(tm, row)[0].numpy(),
                                       tm.encode_text(row).numpy(), rtol=0, atol=1e-5)
        want, s = official_attribution_map(tm, image[b:b + 1], row)
        scale = np.abs(want).max()
        assert scale > 0
        assert np.abs(rmap[b] - want).max() <= 1e-5 * scale
        assert sim[b] == pytest.approx(s, abs=1e-5)
        eot = int(ids[b].argmax())
        assert pool[b] == eot
        mask = np.asarray(rel.mask[b])
        assert np.flatnonzero(mask).tolist() == list(range(4, eot))
        np.testing.assert_array_equal(np.asarray(rel.tokens[b])[mask], rmap[b, eot, 4:eot])
        assert np.all(np.asarray(rel.tokens[b])[~mask] == 0)
    # fewer text blocks than `layers`: all of them, as the code's attentions[-3:]
    r_all = np.asarray(fcs.relevance_map(model.params, pixels[:1], ids[:1], config=model.config, layers=9)[0])
    want_all, _ = official_attribution_map(tm, image[:1], torch.from_numpy(ids[:1].astype(np.int64)), -9)
    assert np.abs(r_all[0] - want_all).max() <= 1e-5 * np.abs(want_all).max()
    with pytest.raises(ValueError, match="pixels and ids must pair rows"):
        fcs.clip4dm_relevance(model.params, pixels[:2], ids, config=model.config)
    with pytest.raises(ValueError, match="prefix_len must be an int >= 1"):
        fcs.clip4dm_relevance(model.params, pixels, ids, config=model.config, prefix_len=0)


# ----------------------------------------------------------------------------- words (official transcription)
def official_space_tokenize(text):
    tokens = []
    token = ""
    for char in text:
        if char == " ":
            if token:
                tokens.append(token)
                token = ""
        elif char in [".", ","]:
            if token:
                tokens.append(token)
                token = ""
            tokens.append(char)
        else:
            token += char
    if token:
        tokens.append(token)
    return tokens


def official_tokenizer2space(tokenizer, text):
    space_tokens = official_space_tokenize(text)
    encoded = tokenizer.encode(text)
    result = {}
    encoded_idx = 0
    for idx, token in enumerate(space_tokens):
        token_encoded = tokenizer.encode(token)
        result[idx] = encoded[encoded_idx: encoded_idx + len(token_encoded)]
        encoded_idx += len(token_encoded)
    return result


def official_word_scores(tokenizer, caption, r_row, template=TEMPLATE):
    """`CLIP4DM.__call__` up to `text_scores` (R row given): [(word, mean attribution)], prefix words dropped."""
    text = template + caption
    text_encoding = tokenizer(text)[0]
    cls_idx = int(text_encoding.argmax(dim=-1))
    text_scores = r_row[1:cls_idx]
    text_tokens = tokenizer.encode(text)
    decoded = [tokenizer.decode([a]) for a in text_tokens]
    negative_word = list(zip(decoded, text_scores))
    space_token = official_space_tokenize(text)
    bpe_token_idx = 0
    aggr_token = []
    for space_token_idx, bpe_token in official_tokenizer2space(tokenizer, text).items():
        bpe_token_score = [s for _, s in negative_word[bpe_token_idx: bpe_token_idx + len(bpe_token)]]
        bpe_token_idx += len(bpe_token)
        if bpe_token_score:  # the code's ZeroDivisionError branch skips the word
            aggr_token.append((space_token[space_token_idx], sum(bpe_token_score) / len(bpe_token_score)))
    return aggr_token[len(template.split()):]


def test_word_grouping_matches_official_on_real_captions():
    st = SimpleTokenizer()
    tok = Tokenizer.openai()
    words = fcs.caption_words(tok, CAPTIONS)
    ids = tok([TEMPLATE + c for c in CAPTIONS])
    rng = np.random.default_rng(0)
    r_rows = rng.standard_normal(ids.shape) * 1e-3
    assert fcs.prefix_length(tok) == fcs.PREFIX_TOKENS == 4
    with jax.enable_x64(True):
        tokens = np.where(words.word_index >= 0, r_rows, 0.0)
        scores, has = fcs.word_scores(jnp.asarray(tokens), jnp.asarray(words.word_index), words.word_mask.shape[1])
    scores = np.asarray(scores)
    np.testing.assert_array_equal(np.asarray(has), words.word_mask)
    for b, cap in enumerate(CAPTIONS):
        want = official_word_scores(st, cap, list(r_rows[b]))
        assert words.words[b] == [w for w, _ in want]
        np.testing.assert_allclose(scores[b, :len(want)], [s for _, s in want], rtol=0, atol=1e-12)
        assert words.punctuation[b, :len(want)].tolist() == [w in '.,!"?;:" ' or not w.strip() for w, _ in want]
    # "flag..." is one "..." token but three "." words: each "." takes one position, so the words after it are
    # shifted and "rocket!" is left without a token (the code's grouping, kept)
    assert words.words[1][-6:] == ["flag", ".", ".", ".", "near", "the"]
    assert len(words.words[4]) == 75 - 3  # 83 words; past the 75 content tokens the rest have none


def test_tokenizer_must_be_bpe(tmp_path):
    with pytest.raises(ValueError, match="needs a CLIP BPE tokenizer"):
        fcs.caption_words(object(), ["a cat"])


# ----------------------------------------------------------------------------- misaligned words, F-CLIPScore
def official_post(text_scores, sorted_by, threshold=-5e-5):
    """`CLIP4DM.__call__` from `text_scores` on: (negative_score, negative words)."""
    negative_score, negative_word = 0, []
    if sorted_by == "threshold":
        text_scores = [(w, s) for w, s in text_scores if w not in '.,!"?;:" ']
        text_scores = [(w, s) for w, s in text_scores if w.strip()]
        text_scores = list(enumerate(text_scores))
        text_scores = [(f"{i}_{w}", s) for i, (w, s) in text_scores if s < threshold]
        text_scores = sorted(text_scores, key=lambda e: e[1])
        if text_scores:
            negative_score = sum(s for _, s in text_scores)
        negative_word = [w.split("_", 1)[1] for w, _ in text_scores]
    else:
        sorted_text = sorted(text_scores, key=lambda e: e[1])
        negative_word, negative_score = [sorted_text[0][0]], sorted_text[0][1]
    return negative_score, negative_word


def test_misaligned_words_and_f_clipscore_match_official():
    rng = np.random.default_rng(7)
    vocab = ["a", "dog", ".", ",", "on", "the", "red", "!", "sofa", "?", "cat", "x"]
    batch, width = 64, 9
    lengths = rng.integers(1, width + 1, batch)
    words = [[vocab[i] for i in rng.integers(len(vocab), size=n)] for n in lengths]
    scores = rng.uniform(-3e-4, 2e-4, (batch, width))
    scores[rng.random((batch, width)) < 0.1] = -5e-5  # on the threshold: not below it
    mask = np.arange(width)[None] < lengths[:, None]
    punct = np.array([[j < len(w) and (w[j] in '.,!"?;:" ') for j in range(width)] for w in words])
    sims = rng.uniform(-0.3, 0.9, batch)
    for mode in fcs.MODES:
        with jax.enable_x64(True):
            neg, sel = fcs.misaligned_words(jnp.asarray(scores), jnp.asarray(mask), mode=mode,
                                            punctuation=jnp.asarray(punct))
            f = np.asarray(fcs.f_clipscore(neg, jnp.asarray(sims)))
        neg, sel = np.asarray(neg), np.asarray(sel)
        for b in range(batch):
            text_scores = list(zip(words[b], scores[b, :lengths[b]].tolist()))
            want_neg, want_words = official_post(text_scores, mode)
            pair_score = max(sims[b], 0) * 2.5
            assert neg[b] == pytest.approx(want_neg, abs=1e-15)
            assert f[b] == pytest.approx(want_neg * (1 - pair_score / 2.5), abs=1e-15)
            assert sorted(words[b][j] for j in np.flatnonzero(sel[b])) == sorted(want_words)
    with pytest.raises(ValueError, match="mode must be one of"):
        fcs.misaligned_words(jnp.zeros((1, 2)), jnp.ones((1, 2), bool), mode="max")


# ----------------------------------------------------------------------------- CLI
def test_cli_fclipscore(tmp_path, photos, capsys):
    from PIL import Image

    model_dir = tiny_checkpoint(str(tmp_path / "ckpt"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, im in (("0_astronaut.png", photos[0]), ("1_coffee.png", photos[2])):
        Image.fromarray(im).save(folder / name)
    caps = ["an astronaut, with a flag", "a cup of coke."]
    (tmp_path / "caps.txt").write_text("\n".join(caps) + "\n")
    model = clipjax.load(model_dir)
    pixels = model.preprocess([Image.open(folder / f).convert("RGB") for f in sorted(folder.iterdir())])
    img = np.asarray(model.encode_image(pixels), np.float64)
    txt = np.asarray(model.encode_text(model.tokenize([TEMPLATE + c for c in caps])), np.float64)
    clip_score = 2.5 * np.maximum(np.sum(img * txt, 1), 0)
    rel = fcs.clip4dm_relevance(model.params, pixels, model.tokenize([TEMPLATE + c for c in caps]),
                                config=model.config)
    words = fcs.caption_words(model.tokenizer, caps)
    scores = np.asarray(fcs.word_scores(rel.tokens, words.word_index, words.word_mask.shape[1])[0])
    for mode in fcs.MODES:
        out = tmp_path / f"{mode}.json"
        code = main(["score", "fclipscore", "--model", model_dir, "--images", str(folder), "--captions",
                     str(tmp_path / "caps.txt"), "--mode", mode, "--out", str(out), "--no-progress"])
        assert code == 0
        res = json.loads(out.read_text())
        assert json.loads(capsys.readouterr().out) == res
        assert res["mode"] == mode and res["num_images"] == 2 and res["precision"] == "float32"
        for b, row in enumerate(res["per_image"]):
            assert row["caption"] == caps[b]
            assert row["clip_score"] == pytest.approx(clip_score[b], rel=1e-5, abs=1e-6)
            assert [w for w, _ in row["word_attributions"]] == words.words[b]
            np.testing.assert_allclose([s for _, s in row["word_attributions"]], scores[b, :len(words.words[b])],
                                       rtol=1e-5, atol=1e-9)
            want_neg, want_words = official_post([tuple(e) for e in row["word_attributions"]], mode)
            assert row["negative_attribution"] == pytest.approx(want_neg, rel=1e-6, abs=1e-12)
            assert sorted(w for w, _ in row["misaligned_words"]) == sorted(want_words)
            assert [s for _, s in row["misaligned_words"]] == sorted(s for _, s in row["misaligned_words"])
            assert row["f_clipscore"] == pytest.approx(want_neg * (1 - row["clip_score"] / 2.5), rel=1e-5, abs=1e-12)
        assert res["f_clipscore"] == pytest.approx(np.mean([r["f_clipscore"] for r in res["per_image"]]))
    code = main(["score", "fclipscore", "--model", model_dir, "--images", str(folder), "--captions",
                 str(tmp_path / "caps.txt"), "--layers", "0"])
    assert code == 2 and "layers must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "fclipscore", "--model", model_dir, "--images", str(folder), "--captions",
              str(tmp_path / "caps.txt"), "--mode", "max"])
