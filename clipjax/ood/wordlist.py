"""Word lists and prompts for NegLabel / AdaNeg negative labels, and class-name checks.

NegLabel mines its negatives from WordNet nouns and adjectives (about 70k + 20k).
No pip package here ships the WordNet database offline (`nltk` and `wn` download
it at run time), so the default list comes from the POS-tagged English lexicon
that `lemminflect` (pip, MIT) ships in `lemminflect/resources/infl_lu.csv.gz`,
derived from the NIH SPECIALIST Lexicon: every lemma tagged `noun` or `adj` that
is lower-case letters with optional inner hyphens, at least 2 characters (proper
nouns, which are capitalised, are dropped). That gives 19,130 nouns and 6,089
adjectives with lemminflect 0.2.3 (an adjective that is also a noun is kept once,
as a noun, like the reference's first-file-wins dedup). A user file can replace
it (`load_wordlist`).

Prompts follow NegLabel: nouns "the nice {}" (`prompt_templates[85]`, also used
for the ID labels) and adjectives "This is a {} photo".
"""

from __future__ import annotations

import gzip
import importlib.resources
import re
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["ADJECTIVE_TEMPLATE", "NOUN_TEMPLATE", "check_class_names", "default_wordlist", "load_wordlist",
           "negative_prompts"]

NOUN_TEMPLATE = "the nice {}"
ADJECTIVE_TEMPLATE = "This is a {} photo"

_WORD = re.compile(r"^[a-z](?:[a-z-]*[a-z])$")
_POS = {"noun": "noun", "n": "noun", "adj": "adj", "adjective": "adj", "a": "adj"}


def _dedup(words: Iterable[str], seen: set[str]) -> list[str]:
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def default_wordlist() -> tuple[list[str], list[str]]:
    """English nouns and adjectives from `lemminflect`'s lexicon (see the module docstring).

    Returns:
      `(nouns, adjectives)`, each deduplicated and in the lexicon's (alphabetical) order.

    Raises:
      ImportError: `lemminflect` is not installed (pass a word file to `load_wordlist` instead).
    """
    try:
        resource = importlib.resources.files("lemminflect") / "resources" / "infl_lu.csv.gz"
    except ModuleNotFoundError as err:
        raise ImportError("the default NegLabel word list needs `pip install lemminflect==0.2.3`; "
                          "or pass your own word file (clipjax.ood.load_wordlist)") from err
    nouns, adjectives = [], []
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            lemma, _, rest = line.partition(",")
            pos = rest.split(",", 1)[0].strip()
            if pos in ("noun", "adj") and _WORD.match(lemma):
                (nouns if pos == "noun" else adjectives).append(lemma)
    seen: set[str] = set()
    return _dedup(nouns, seen), _dedup(adjectives, seen)


def load_wordlist(path: str | Path) -> tuple[list[str], list[str]]:
    """Read a user word list: one word (or phrase) per line, optionally `<TAB>noun` or `<TAB>adj`.

    Lines without a part of speech count as nouns; blank lines and `#` comments are
    skipped; repeated words are kept once (first occurrence).

    Returns:
      `(nouns, adjectives)`.

    Raises:
      ValueError: the file holds no word, or an unknown part-of-speech tag.
    """
    nouns, adjectives = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        word, _, pos = line.partition("\t")
        tag = _POS.get(pos.strip().lower() or "noun")
        if tag is None:
            raise ValueError(f"{path}:{number}: unknown part of speech {pos.strip()!r}; use 'noun' or 'adj'")
        (nouns if tag == "noun" else adjectives).append(word.strip())
    seen: set[str] = set()
    nouns, adjectives = _dedup(nouns, seen), _dedup(adjectives, seen)
    if not nouns and not adjectives:
        raise ValueError(f"word list {path} holds no word")
    return nouns, adjectives


def check_class_names(names: Sequence[str]) -> list[str]:
    """Validate ID class names: a non-empty list of distinct, non-blank strings.

    Names are stripped; duplicates are detected case-insensitively ("Cat" and "cat").

    Raises:
      TypeError: a name is not a string.
      ValueError: empty list, blank name, or duplicates (all of them are listed).
    """
    if isinstance(names, str):
        raise TypeError("class names must be a list of strings, got a single string")
    names = list(names)
    if not names:
        raise ValueError("the list of ID class names is empty; at least one class is needed")
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"class name {i} is {type(n).__name__}, expected str")
        if not n.strip():
            raise ValueError(f"class name {i} is blank")
        out.append(n.strip())
    lowered = [n.lower() for n in out]
    dups = sorted({n for n in out if lowered.count(n.lower()) > 1})
    if dups:
        raise ValueError(f"duplicate ID class names: {dups}; each class must appear once")
    return out


def negative_prompts(nouns: Sequence[str], adjectives: Sequence[str] = (), *, exclude: Sequence[str] = (),
                     noun_template: str = NOUN_TEMPLATE,
                     adjective_template: str = ADJECTIVE_TEMPLATE) -> tuple[list[str], list[str]]:
    """Prompts for the candidate negative labels.

    Args:
      nouns, adjectives: candidate words (e.g. from `default_wordlist`).
      exclude: words to leave out, compared case-insensitively (for example the ID class names).
      noun_template, adjective_template: NegLabel's "the nice {}" and "This is a {} photo".

    Returns:
      `(noun_prompts, adjective_prompts)`; a word is used once (nouns first).

    Raises:
      ValueError: no candidate word is left.
    """
    seen = {w.strip().lower() for w in exclude}
    noun_words = _dedup((w.strip() for w in nouns if w.strip() and w.strip().lower() not in seen), seen)
    adj_words = _dedup((w.strip() for w in adjectives if w.strip() and w.strip().lower() not in seen), seen)
    if not noun_words and not adj_words:
        raise ValueError("no candidate negative word is left (empty word list, or every word excluded)")
    return [noun_template.format(w) for w in noun_words], [adjective_template.format(w) for w in adj_words]
