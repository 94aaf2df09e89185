"""CLIP text tokenizer with open_clip's exact semantics, batched on HF `tokenizers`.

Two kinds of tokenizer share one `Tokenizer` class:

* **CLIP BPE** (OpenAI's 49,408-token byte-level BPE). Text is cleaned in
  Python exactly as open_clip's `SimpleTokenizer` does (ftfy `fix_text`,
  `html.unescape` twice, whitespace collapse, lower-case; pure-ASCII text without
  `&` skips ftfy, which provably leaves it unchanged) and split into words with
  open_clip's own regex and flags in Python. The split is not left to
  `tokenizers`' Rust regex: its Unicode tables are older than the `regex`
  module's and 1,519 code points would split differently. Words not seen
  before are byte-encoded and merged by a `tokenizers.models.BPE` (Rust, `</w>`
  end-of-word suffix) in one `encode_batch_fast` call per batch; the ids of
  words already seen come from a memo (as open_clip's own cache). Rows are
  `[SOT, tokens..., EOT, 0, 0, ...]`; a text that does not fit keeps its first
  `context_length - 2` tokens and EOT sits at the last position.
* **Generic HF tokenizer** (a `tokenizer.json`, e.g. SigLIP's SentencePiece
  vocabularies). This follows open_clip's `HFTokenizer`: clean the text (default
  `canonicalize`, as open_clip's SigLIP configs ask), then encode with the
  file's own post-processor (SigLIP appends `</s>`), truncate to
  `context_length` keeping the special tokens (`truncation=True`) and pad on the
  right with the pad token to exactly `context_length`
  (`padding="max_length"`), which is what `transformers` does for those calls.

The literal `<start_of_text>` / `<end_of_text>` (after lower-casing) map to
SOT/EOT as in open_clip 3.x, whose special-token names these are; OpenAI's
`<|startoftext|>` written in text is ordinary text there and here.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re as _re
import string
from typing import Iterable

import ftfy
import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
SOT_TOKEN = "<|startoftext|>"  # HF / OpenAI name of id 49406
EOT_TOKEN = "<|endoftext|>"  # HF / OpenAI name of id 49407
_OPEN_CLIP_SPECIALS = {"<start_of_text>": SOT_TOKEN, "<end_of_text>": EOT_TOKEN}
_MEMO_SIZE = 500_000  # distinct words whose ids are remembered (roughly 100 MB when full)
_NUM_MERGES = 49152 - 256 - 2  # merges used from OpenAI's bpe_simple_vocab_16e6.txt.gz
_ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz")

# open_clip's word split: its two special tokens first, then English contractions,
# letter runs, single digits and runs of everything else but whitespace.
_WORD_PATTERN = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# The same split for ASCII-only text with the faster stdlib engine: on ASCII, \p{L} is
# [a-z] (case-insensitive), \p{N} is [0-9] and the `regex` module's \s is [\t-\r ]
# (the stdlib's \s would also take \x1c-\x1f).
_ASCII_WORD_PATTERN = _re.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t-\r a-z0-9]+", _re.IGNORECASE)
# Text made only of these characters passes ftfy.fix_text and html.unescape
# unchanged (no '&', no control or non-ASCII characters), so they can be skipped.
_NEEDS_FTFY = _re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# ----------------------------------------------------------------------------- cleaning


def basic_clean(text: str) -> str:
    """ftfy `fix_text`, `html.unescape` twice, strip (open_clip's `basic_clean`)."""
    if _NEEDS_FTFY.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace (`str.split` rules) to one space."""
    return " ".join(text.split())


def canonicalize_text(text: str) -> str:
    """big_vision's canonicalisation: `_` to space, drop ASCII punctuation, lower-case."""
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


def clean_text(text: str, mode: str = "lower") -> str:
    """Clean one string the way open_clip's `get_clean_fn(mode)` does.

    Args:
      text: raw text.
      mode: `lower` (SimpleTokenizer default), `whitespace` (HFTokenizer default)
        or `canonicalize` (SigLIP configs).

    Returns:
      The cleaned string.
    """
    if mode == "lower":
        return whitespace_clean(basic_clean(text)).lower()
    if mode == "whitespace":
        return whitespace_clean(basic_clean(text))
    if mode == "canonicalize":
        return canonicalize_text(basic_clean(text))
    raise ValueError(f"clean={mode!r} is not supported; expected one of {CLEAN_MODES}")


def split_words(cleaned: str) -> list[str]:
    """open_clip's word split of cleaned text (its `SimpleTokenizer.pat`)."""
    return (_ASCII_WORD_PATTERN if cleaned.isascii() else _WORD_PATTERN).findall(cleaned)


# ----------------------------------------------------------------------------- BPE files


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order,
    to code points 256, 257, ... so no byte becomes whitespace or a control. The
    dict lists the printable bytes first: ids 0..255 of the vocabulary follow it.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    # Insertion order matters: the vocabulary lists the kept bytes first.
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + k) for k, b in enumerate(moved)}}


def read_bpe_gz(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Read OpenAI's `bpe_simple_vocab_16e6.txt.gz` into (tokens by id, merges).

    The vocabulary is the 256 byte characters, the same with `</w>`, one token
    per merge (48,894 of them) and SOT/EOT: 49,408 tokens.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not a CLIP BPE merges file: expected {_NUM_MERGES} merge pairs after the header")
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return tokens, merges


def _read_hf_bpe_folder(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"{path}/vocab.json: ids must be 0..{len(by_id) - 1} without gaps")
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln and not ln.startswith("#version")]
    merges = [tuple(ln.split(" ")) for ln in lines]
    bad = [ln for ln, m in zip(lines, merges) if len(m) != 2]
    if bad:
        raise ValueError(f"{path}/merges.txt: every line must be two tokens separated by one space, got {bad[0]!r}")
    tokens = [t for t, _ in by_id]
    return [_OPEN_CLIP_SPECIALS.get(t, t) for t in tokens], merges


def _read_tokenizer_json_bpe(path: str) -> tuple[list[str], list[tuple[str, str]]] | None:
    """(tokens by id, merges) of a `tokenizer.json` whose model is a `</w>` BPE, else None."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        return None
    with open(file, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        return None
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        return None
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return [_OPEN_CLIP_SPECIALS.get(t, t) for t, _ in by_id], merges


def _read_tokenizer_config(path: str) -> dict:
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(cfg_path):
        return {}
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


# ----------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """Text to `[B, context_length]` int32 token ids; build with a classmethod.

    Attributes:
      context_length: default row length (77 for CLIP).
      sot_id, eot_id, pad_id: start, end and padding ids (CLIP: 49406, 49407, 0).
        A generic tokenizer reads them from `tokenizer_config.json` (`bos_token`,
        `eos_token`, `pad_token`); an id it does not name is None (pad: 0).
      vocab_size: number of ids.
      clean: the cleaning mode, see `clean_text`.
      kind: `"clip_bpe"` or `"hf"`.
    """

    def __init__(self, backend, *, kind: str, context_length: int, sot_id: int | None, eot_id: int | None, pad_id: int,
                 clean: str, bpe: tuple[list[str], list[tuple[str, str]]] | None = None):
        """Use `Tokenizer.openai`, `from_bpe_gz` or `from_folder` instead."""
        if clean not in CLEAN_MODES:
            raise ValueError(f"clean={clean!r} is not supported; expected one of {CLEAN_MODES}")
        self._backend = backend
        self.kind = kind
        self.context_length = _check_context_length(context_length)
        self.sot_id, self.eot_id, self.pad_id = sot_id, eot_id, pad_id
        self.clean = clean
        self._bpe = bpe
        self._hf_by_length: dict[int, object] = {}
        self._memo: dict[str, list[int]] = {}
        if bpe is not None:
            self._id_to_token = bpe[0]
            self._byte_decoder = {c: b for b, c in byte_to_unicode().items()}

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def openai(cls, context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower") -> "Tokenizer":
        """OpenAI's CLIP BPE (the vocabulary shipped in `clipjax/assets`)."""
        return cls.from_bpe_gz(_ASSET, context_length=context_length, clean=clean)

    @classmethod
    def from_bpe_gz(cls, path: str, context_length: int = DEFAULT_CONTEXT_LENGTH, clean: str = "lower") -> "Tokenizer":
        """CLIP BPE from an OpenAI-format `bpe_simple_vocab_16e6.txt.gz` file."""
        tokens, merges = _cached_bpe_gz(os.path.abspath(path))
        return cls._clip_bpe(list(tokens), list(merges), context_length, clean)

    @classmethod
    def from_folder(cls, path: str, context_length: int | None = None, clean: str | None = None) -> "Tokenizer":
        """Load a tokenizer folder.

        CLIP's `</w>` BPE with `<|startoftext|>`/`<|endoftext|>`, as `vocab.json` +
        `merges.txt` (an HF CLIP repo, or a folder written by `save`) or inside a
        `tokenizer.json` (what transformers 5 saves), gives the CLIP BPE tokenizer
        with open_clip's semantics. Otherwise a `tokenizer.json` gives a generic HF tokenizer
        (SigLIP): padding token from `tokenizer_config.json` (`pad_token`), else
        the file's padding settings, else id 0.

        Args:
          path: the folder.
          context_length: row length; default: `tokenizer_config.json`'s
            `context_length`, then its `model_max_length` (if below 100,000),
            then 77 (CLIP BPE) or 64 (generic, SigLIP's length).
          clean: cleaning mode; default: `tokenizer_config.json`'s `clean`, else
            `lower` (CLIP BPE) or `canonicalize` (generic, as open_clip's SigLIP).
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
        cfg = _read_tokenizer_config(path)
        if all(os.path.exists(os.path.join(path, f)) for f in ("vocab.json", "merges.txt")):
            tokens, merges = _read_hf_bpe_folder(path)
        else:  # transformers >= 5 saves CLIP's BPE inside tokenizer.json only
            tokens, merges = _read_tokenizer_json_bpe(path) or ([], [])
        is_clip = SOT_TOKEN in tokens and EOT_TOKEN in tokens and any(t.endswith("</w>") for t in tokens[:600])
        if context_length is None:
            max_len = cfg.get("model_max_length")
            context_length = cfg.get("context_length") or (max_len if isinstance(max_len, int) and max_len < 100_000
                                                           else None)
        if is_clip:
            return cls._clip_bpe(tokens, merges, context_length or DEFAULT_CONTEXT_LENGTH, clean or cfg.get("clean")
                                 or "lower")
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return cls._generic(path, cfg, context_length or 64, clean or cfg.get("clean") or "canonicalize")
        raise FileNotFoundError(
            f"{path!r} holds neither a CLIP BPE vocabulary (vocab.json + merges.txt or tokenizer.json with "
            "<|startoftext|>, <|endoftext|> and </w> tokens) nor another tokenizer.json")

    @classmethod
    def _clip_bpe(cls, tokens, merges, context_length, clean) -> "Tokenizer":
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ValueError("the BPE vocabulary has duplicate tokens")
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                                         continuing_subword_prefix="", fuse_unk=False))
        # Words arrive pre-split; ByteLevel without its own regex only maps bytes to characters.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # A literal special-token word (see _OPEN_CLIP_SPECIALS) must become its id in one piece.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT_TOKEN, EOT_TOKEN)])
        return cls(backend, kind="clip_bpe", context_length=context_length, sot_id=vocab[SOT_TOKEN],
                   eot_id=vocab[EOT_TOKEN], pad_id=0, clean=clean, bpe=(tokens, merges))

    @classmethod
    def _generic(cls, path, cfg, context_length, clean) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        backend = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        pad_token = _token_content(cfg.get("pad_token"))
        if pad_token is not None:
            pad_id = backend.token_to_id(pad_token)
            if pad_id is None:
                raise ValueError(f"{path}: pad_token {pad_token!r} of tokenizer_config.json is not in the vocabulary")
        elif backend.padding is not None:
            pad_id = backend.padding["pad_id"]
        else:
            pad_id = 0
        eos = _token_content(cfg.get("eos_token"))
        eot_id = backend.token_to_id(eos) if eos is not None else None
        bos = _token_content(cfg.get("bos_token"))
        sot_id = backend.token_to_id(bos) if bos is not None else None
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, kind="hf", context_length=context_length, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id,
                   clean=clean)

    # -- properties ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408 for CLIP)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"clean={self.clean!r})")

    # -- encoding -----------------------------------------------------------------------

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None) -> np.ndarray:
        """Tokenize a string or a batch of strings.

        Args:
          texts: one `str` or a sequence of `B` strings.
          context_length: row length for this call (default `self.context_length`).

        Returns:
          `[B, context_length]` int32 ids (`B = 1` for a single string, `B = 0`
          for an empty list).

        Raises:
          TypeError: `texts` or one of its items is not a string.
          ValueError: `context_length` is not an int >= 2.
        """
        texts = _as_text_list(texts)
        length = self.context_length if context_length is None else _check_context_length(context_length)
        cleaned = [clean_text(t, self.clean) for t in texts]
        if self.kind == "hf":
            return self._encode_hf(cleaned, length)
        words = [split_words(t) for t in cleaned]
        ids_of = self._word_ids(words)
        keep = length - 2
        rows = [[i for w in ws for i in ids_of[w]][:keep] for ws in words]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        out[:, 0] = self.sot_id
        # Scatter all rows at once: row b's ids go to columns 1..lengths[b], EOT right after.
        row_idx = np.repeat(np.arange(len(rows)), lengths)
        col_idx = np.arange(row_idx.size) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
        out[row_idx, col_idx] = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=row_idx.size)
        out[np.arange(len(rows)), lengths + 1] = self.eot_id
        return out

    def _word_ids(self, words: list[list[str]]) -> dict[str, list[int]]:
        """BPE ids of every word, from a memo; new words go through one Rust `encode_batch_fast`.

        The memo only saves repeated work (HF's per-word overhead is ~2 us even on
        its own cache hits); it never changes a result.
        """
        memo = self._memo
        missing = list({w for ws in words for w in ws if w not in memo})
        if missing:
            if len(memo) + len(missing) > _MEMO_SIZE:
                memo.clear()
            pieces = [[_OPEN_CLIP_SPECIALS.get(w, w)] for w in missing]
            encodings = self._backend.encode_batch_fast(pieces, is_pretokenized=True, add_special_tokens=False)
            memo.update(zip(missing, (e.ids for e in encodings)))
        return memo

    def _encode_hf(self, cleaned: list[str], length: int) -> np.ndarray:
        backend = self._hf_by_length.get(length)
        if backend is None:
            from tokenizers import Tokenizer as HFTokenizer

            backend = HFTokenizer.from_str(self._backend.to_str())
            backend.enable_truncation(max_length=length)
            pad_token = self._backend.id_to_token(self.pad_id) or ""
            backend.enable_padding(pad_id=self.pad_id, pad_token=pad_token, length=length)
            self._hf_by_length[length] = backend
        encodings = backend.encode_batch(cleaned, add_special_tokens=True)
        return np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(cleaned), length)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (cleaned and split as in `__call__`), without SOT/EOT, padding or truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        cleaned = clean_text(text, self.clean)
        if self.kind == "hf":
            return self._backend.encode(cleaned, add_special_tokens=False).ids
        words = [_OPEN_CLIP_SPECIALS.get(w, w) for w in split_words(cleaned)]
        return self._backend.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids back to text.

        For CLIP BPE with `skip_special_tokens=False` this is open_clip's
        `SimpleTokenizer.decode` (every id, `</w>` becomes a space, SOT/EOT print as
        `<start_of_text>`/`<end_of_text>`). With `True` (default) it drops a
        leading SOT and cuts at the first EOT, so padding is dropped too.

        Args:
          ids: `[T]` ints (list or array).
          skip_special_tokens: drop the leading SOT and everything from the first EOT.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        bad = [i for i in ids if not 0 <= i < len(self._id_to_token)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {len(self._id_to_token)})")
        if skip_special_tokens:
            ids = ids[1:] if ids[:1] == [self.sot_id] else ids
            ids = ids[:ids.index(self.eot_id)] if self.eot_id in ids else ids
        names = {self.sot_id: "<start_of_text>", self.eot_id: "<end_of_text>"}
        text = "".join(names.get(i, self._id_to_token[i]) for i in ids)
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    # -- saving -------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Write `vocab.json`, `merges.txt` and `tokenizer_config.json` (CLIP BPE).

        `transformers.CLIPTokenizer.from_pretrained(folder)` loads the folder;
        note that transformers pads with `<|endoftext|>` (49407) where clipjax and
        open_clip pad with 0. A generic tokenizer writes its `tokenizer.json`.
        """
        os.makedirs(folder, exist_ok=True)
        cfg = {"context_length": self.context_length, "clean": self.clean, "model_max_length": self.context_length}
        if self.kind == "hf":
            self._backend.save(os.path.join(folder, "tokenizer.json"))
            cfg["pad_token"] = self._backend.id_to_token(self.pad_id)
            if self.eot_id is not None:
                cfg["eos_token"] = self._backend.id_to_token(self.eot_id)
        else:
            tokens, merges = self._bpe
            with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
                json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
            with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
            cfg.update(tokenizer_class="CLIPTokenizer", bos_token=SOT_TOKEN, eos_token=EOT_TOKEN,
                       unk_token=EOT_TOKEN, pad_token=EOT_TOKEN, do_lower_case=True)
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)


@functools.lru_cache(maxsize=4)
def _cached_bpe_gz(path: str):
    tokens, merges = read_bpe_gz(path)
    return tuple(tokens), tuple(merges)


def _check_context_length(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for SOT and EOT), got {n!r}")
    return int(n)


def _as_text_list(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}: {t!r:.60}")
    return texts
