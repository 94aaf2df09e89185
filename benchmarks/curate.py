"""Captions per second on one core: MetaCLIP substring matching with clipjax's Aho-Corasick automaton
(`clipjax.data.curate.match`, pyahocorasick) against the plain loop over entries of MetaCLIP 1
(`metaclip/metaclip1/substr_matching.py` before its automaton: `[i for i, e in enumerate(spaced_entries)
if e in spacing(text)]`).

Usage: .venv/bin/python benchmarks/curate.py [--entries 10000,100000] [--rounds 5] [--captions 20000]
                                             [--loop-checks 2e7] [--out FILE]

Entries: English words and phrases (english_words' web2 + gcide lists, case kept, multi-word and
punctuated entries included), shuffled with a fixed seed; the first N are the metadata. Captions:
"a photo of" plus 2-15 words drawn with Zipf weights from the same lists, with some punctuation and
capitals (deterministic). Both matchers run in this one process (one core). The plain loop costs
time proportional to the number of entries, so it runs on fewer captions per round
(`--loop-checks / entries`, at least 20); rates are per caption, so they compare. Each round times
A (automaton, `--captions` captions) then B (plain loop), A B A B ...; the speed-up is the median of
the per-round ratios rate_A / rate_B with [min, max]. Outputs are checked equal on the loop's captions
before timing counts. Automaton build time is reported separately (it is paid once per process).
Prints a table and writes benchmarks/results/curate-<date>.json with `common.machine_info`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time

import numpy as np
from common import machine_info

from clipjax.data.curate import build_matcher, match, spacing

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ATTACH = [",", ".", "!", "?", ";", ":", "'s", "-"]


def entry_pool(seed: int = 0) -> list[str]:
    from english_words import get_english_words_set

    words = sorted(w for w in get_english_words_set(["web2", "gcide"], alpha=False, lower=False)
                   if w.strip() and "\n" not in w)
    random.Random(seed).shuffle(words)
    return words


def make_captions(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf over the shuffled list
    picks = np.random.default_rng(seed).choice(len(words), size=(n, 15), p=weights / weights.sum())
    captions = []
    for i in range(n):
        parts = ["a", "photo", "of"]
        for j in picks[i, :rng.randint(2, 15)]:
            w = words[j]
            r = rng.random()
            w = w.capitalize() if r < 0.1 else w.lower() if r < 0.5 else w
            parts.append(w + rng.choice(ATTACH) if rng.random() < 0.15 else w)
        captions.append(" ".join(parts))
    return captions


def plain_loop(spaced_entries: list[str], caption: str) -> list[int]:
    """MetaCLIP 1's substring matching: every spaced entry tested against the spaced caption."""
    text = spacing(caption)
    return [i for i, e in enumerate(spaced_entries) if e in text]


def time_rate(fn, captions) -> float:
    t0 = time.perf_counter()
    for c in captions:
        fn(c)
    return len(captions) / (time.perf_counter() - t0)


def bench(entries: list[str], captions: list[str], loop_captions: list[str], rounds: int) -> dict:
    t0 = time.perf_counter()
    matcher = build_matcher(entries)
    build_s = time.perf_counter() - t0
    spaced = [f" {e} " for e in entries]
    automaton = [match(matcher, c) for c in loop_captions]
    loop = [plain_loop(spaced, c) for c in loop_captions]
    if automaton != loop:
        raise SystemExit(f"automaton and plain loop disagree at {len(entries)} entries")
    matches = [len(m) for m in (match(matcher, c) for c in captions)]
    rate_a, rate_b = [], []
    for _ in range(rounds):  # A B A B ...
        rate_a.append(time_rate(lambda c: match(matcher, c), captions))
        rate_b.append(time_rate(lambda c: plain_loop(spaced, c), loop_captions))
    ratios = [a / b for a, b in zip(rate_a, rate_b)]
    return {"entries": len(entries), "automaton_build_s": build_s, "captions_automaton": len(captions),
            "captions_plain_loop": len(loop_captions), "mean_matches_per_caption": float(np.mean(matches)),
            "captions_matched_fraction": float(np.mean([m > 0 for m in matches])), "outputs_equal": True,
            "automaton_captions_per_s": rate_a, "plain_loop_captions_per_s": rate_b,
            "automaton_median_captions_per_s": statistics.median(rate_a),
            "plain_loop_median_captions_per_s": statistics.median(rate_b),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="10000,100000", help="metadata sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--captions", type=int, default=20_000, help="captions per automaton round")
    parser.add_argument("--loop-checks", type=float, default=2e7,
                        help="plain-loop (caption, entry) tests per round: captions = this / entries")
    parser.add_argument("--out", default=os.path.join(RESULTS, f"curate-{datetime.date.today().isoformat()}.json"))
    args = parser.parse_args()

    pool = entry_pool()
    sizes = [int(s) for s in args.entries.split(",")]
    if max(sizes) > len(pool):
        raise SystemExit(f"--entries up to {len(pool)} (the word lists' size), got {max(sizes)}")
    captions = make_captions(pool, args.captions, seed=1)
    rows = []
    for n in sizes:
        loop_n = max(20, int(args.loop_checks / n))
        rows.append(bench(pool[:n], captions, captions[:loop_n], args.rounds))

    print(f"one core; {args.rounds} interleaved rounds; rates are medians over rounds")
    print(f"{'entries':>8s} {'build s':>8s} {'matches/cap':>11s} {'automaton cap/s':>16s} {'plain loop cap/s':>17s}"
          f"  {'speed-up median [min, max]':s}")
    for r in rows:
        print(f"{r['entries']:8,d} {r['automaton_build_s']:8.2f} {r['mean_matches_per_caption']:11.2f} "
              f"{r['automaton_median_captions_per_s']:16,.0f} {r['plain_loop_median_captions_per_s']:17,.1f}  "
              f"{r['speedup_median']:,.0f}x [{r['speedup_min']:,.0f}, {r['speedup_max']:,.0f}]")
    result = {"benchmark": "curate_matching", "machine": machine_info(packages=("pyahocorasick", "english-words")),
              "rounds": args.rounds, "loop_checks": args.loop_checks, "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
