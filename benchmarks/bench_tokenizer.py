"""Texts per second: clipjax.tokenizer.Tokenizer vs open_clip's SimpleTokenizer on the same strings.

Usage: .venv/bin/python benchmarks/bench_tokenizer.py [--n 10000] [--repeats 3]
(Not named tokenize.py: run as a script, that name would shadow the stdlib `tokenize` module.)

The strings are deterministic captions (English words drawn with Zipf weights,
as in real captions, plus 10% with non-Latin scripts, emoji and HTML entities).
"cold" is the first call of a freshly built tokenizer (both keep a per-word
cache, so repeated words get cheaper), "warm" the best of `--repeats` further
calls on the same strings. Both outputs are checked equal before timing counts.
Prints a table and writes benchmarks/results/tokenize.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from importlib import metadata

import numpy as np

EXTRA = ["東京の夜景", "مرحبا بالعالم", "नमस्ते दुनिया", "привет мир", "γειά σου κόσμε", "😀👍🏽", "👨‍👩‍👧‍👦",
         "&amp;", "“quoted”", "ﬁne", "café", "2024"]


def make_texts(n: int, seed: int = 0) -> list[str]:
    from english_words import get_english_words_set

    rng = random.Random(seed)
    words = sorted(get_english_words_set(["gcide"], lower=True))
    rng.shuffle(words)
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf
    picks = np.random.default_rng(seed).choice(len(words), size=(n, 16), p=weights / weights.sum())
    texts = []
    for i in range(n):
        parts = ["a", "photo", "of"] + [words[j] for j in picks[i, :rng.randint(2, 16)]]
        if rng.random() < 0.1:
            parts.insert(rng.randint(0, len(parts)), rng.choice(EXTRA))
        texts.append(" ".join(parts))
    return texts


def _time(fn, texts, repeats):
    t0 = time.perf_counter()
    out = fn(texts)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(texts)
        warm.append(time.perf_counter() - t0)
    return np.asarray(out), cold, min(warm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tokenize.json"))
    args = parser.parse_args()

    from open_clip.tokenizer import SimpleTokenizer

    from clipjax.tokenizer import Tokenizer

    texts = make_texts(args.n)
    ours, ours_cold, ours_warm = _time(Tokenizer.openai(), texts, args.repeats)
    ref, ref_cold, ref_warm = _time(SimpleTokenizer(), texts, args.repeats)
    equal = bool(np.array_equal(ours, ref))
    rows = [("open_clip SimpleTokenizer", ref_cold, ref_warm), ("clipjax Tokenizer", ours_cold, ours_warm)]
    print(f"{args.n} texts, ids equal: {equal}")
    print(f"{'tokenizer':28s} {'cold texts/s':>14s} {'warm texts/s':>14s}")
    for name, cold, warm in rows:
        print(f"{name:28s} {args.n / cold:14,.0f} {args.n / warm:14,.0f}")
    print(f"{'speed-up (clipjax/open_clip)':28s} {ref_cold / ours_cold:14.2f}x {ref_warm / ours_warm:13.2f}x")

    versions = {p: metadata.version(p) for p in ("tokenizers", "open_clip_torch", "ftfy", "regex", "numpy")}
    result = {
        "benchmark": "tokenize", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load_average_1m": os.getloadavg()[0],
                    "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
        "versions": versions, "n_texts": args.n, "repeats": args.repeats, "ids_equal": equal,
        "results": [{"tokenizer": name, "cold_s": cold, "warm_s": warm, "cold_texts_per_s": args.n / cold,
                     "warm_texts_per_s": args.n / warm} for name, cold, warm in rows],
        "speedup_cold": ref_cold / ours_cold, "speedup_warm": ref_warm / ours_warm,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    if not equal:
        raise SystemExit("clipjax and open_clip ids differ")


if __name__ == "__main__":
    main()
