"""CLIP4DM token attribution and F-CLIPScore (naver-ai/clip4dm: `src/clip4dm.py:CLIP4DM`, `main.py:calculate_metrics`).

CLIP4DM explains a caption's CLIP similarity with gradient x attention on the text tower:

- s = cos(image, "A photo depicts " + caption) (Hessel's CLIPScore prompt);
- R = (1/k) * sum over the last k = 3 text blocks of mean_heads(dS/dA (.) A) `[L, L]`, A the attention
  probabilities: no clamp, no rollout, no identity term (`get_attribution_map`). With fewer than k text
  blocks all of them are used (the code slices `attentions[-3:]` and divides by the slice length);
- token attributions r_i = R[eot, i] for the tokens between SOT and EOT;
- word attributions: the mean of a word's BPE-token attributions. Words come from `space_tokenize` (split at
  spaces; "." and "," are words of their own) and take, in order, as many token positions as
  `tokenizer.encode(word)` has tokens (`tokenizer2space`); a word left without any token (past the 77-token
  context) is dropped; then the prefix's words (`len(prefix.split())`) are dropped;
- misaligned words: `threshold` mode (main.py's default; forced for HAT, RichHF, SeeTrue) keeps the words
  with r < -5e-5 after removing punctuation words (a word that is a substring of '.,!"?;:" ', or blank) and
  neg = the sum of their r (0 when none); `most_negative` mode (the class default) takes the single word with
  the smallest r, punctuation included, and neg = that r;
- CLIPScore = 2.5 * max(s, 0) and F-CLIPScore = neg * (1 - CLIPScore / 2.5). Lower (more negative) means
  more misaligned.

The prefix and token indices: in OpenAI's BPE "A photo depicts " is the 3 tokens "a", "photo", "depicts", so
caption tokens start at position 4 (after SOT); `PREFIX_TOKENS = 4`. The prefix tokens take part in the forward
pass and the gradient; only their attributions are dropped (the code drops the prefix's 3 words after
grouping, which are exactly those 3 tokens). `prefix_length(tokenizer)` gives the count for another tokenizer.

Precision: the official code casts the HF `CLIPModel` to float16, so s, the attention maps, their gradients and
R are float16 (R accumulates in the attention dtype). float16's smallest normal number is 6.1e-5, so the
-5e-5 threshold lies in its subnormal range, where values are multiples of 6e-8. clipjax computes
everything here in float32 (whatever `config.dtype` says), so attributions near the threshold can fall on the
other side of it than in the official numbers. The official model is HF's `CLIPModel` with open_clip's
image transform; clipjax runs its own towers (the same function for converted weights).

Layout: array kernels (`relevance_map`, `clip4dm_relevance`, `word_scores`, `misaligned_words`, `f_clipscore`)
are pure and jittable; the word and string handling is `caption_words`, a host-side helper taking a
`clipjax.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import checks
from clipjax.config import CLIPConfig
from clipjax.interpret import explicit
from clipjax.metrics.clipscore import HESSEL_PREFIX, HESSEL_W, clipscore_prompts

__all__ = ["DEFAULT_THRESHOLD", "MODES", "PREFIX_TOKENS", "CaptionWords", "TokenRelevance", "caption_words",
           "clip4dm_relevance", "f_clipscore", "misaligned_words", "prefix_length", "relevance_map", "space_tokenize",
           "word_scores"]

DEFAULT_THRESHOLD = -5e-5  # main.py --epsilon
MODES = ("threshold", "most_negative")
PREFIX_TOKENS = 4  # SOT + "a", "photo", "depicts" (OpenAI BPE)
PUNCTUATION = '.,!"?;:" '  # threshold mode drops words that are substrings of this (`word not in ...`)


class TokenRelevance(NamedTuple):
    """`clip4dm_relevance`'s result.

    Attributes:
      tokens: `[B, L]` r_i = R[eot, i] at caption-token positions, 0 elsewhere.
      mask: `[B, L]` bool, True at caption-token positions (`prefix_len <= i < eot`).
      similarity: `[B]` cos(image, text) in [-1, 1].
    """

    tokens: jax.Array
    mask: jax.Array
    similarity: jax.Array


# ----------------------------------------------------------------------------- array kernels
def _check_inputs(pixels, ids):
    pixels = checks.array("pixels", pixels, "[B, H, W, C]")
    ids = checks.array("ids", ids, "[B, L]", dtype="integer")
    if pixels.shape[0] != ids.shape[0]:
        raise ValueError(f"pixels and ids must pair rows: pixels has shape {tuple(pixels.shape)}, ids has shape "
                         f"{tuple(ids.shape)}; each must be [B, ...] with the same B")
    return pixels, ids


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def relevance_map(params, pixels: jax.Array, ids: jax.Array, *, config: CLIPConfig,
                  layers: int = 3) -> tuple[jax.Array, jax.Array, jax.Array]:
    """CLIP4DM's text relevance map R, in float32.

    Args:
      params: the model state (`init_params`, a converted checkpoint's `params`).
      pixels: `[B, S, S, 3]` preprocessed (CLIP-normalised) NHWC pixels.
      ids: `[B, L]` int token ids of the prefixed captions (row b pairs with image b).
      config: the model config (static).
      layers: how many of the last text blocks to average (3 in CLIP4DM; all blocks if the tower has fewer).

    Returns:
      `(R [B, T, T], similarity [B], pool_index [B])`: R = (1/k) sum over the last k blocks of
      mean_heads(dS/dA (.) A) (queries x keys; T = L, or L + 1 with CoCa's class token), s = cos(image, text)
      and the position the text embedding is read from (EOT for CLIP).
    """
    pixels, ids = _check_inputs(pixels, ids)
    layers = checks.positive_int("layers", layers)
    f32 = config.replace(dtype="float32")
    from clipjax.models.clip import encode_image

    image = jax.lax.stop_gradient(encode_image(params, pixels, config=f32, normalize=True))
    n_layers = config.text.layers
    b, t = ids.shape[0], ids.shape[1] + int(bool(config.text.embed_cls))

    def total_similarity(multiplier):
        text, record = explicit.text_forward(params, ids, config=f32, attn_multiplier=multiplier, dtype="float32")
        sim = jnp.sum(image * checks.l2_normalize(text), axis=-1)
        return jnp.sum(sim), (sim, record["pool_index"])

    ones = jnp.ones((n_layers, b, config.text.heads, t, t), jnp.float32)
    grads, (sim, pool) = jax.grad(total_similarity, has_aux=True)(ones)  # dS/dm at m = 1 is dS/dA (.) A
    k = min(layers, n_layers)
    return grads[n_layers - k:].mean(axis=2).mean(axis=0), sim, pool


@functools.partial(jax.jit, static_argnames=("config", "layers", "prefix_len"))
def clip4dm_relevance(params, pixels: jax.Array, ids: jax.Array, *, config: CLIPConfig, layers: int = 3,
                      prefix_len: int = PREFIX_TOKENS) -> TokenRelevance:
    """CLIP4DM token attributions r_i = R[eot, i] of the caption tokens.

    Args:
      params: the model state.
      pixels: `[B, S, S, 3]` preprocessed NHWC pixels.
      ids: `[B, L]` ids of `prefix + caption` (`clipscore_prompts`, then the tokenizer).
      config: the model config (static).
      layers: the number of last text blocks averaged (3).
      prefix_len: leading positions that are not caption tokens: SOT plus the prefix's tokens
        (`PREFIX_TOKENS` = 4 for "A photo depicts " in OpenAI's BPE; 1 for unprefixed text).

    Returns:
      `TokenRelevance(tokens [B, L], mask [B, L], similarity [B])`, float32.
    """
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
        raise ValueError(f"prefix_len must be an int >= 1 (SOT plus the prefix tokens), got {prefix_len!r}")
    rmap, sim, pool = relevance_map(params, pixels, ids, config=config, layers=layers)
    b, length = ids.shape
    row = rmap[jnp.arange(b), pool, :length]
    pos = jnp.arange(length)[None, :]
    mask = (pos >= prefix_len) & (pos < pool[:, None])
    return TokenRelevance(jnp.where(mask, row, 0.0), mask, sim)


@functools.partial(jax.jit, static_argnames=("num_words",))
def word_scores(token_scores: jax.Array, word_index: jax.Array, num_words: int) -> tuple[jax.Array, jax.Array]:
    """Word attributions: the mean of each word's token attributions.

    Args:
      token_scores: `[B, L]` token attributions (`TokenRelevance.tokens`).
      word_index: `[B, L]` int, the word of each token position (`CaptionWords.word_index`), -1 for none.
      num_words: W, the number of word slots (static).

    Returns:
      `(scores [B, W], has_tokens [B, W] bool)`; a slot without tokens scores 0.
    """
    scores = checks.array("token_scores", token_scores, "[B, L]")
    index = checks.array("word_index", word_index, "[B, L]", dtype="integer")
    checks.same_shape("[B, L]", token_scores=scores, word_index=index)
    num_words = checks.positive_int("num_words", num_words)
    onehot = jax.nn.one_hot(index, num_words, dtype=scores.dtype)  # index -1 gives a zero row
    total = jnp.einsum("bl,blw->bw", scores, onehot)
    count = onehot.sum(axis=1)
    return total / jnp.maximum(count, 1.0), count > 0


@functools.partial(jax.jit, static_argnames=("mode",))
def misaligned_words(scores: jax.Array, word_mask: jax.Array, *, mode: str = "threshold",
                     threshold: float = DEFAULT_THRESHOLD,
                     punctuation: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """CLIP4DM's misaligned words and their attribution `neg`.

    Args:
      scores: `[B, W]` word attributions (`word_scores`).
      word_mask: `[B, W]` bool, True for real words.
      mode: `threshold` (words with score < `threshold`, punctuation words excluded; neg = their sum, 0 if
        none) or `most_negative` (the first word with the smallest score, punctuation included; neg = its
        score, 0 for a caption without words, where the official code fails).
      threshold: the `threshold` mode's cut-off (-5e-5).
      punctuation: optional `[B, W]` bool, the words `threshold` mode ignores (`CaptionWords.punctuation`).

    Returns:
      `(neg [B], selected [B, W] bool)`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scores = checks.array("scores", scores, "[B, W]")
    mask = jnp.asarray(word_mask, bool)
    checks.same_shape("[B, W]", scores=scores, word_mask=mask)
    if mode == "threshold":
        eligible = mask
        if punctuation is not None:
            punctuation = jnp.asarray(punctuation, bool)
            checks.same_shape("[B, W]", scores=scores, punctuation=punctuation)
            eligible = mask & ~punctuation
        selected = eligible & (scores < threshold)
        return jnp.sum(jnp.where(selected, scores, 0.0), axis=-1), selected
    masked = jnp.where(mask, scores, jnp.inf)
    first = jnp.argmin(masked, axis=-1)
    any_word = jnp.any(mask, axis=-1)
    selected = (jnp.arange(scores.shape[-1])[None, :] == first[:, None]) & any_word[:, None]
    return jnp.where(any_word, jnp.take_along_axis(scores, first[:, None], axis=-1)[:, 0], 0.0), selected


def f_clipscore(negative: jax.Array, similarity: jax.Array) -> jax.Array:
    """F-CLIPScore = neg * (1 - CLIPScore / 2.5), CLIPScore = 2.5 * max(s, 0) (`calculate_metrics`).

    Args:
      negative: `[B]` neg from `misaligned_words` (<= 0 in threshold mode).
      similarity: `[B]` s = cos(image, prefixed caption).

    Returns:
      `[B]` F-CLIPScore; 0 for a caption without misaligned words, more negative when more misaligned.
    """
    neg = checks.array("negative", negative, "[B]")
    sim = checks.array("similarity", similarity, "[B]")
    checks.same_shape("[B]", negative=neg, similarity=sim)
    clip = HESSEL_W * jnp.maximum(sim, 0.0)
    return neg * (1.0 - clip / HESSEL_W)


# ----------------------------------------------------------------------------- host-side words
def space_tokenize(text: str) -> list[str]:
    """clip4dm's `space_tokenize`: split at spaces; "." and "," are words of their own."""
    words, word = [], ""
    for char in text:
        if char == " ":
            if word:
                words.append(word)
                word = ""
        elif char in (".", ","):
            if word:
                words.append(word)
                word = ""
            words.append(char)
        else:
            word += char
    if word:
        words.append(word)
    return words


def prefix_length(tokenizer, prefix: str = HESSEL_PREFIX) -> int:
    """SOT plus the number of tokens of `prefix` (4 for "A photo depicts " in OpenAI's BPE)."""
    return 1 + len(tokenizer.encode(prefix)) if prefix.strip() else 1


@dataclasses.dataclass(frozen=True)
class CaptionWords:
    """Caption words and the token positions they own (host-side numpy).

    Attributes:
      words: per caption, its words (prefix words dropped), as `space_tokenize` writes them.
      word_index: `[B, L]` int32, the word (index into `words[b]`) of each token position, -1 for SOT, the
        prefix, EOT, padding and tokens left without a word.
      word_mask: `[B, W]` bool, True for the `len(words[b])` real words (W = the longest caption, >= 1).
      punctuation: `[B, W]` bool, the words `threshold` mode ignores.
    """

    words: list
    word_index: np.ndarray
    word_mask: np.ndarray
    punctuation: np.ndarray


def _caption_positions(tokenizer, text: str, eot: int) -> list[tuple[str, list[int]]]:
    """(word, token positions) of `text` as clip4dm's `tokenizer2space` + `__call__` pair them."""
    encoded = len(tokenizer.encode(text))
    available = min(encoded, eot - 1)  # zip(decoded tokens, R[eot, 1:eot]) stops at the shorter
    out, cursor = [], 0
    for word in space_tokenize(text):
        n = len(tokenizer.encode(word))
        taken = min(n, encoded - cursor)  # tokenizer2space slices `encoded`, short at its end
        positions = [1 + p for p in range(cursor, min(cursor + taken, available))]
        cursor += taken
        if positions:  # a word with no scored token is dropped (the code's ZeroDivisionError branch)
            out.append((word, positions))
    return out


def caption_words(tokenizer, captions: Sequence[str], *, prefix: str = HESSEL_PREFIX,
                  context_length: int | None = None) -> CaptionWords:
    """Group the token positions of `prefix + caption` into the caption's words, as CLIP4DM does.

    Args:
      tokenizer: a CLIP BPE `clipjax.tokenizer.Tokenizer` (the one that makes the ids).
      captions: `B` captions without the prefix.
      prefix: the prompt prefix ("A photo depicts "; a space is added if missing, as `clipscore_prompts`).
      context_length: row length of the ids (default: the tokenizer's).

    Returns:
      `CaptionWords`, aligned with `tokenizer(clipscore_prompts(captions, prefix), context_length)`.
    """
    if getattr(tokenizer, "kind", None) != "clip_bpe":
        raise ValueError("caption_words needs a CLIP BPE tokenizer (clip4dm's word grouping is BPE-specific), "
                         f"got {tokenizer!r}")
    texts = clipscore_prompts(list(captions), prefix)
    ids = np.asarray(tokenizer(texts, context_length))
    drop = len(prefix.split())
    grouped = []
    for text, row in zip(texts, ids):
        eot = int(np.argmax(row == tokenizer.eot_id)) if (row == tokenizer.eot_id).any() else row.shape[0] - 1
        grouped.append(_caption_positions(tokenizer, text, eot)[drop:])
    width = max(1, max(len(g) for g in grouped))
    index = np.full(ids.shape, -1, np.int32)
    mask = np.zeros((len(texts), width), bool)
    punct = np.zeros((len(texts), width), bool)
    for b, group in enumerate(grouped):
        for w, (word, positions) in enumerate(group):
            index[b, positions] = w
            mask[b, w] = True
            punct[b, w] = word in PUNCTUATION or not word.strip()
    return CaptionWords([[w for w, _ in g] for g in grouped], index, mask, punct)
