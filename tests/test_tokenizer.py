"""clipjax.tokenizer against open_clip's SimpleTokenizer / HFTokenizer and transformers' CLIPTokenizer.

Tolerance: none. Token ids are integers and every comparison is an exact
equality of full padded `[B, context_length]` arrays (or, for transformers, of
the unpadded rows, because transformers pads with 49407 where open_clip pads
with 0).
"""

import json
import random
import unicodedata

import numpy as np
import pytest

from clipjax.tokenizer import Tokenizer, basic_clean, clean_text

pytestmark = pytest.mark.parity

# ----------------------------------------------------------------------------- test strings

SCRIPTS = {  # name: (first, last) code point of a block to sample letters from
    "cjk": (0x4E00, 0x9FFF), "hiragana": (0x3041, 0x3096), "katakana": (0x30A1, 0x30FA),
    "hangul": (0xAC00, 0xD7A3), "arabic": (0x0621, 0x064A), "hebrew": (0x05D0, 0x05EA),
    "devanagari": (0x0900, 0x097F), "bengali": (0x0980, 0x09FF), "tamil": (0x0B80, 0x0BFF),
    "thai": (0x0E01, 0x0E5B), "cyrillic": (0x0400, 0x04FF), "greek": (0x0370, 0x03FF),
    "armenian": (0x0531, 0x0587), "georgian": (0x10A0, 0x10FF), "ethiopic": (0x1200, 0x137C),
    "latin_ext": (0x0100, 0x024F), "ipa": (0x0250, 0x02AF), "math_alnum": (0x1D400, 0x1D7FF),
    "fullwidth": (0xFF01, 0xFF5E), "combining": (0x0300, 0x036F), "cjk_ext_b": (0x20000, 0x2A6DF),
}
EMOJI = ["😀", "🐱", "🚀", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏿‍🔬", "🇯🇵", "🇺🇸", "1️⃣", "#️⃣", "🧑‍🤝‍🧑",
         "☃", "✈︎", "🫠", "🤌🏻", "👁‍🗨", "🐕‍🦺", "😶‍🌫️"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&#x27;", "&nbsp;", "&amp;amp;", "&amp;lt;b&amp;gt;",
            "&copy;", "&eacute;", "&#233;", "&#x1F600;", "&foo;", "&", "&&", "AT&T", "&#769;", "&hellip;"]
SPECIAL_TEXT = ["ﬁ", "ﬂ", "ﬀ", "ﬃ", "ﬄ", "ﬅ", "ﬆ", "“", "”", "‘", "’", "„", "«", "»", "—", "–", "…", "e\u0301",
                "cafÃ©", "naÃ¯ve", "Ã©tÃ©", "İ", "ß", "ẞ", "ΣΊΣΥΦΟΣ", "ſ", "'ſ", "µ", "Ω", "Å", "½", "²", "Ⅻ",
                "٣٤٥", "१२३", "\u00a0", "\u3000", "\u200b", "\u200d", "\ufeff", "\x00", "\x0b", "\x1b[31m", "\r\n",
                "\t", "<|endoftext|>", "<|startoftext|>", "<start_of_text>", "<END_OF_TEXT>", "x<end_of_text>y",
                "!!<start_of_text>", "<b>bold</b>", "it's", "IT'S", "we're", "they'VE", "I'm", "you'll", "he'd",
                "rock'n'roll", "’s", "3.14159", "1,000,000", "2024-11-23", "v2.0", "100%", "$5.99", "C++", "e-mail",
                "?!?!", "...", "---", "!!!", "@#$%^*()", "~~~", "https://example.com/a?b=c&d=e", "#hashtag", "@user"]


def _script_word(rng, lo, hi):
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))


def varied_strings(seed: int = 0) -> list[str]:
    """About 700 deterministic strings covering scripts, emoji, entities, quotes, long text and edge cases."""
    from english_words import get_english_words_set

    rng = random.Random(seed)
    words = sorted(get_english_words_set(["web2"], lower=False))
    out = ["", " ", "   ", "\t\n", "\u3000\u00a0", "a", "A", "a photo of a cat.", "A Photo Of A CAT!!",
           "<|endoftext|>", "<|startoftext|>", "<start_of_text>", "<end_of_text>", "<START_OF_TEXT> hello"]
    out += SPECIAL_TEXT + ENTITIES + EMOJI
    for name, (lo, hi) in SCRIPTS.items():  # 8 strings per script
        for _ in range(8):
            out.append(" ".join(_script_word(rng, lo, hi) for _ in range(rng.randint(1, 6))))
    pool = SPECIAL_TEXT + ENTITIES + EMOJI
    for _ in range(150):  # captions mixing English, case, punctuation, emoji and entities
        parts = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        for _ in range(rng.randint(0, 3)):
            parts.insert(rng.randint(0, len(parts)), rng.choice(pool))
        if rng.random() < 0.3:
            parts = [p.upper() if rng.random() < 0.5 else p for p in parts]
        out.append(rng.choice([" ", "  ", "\n", " \t"]).join(parts))
    for _ in range(100):  # random printable ASCII (the ftfy fast-path boundary: '&', '<', quotes)
        out.append("".join(chr(rng.randint(0x20, 0x7E)) for _ in range(rng.randint(1, 40))))
    for _ in range(40):  # random code points from everywhere in the BMP and plane 1
        out.append("".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x1FAFF)]))
                           for _ in range(rng.randint(1, 20))))
    for n in (74, 75, 76, 77, 78, 100, 250, 400):  # truncation around the 77 limit, and far beyond it
        out.append(" ".join(rng.choice(words).lower() for _ in range(n)))
    out += ["a" * 500, "1234567890" * 30, "😀" * 100, "東京" * 80, "!" * 300, "word " * 1000]
    return out


@pytest.fixture(scope="module")
def strings():
    return varied_strings()


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.openai()


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# ----------------------------------------------------------------------------- open_clip parity


def test_at_least_500_varied_strings(strings):
    assert len(strings) >= 500
    assert len(set(strings)) >= 500
    scripts = {unicodedata.name(c, "?").split()[0] for s in strings for c in s}
    assert {"CJK", "ARABIC", "DEVANAGARI", "CYRILLIC", "GREEK", "HANGUL", "THAI", "HEBREW"} <= scripts


def test_ids_equal_open_clip(ours, reference, strings):
    got = ours(strings)
    want = reference(strings).numpy()
    assert got.dtype == np.int32 and got.shape == (len(strings), 77)
    bad = [s for s, g, w in zip(strings, got, want) if not np.array_equal(g, w)]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"
    # The set really exercises truncation (EOT forced into the last column) and empty text.
    assert (got[:, 76] == ours.eot_id).sum() >= 10
    assert np.array_equal(got[strings.index("")], [ours.sot_id, ours.eot_id] + [0] * 75)


def test_open_clip_get_tokenizer_same(ours, strings):
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    np.testing.assert_array_equal(ours(strings[:200]), ref(strings[:200]).numpy())


@pytest.mark.parametrize("context_length", [2, 3, 16, 248])
def test_other_context_lengths(ours, reference, strings, context_length):
    got = ours(strings, context_length=context_length)
    np.testing.assert_array_equal(got, reference(strings, context_length=context_length).numpy())
    long = Tokenizer.openai(context_length=context_length)
    np.testing.assert_array_equal(long(strings[-20:]), got[-20:])


def test_single_string_and_batch_agree(ours, strings):
    batch = ours(strings[:50])
    for s, row in zip(strings[:50], batch):
        np.testing.assert_array_equal(ours(s), row[None])
    assert ours([]).shape == (0, 77)


def test_repeat_calls_use_memo_identically(reference, strings):
    tok = Tokenizer.openai()
    first = tok(strings)
    np.testing.assert_array_equal(tok(strings[::-1])[::-1], first)  # memo filled, different order
    np.testing.assert_array_equal(first, reference(strings).numpy())


def test_attributes(ours, reference):
    assert (ours.sot_id, ours.eot_id, ours.pad_id) == (reference.sot_token_id, reference.eot_token_id, 0)
    assert ours.vocab_size == reference.vocab_size == 49408
    assert ours.context_length == 77


def test_encode_matches_open_clip(ours, reference, strings):
    for s in strings[:300]:
        assert ours.encode(s) == reference.encode(s), s


def test_decode_matches_open_clip(ours, reference, strings):
    rows = ours(strings[:300])
    for row in rows:
        eot = int(np.argmax(row == ours.eot_id))
        assert ours.decode(row, skip_special_tokens=False) == reference.decode(row.tolist())
        assert ours.decode(row) == reference.decode(row[1:eot].tolist())


def test_ascii_fast_path_equals_ftfy():
    """Text skipping ftfy must be exactly what open_clip's basic_clean returns (all 128 ASCII chars)."""
    from open_clip.tokenizer import _clean_canonicalize, _clean_whitespace
    from open_clip.tokenizer import basic_clean as ref_basic_clean

    rng = random.Random(1)
    texts = ["".join(chr(rng.choice([rng.randint(0, 127), rng.randint(0x20, 0x7E)])) for _ in range(rng.randint(0, 30)))
             for _ in range(3000)]
    for t in texts:
        assert basic_clean(t) == ref_basic_clean(t), repr(t)
    for t in texts[:300]:
        assert clean_text(t, "whitespace") == _clean_whitespace(t)
        assert clean_text(t, "canonicalize") == _clean_canonicalize(t)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clean_modes(strings, clean):
    from open_clip.tokenizer import SimpleTokenizer

    np.testing.assert_array_equal(Tokenizer.openai(clean=clean)(strings),
                                  SimpleTokenizer(clean=clean)(strings).numpy())


def test_from_bpe_gz_is_open_clips_file(strings):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    np.testing.assert_array_equal(Tokenizer.from_bpe_gz(default_bpe())(strings[:100]),
                                  SimpleTokenizer(default_bpe())(strings[:100]).numpy())


# ----------------------------------------------------------------------------- save / HF folders


def _hf_agrees_on_words(hf, reference, cleaned: str) -> bool:
    """True when transformers' own normaliser and word split leave open_clip's words unchanged.

    transformers' CLIP pipeline re-normalises (NFC: `html.unescape` can leave
    decomposed text after ftfy's NFC) and splits words with its Rust (Onig) regex,
    whose Unicode tables are older than the `regex` module's: exhaustively, 1,519
    code points (1,518 assigned in recent Unicode versions, plus U+0345) split
    differently, which is why clipjax splits words with open_clip's own `regex`
    pattern in Python. It also keeps `<|endoftext|>` whole and matches `'s`
    case-sensitively (open_clip's IGNORECASE also takes `'ſ`). Where the words
    agree, the saved vocab.json/merges.txt must give identical ids. open_clip's pattern
    (`reference.pat`) and byte table (`bytes_to_unicode`) define the words, not clipjax's.
    """
    from open_clip.tokenizer import bytes_to_unicode

    backend = hf.backend_tokenizer
    if backend.normalizer.normalize_str(cleaned) != cleaned:
        return False
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    words = [bytes(to_byte[c] for c in w).decode("utf-8", "replace") for w, _ in
             backend.pre_tokenizer.pre_tokenize_str(cleaned)]
    return words == reference.pat.findall(cleaned) and "<start_of_text>" not in cleaned \
        and "<end_of_text>" not in cleaned


def test_save_loads_in_transformers_clip_tokenizer(ours, reference, strings, tmp_path):
    import transformers

    ours.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert len(hf) == 49408 and (hf.bos_token_id, hf.eos_token_id) == (ours.sot_id, ours.eot_id)
    cleaned = [clean_text(s) for s in strings]
    comparable = [c for c in cleaned if _hf_agrees_on_words(hf, reference, c)]
    assert len(comparable) >= 450, len(comparable)
    want = hf(comparable, max_length=77, truncation=True, split_special_tokens=True).input_ids
    got = ours(comparable)
    for c, g, w in zip(comparable, got, want):
        assert g[:len(w)].tolist() == w and not g[len(w):].any(), c
    # The other way round: a folder transformers writes loads here with the same ids.
    hf.save_pretrained(tmp_path / "from_hf")
    back = Tokenizer.from_folder(tmp_path / "from_hf")
    assert back.context_length == 77 and back.kind == "clip_bpe"
    np.testing.assert_array_equal(back(strings), ours(strings))
    # Long text: both put EOT in the last of the 248 columns.
    long = [c for c in comparable if len(ours.encode(c)) > 250]
    assert len(long) >= 3
    want = hf(long, max_length=248, truncation=True, split_special_tokens=True).input_ids
    np.testing.assert_array_equal(ours(long, context_length=248), np.array(want))


def test_word_split_is_open_clips_for_every_code_point(reference):
    """clipjax's split equals open_clip's compiled pattern on all code points up to plane 2."""
    from clipjax.tokenizer import split_words

    for start in range(0, 0x30000, 4096):
        text = "a" + " x".join(chr(c) for c in range(start, start + 4096) if not 0xD800 <= c < 0xE000) + "'S"
        assert split_words(text) == reference.pat.findall(text)


def test_ascii_word_split_equals_open_clip_pattern(reference):
    """ASCII-only text takes a stdlib-`re` pattern: it must split exactly like open_clip's."""
    from clipjax.tokenizer import split_words

    rng = random.Random(2)
    alphabet = [chr(i) for i in range(128)] + ["'s", "'S", "'re", "'RE", "'Ll", "'d", "<start_of_text>",
                                               "<END_of_text>", "'"] * 8
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(5000)]
    texts += [f"a{c}b {c}{c}1{c}" for c in map(chr, range(128))]
    for t in texts:
        assert t.isascii() and split_words(t) == reference.pat.findall(t), repr(t)


def test_save_roundtrip_and_config(ours, strings, tmp_path):
    short = Tokenizer.openai(context_length=32)
    short.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["context_length"] == 32 and cfg["clean"] == "lower"
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.context_length == 32 and loaded.kind == "clip_bpe"
    np.testing.assert_array_equal(loaded(strings), short(strings))
    np.testing.assert_array_equal(Tokenizer.from_folder(tmp_path, context_length=77)(strings), ours(strings))


def _write_sentencepiece_like(folder):
    """A tiny T5/SigLIP-style Unigram tokenizer.json (Metaspace, `$A </s>`), built offline."""
    from english_words import get_english_words_set
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    common = sorted(get_english_words_set(["gcide"], lower=True), key=lambda w: (len(w), w))[:3000]
    chars = sorted({c for w in common for c in w} | set("0123456789.,!?'-") | set("东京é"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -8.0) for c in chars] + [("▁" + w, -3.0 - len(w) / 4) for w in common]
    pieces += [(w[:3], -6.0) for w in common if len(w) > 4][:500]
    seen, unique = set(), []
    for p, s in pieces:
        if p not in seen:
            seen.add(p)
            unique.append((p, s))
    tok = HFTokenizer(models.Unigram(unique, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "</s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 64}))
    return folder


@pytest.mark.parametrize("context_length", [64, 8])
def test_generic_tokenizer_json_matches_open_clip_hf_tokenizer(strings, tmp_path, context_length):
    """SigLIP route: open_clip's HFTokenizer(clean='canonicalize') over the same tokenizer.json."""
    from open_clip.tokenizer import HFTokenizer

    folder = _write_sentencepiece_like(tmp_path / "sig")
    ref = HFTokenizer(str(folder), context_length=context_length, clean="canonicalize")
    ours = Tokenizer.from_folder(folder, context_length=context_length)
    assert ours.kind == "hf" and ours.pad_id == 1 and ours.eot_id == 1 and ours.clean == "canonicalize"
    got = ours(strings)
    np.testing.assert_array_equal(got, ref(strings).numpy())
    assert got.shape == (len(strings), context_length) and (got[:, -1] == 1).all()


def test_generic_save_roundtrip(strings, tmp_path):
    src = Tokenizer.from_folder(_write_sentencepiece_like(tmp_path / "a"))
    src.save(tmp_path / "b")
    np.testing.assert_array_equal(Tokenizer.from_folder(tmp_path / "b")(strings), src(strings))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("texts, kind", [(None, TypeError), (b"bytes", TypeError), (123, TypeError),
                                         (["ok", None], TypeError), (["ok", 5], TypeError)])
def test_bad_texts(ours, texts, kind):
    with pytest.raises(kind, match="str"):
        ours(texts)


@pytest.mark.parametrize("n", [0, 1, -5, 2.5, "77", True])
def test_bad_context_length(ours, n):
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        ours("hi", context_length=n)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer.openai(context_length=n)


def test_bad_encode_input(ours):
    with pytest.raises(TypeError, match="text must be a str"):
        ours.encode(["a", "b"])


def test_bad_clean_and_folders(tmp_path):
    with pytest.raises(ValueError, match="clean="):
        Tokenizer.openai(clean="upper")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.openai().decode([49408])
