"""MetaCLIP curation: substring matching of captions against metadata entries, then balancing.

Source: "Demystifying CLIP Data" (MetaCLIP), repository facebookresearch/MetaCLIP, files
`metaclip/metaclip1/substr_matching.py` (`spacing`, `substr_matching`), `metaclip/metaclip1/balancing.py`
and `metaclip/metaclip1/indexing/balance_sampling.py`; see also reference/methods.md §17.

Matching. `spacing(text)` is `" " + text + " "` with each of `, . ; : ? ! `` (MetaCLIP's set, with
the backtick) replaced by itself surrounded by spaces, then each of `\\t \\n \\r` replaced by a space.
Entry e matches a caption iff `" " + e + " "` is a substring of the spaced caption: whole-word,
case-sensitive. Entries are not spaced, so an entry holding one of the wrapped punctuation marks
(`"St. Louis"`) only matches a caption whose text holds it already spaced (`"St . Louis"`), as in
MetaCLIP. One Aho-Corasick automaton (pyahocorasick) holds every `" e "` and finds all of them,
overlapping ones included, in one scan of the caption; `match` returns the sorted unique entry ids
(an entry's id is its 0-based line in the metadata file).

Balancing with threshold t > 0. count_e = the number of captions that match entry e, over all the data
(a first pass); p_e = t / max(count_e, t) = min(1, t / count_e) (MetaCLIP's
`entry_count[entry_count < t] = t; entry_prob = t / entry_count`). A caption is kept iff at least one
of its matched entries passes its own coin, u(key, e) < p_e, so P(keep) = 1 - prod_e (1 - p_e);
captions with no match (or no caption) are dropped.

Coins. MetaCLIP draws `random.random()`; here a coin is a hash, so the kept set depends only on the
data, the metadata, t and the seed, never on how the data is split over shards, processes or Beam
workers (`curate_local` with any worker count and `curate_beam` keep the same keys):
    u(key, e, seed) = (first 8 bytes of BLAKE2b(pack("<QQ", seed, e) + utf8(key)), big-endian) >> 11) / 2**53,
uniform on [0, 1) in steps of 2**-53. The caption key must therefore be unique across the data: two
captions with one key share their coins.

Outputs of `curate_local` (and `curate_beam`) in `out_dir`:
    kept-SSSSS-of-NNNNN.txt   kept keys, one per line (`read_kept_keys` reads them back as a set)
    counts.tsv                `entry<TAB>count` per metadata entry, in metadata order
    summary.json              captions, missing_captions, matched, kept, entries, entries_matched, t,
                              seed, shards, runner
    matches-SSSSS-of-NNNNN.jsonl  (with write_matches) `{"key": ..., "entry_ids": [...]}` per matched caption
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

SPACED_PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")  # MetaCLIP's `puncts_to_wrap`
WHITESPACE_TO_SPACE = ("\t", "\n", "\r")  # MetaCLIP's `chars_to_space`
OUTPUT_PATTERNS = ("kept-*-of-*.txt", "matches-*-of-*.jsonl", "counts.tsv", "summary.json")
_SHARD_FILE = re.compile(r"kept-(\d+)-of-(\d+)\.txt$")

Record = tuple[str, "str | None"]  # (key, caption); caption None when the example has none


# ----------------------------------------------------------------------------- matching


def spacing(text: str) -> str:
    """MetaCLIP's `spacing`: pad with spaces, space out `, . ; : ? ! `` and turn tab/newline/CR into spaces."""
    spaced = f" {text} "
    for punct in SPACED_PUNCTUATION:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in WHITESPACE_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def check_entries(entries: Sequence[str]) -> list[str]:
    """The entries as a list; ValueError naming empty, non-string, line-break-holding or duplicate entries,
    or no entries at all."""
    entries = list(entries)
    if not entries:
        raise ValueError("no metadata entries: expected at least one entry (one per line)")
    bad = [i for i, e in enumerate(entries) if not isinstance(e, str) or not e]
    if bad:
        raise ValueError(f"metadata entries must be non-empty strings; {len(bad)} are not, at 0-based "
                         f"index {', '.join(map(str, bad[:10]))}{' ...' if len(bad) > 10 else ''}")
    broken = [i for i, e in enumerate(entries) if "\n" in e or "\r" in e]
    if broken:
        raise ValueError(f"metadata entries must not hold line breaks (captions never do after `spacing`); "
                         f"{len(broken)} do, at 0-based index {', '.join(map(str, broken[:10]))}")
    if len(set(entries)) != len(entries):
        first: dict[str, int] = {}
        dups: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            if e in first:
                dups.setdefault(e, [first[e]]).append(i)
            else:
                first[e] = i
        shown = "; ".join(f"{e!r} at index {', '.join(map(str, ids))}" for e, ids in list(dups.items())[:10])
        raise ValueError(f"metadata has {len(dups)} duplicate entries (each entry must appear once): {shown}"
                         f"{' ...' if len(dups) > 10 else ''}")
    return entries


def build_matcher(entries: Sequence[str]):
    """An Aho-Corasick automaton (`ahocorasick.Automaton`) holding `" e "` -> entry id for every entry."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for entry_id, entry in enumerate(check_entries(entries)):
        automaton.add_word(f" {entry} ", entry_id)
    automaton.make_automaton()
    return automaton


def match(matcher, caption: str) -> list[int]:
    """Sorted unique ids of the entries whose `" e "` occurs in `spacing(caption)`."""
    return sorted({entry_id for _, entry_id in matcher.iter(spacing(caption))})


def load_entries(path: str) -> list[str]:
    """Metadata entries from a UTF-8 text file, one entry per line (only the line break, `\\n` or `\\r\\n`,
    is removed; a final line break is optional), or from a `.json` file holding a list of strings
    (MetaCLIP's `metadata.json`). Checked by `check_entries`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metadata file {path!r} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if path.endswith(".json"):
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError(f"metadata file {path!r}: expected a JSON list of strings, got {type(entries).__name__}")
    else:
        entries = text.split("\n")
        if entries and entries[-1] == "":
            entries.pop()
        entries = [e[:-1] if e.endswith("\r") else e for e in entries]
    if not entries:
        raise ValueError(f"metadata file {path!r} holds no entries; expected one entry per line")
    try:
        return check_entries(entries)
    except ValueError as e:
        raise ValueError(f"metadata file {path!r}: {e}") from None


# ----------------------------------------------------------------------------- balancing


def count_matches(matched: Iterable[Sequence[int]], num_entries: int) -> np.ndarray:
    """int64 `[num_entries]`: per entry, the number of captions whose matched ids (unique per caption) hold it."""
    counts = np.zeros(num_entries, np.int64)
    ids = [i for entry_ids in matched for i in entry_ids]
    if ids:
        counts += np.bincount(np.asarray(ids, np.int64), minlength=num_entries)
    return counts


def check_threshold(t: float) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"threshold t must be a finite number > 0 (MetaCLIP uses 20000 for 400M), got {t!r}")
    return float(t)


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


def balance_probabilities(counts, t: float) -> np.ndarray:
    """float64 p_e = t / max(count_e, t) = min(1, t / count_e); 1 for entries no caption matched."""
    t = check_threshold(t)
    counts = np.asarray(counts, np.float64)
    return t / np.maximum(counts, t)


def coin(key: str, entry_id: int, seed: int) -> float:
    """u(key, entry_id, seed) in [0, 1): the module docstring's keyed BLAKE2b hash, 53 bits."""
    digest = hashlib.blake2b(struct.pack("<QQ", seed, entry_id) + key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) * 2.0**-53


def keep(key: str, entry_ids: Iterable[int], p, seed: int) -> bool:
    """True iff some matched entry e passes its coin, coin(key, e, seed) < p[e] (never for no entries)."""
    for e in entry_ids:
        pe = p[e]
        if pe >= 1.0 or coin(key, e, seed) < pe:
            return True
    return False


# ----------------------------------------------------------------------------- per-shard work


def check_key(key) -> str:
    if not isinstance(key, str) or "\n" in key or "\r" in key:
        raise ValueError(f"caption keys must be strings without line breaks (kept keys are written one per "
                         f"line), got {key!r}")
    return key


def match_records(matcher, records: Iterable[Record], stats: dict | None = None) -> Iterator[tuple[str, list[int]]]:
    """(key, matched entry ids) for each record with at least one match; `stats` (if given) accumulates
    `captions`, `missing_captions` and `matched`."""
    stats = {} if stats is None else stats
    for name in ("captions", "missing_captions", "matched"):
        stats.setdefault(name, 0)
    for key, caption in records:
        stats["captions"] += 1
        if caption is None:
            stats["missing_captions"] += 1
            continue
        entry_ids = match(matcher, caption)
        if entry_ids:
            stats["matched"] += 1
            yield check_key(key), entry_ids


def shard_name(kind: str, index: int, num_shards: int, suffix: str) -> str:
    """`kind-SSSSS-of-NNNNN.suffix`, Beam's `WriteToText` default shard naming."""
    return f"{kind}-{index:05d}-of-{num_shards:05d}.{suffix}"


def _match_shard(matcher, read_shard, shard, matches_path: str):
    """Count pass over one shard: writes its matches (JSONL) and returns (entry ids, counts, stats)."""
    stats: dict = {}
    ids: list[int] = []
    with open(matches_path, "w", encoding="utf-8") as f:
        for key, entry_ids in match_records(matcher, read_shard(shard), stats):
            f.write(json.dumps({"key": key, "entry_ids": entry_ids}, ensure_ascii=False) + "\n")
            ids.extend(entry_ids)
    unique, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
    return unique, counts, stats


def _sample_shard(matches_path: str, kept_path: str, p, seed: int) -> int:
    """Sampling pass over one shard's matches: writes the kept keys and returns how many."""
    kept = 0
    with open(matches_path, encoding="utf-8") as src, open(kept_path, "w", encoding="utf-8") as out:
        for line in src:
            rec = json.loads(line)
            if keep(rec["key"], rec["entry_ids"], p, seed):
                out.write(rec["key"] + "\n")
                kept += 1
    return kept


# pool workers: state set once per process by the initializers, then one task per shard
_worker: dict = {}


def _init_match_worker(entries, read_shard):
    _worker.update(matcher=build_matcher(entries), read_shard=read_shard)


def _match_task(task):
    index, shard, matches_path = task
    return (index,) + _match_shard(_worker["matcher"], _worker["read_shard"], shard, matches_path)


def _init_sample_worker(p, seed):
    _worker.update(p=p, seed=seed)


def _sample_task(task):
    index, matches_path, kept_path = task
    return index, _sample_shard(matches_path, kept_path, _worker["p"], _worker["seed"])


# ----------------------------------------------------------------------------- runner


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Create `out_dir`; FileExistsError if it holds files, unless `overwrite` (then this module's outputs
    in it are deleted first; other files are left alone)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output {out_dir!r} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"output folder {out_dir!r} exists and is not empty; choose a new folder "
                                  "or pass overwrite=True (--overwrite)")
        for pattern in OUTPUT_PATTERNS:
            for path in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def write_counts(path: str, entries: Sequence[str], counts) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{e}\t{int(c)}\n" for e, c in zip(entries, counts))


def make_summary(stats: dict, kept: int, counts, entries_count: int, t: float, seed: int, shards: int,
                 runner: str) -> dict:
    return {"captions": int(stats["captions"]), "missing_captions": int(stats["missing_captions"]),
            "matched": int(stats["matched"]), "kept": int(kept), "entries": int(entries_count),
            "entries_matched": int(np.count_nonzero(counts)), "t": t, "seed": seed, "shards": shards,
            "runner": runner}


def curate_local(shards: Sequence, read_shard: Callable[[object], Iterable[Record]], entries: Sequence[str],
                 t: float, seed: int, out_dir: str, workers: int = 1, write_matches: bool = False,
                 overwrite: bool = False) -> dict:
    """Curate (key, caption) records on this machine with `workers` processes; returns the summary.

    Args:
      shards: shard ids, e.g. `clipjax.data.sources.caption_shards(spec)`, or any picklable objects
        (in-memory lists of records work with `read_shard=iter`).
      read_shard: a picklable top-level function shard -> iterable of (key, caption or None).
      entries: the metadata (see `load_entries`); t: balancing threshold > 0; seed: coin seed.
      out_dir: output folder (see the module docstring); refused if it holds files, unless `overwrite`.
      workers: processes (1: all in this process). Pools use the "spawn" start method: forking a process
        that runs JAX's threads can deadlock.
      write_matches: keep `matches-*.jsonl` (the count pass writes them for the sampling pass either way).

    Pass 1 (count) reads and matches every shard once, writing each shard's matches; pass 2 (sample)
    reads those matches back with the global p_e, so the source is read only once.
    """
    shards = list(shards)
    if not shards:
        raise ValueError("no input shards: expected at least one shard of (key, caption) records")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    entries, t, seed = check_entries(entries), check_threshold(t), check_seed(seed)
    prepare_out_dir(out_dir, overwrite)
    n = len(shards)
    matches_paths = [os.path.join(out_dir, shard_name("matches", i, n, "jsonl")) for i in range(n)]
    kept_paths = [os.path.join(out_dir, shard_name("kept", i, n, "txt")) for i in range(n)]
    workers = min(workers, n)

    counts = np.zeros(len(entries), np.int64)
    stats = {"captions": 0, "missing_captions": 0, "matched": 0}
    match_tasks = [(i, shard, matches_paths[i]) for i, shard in enumerate(shards)]
    if workers == 1:
        matcher = build_matcher(entries)
        results = [(i,) + _match_shard(matcher, read_shard, shard, path) for i, shard, path in match_tasks]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_match_worker, (entries, read_shard)) as pool:
            results = list(pool.imap_unordered(_match_task, match_tasks))
    for _, unique, shard_counts, shard_stats in results:
        counts[unique] += shard_counts
        for name in stats:
            stats[name] += shard_stats[name]

    p = balance_probabilities(counts, t)
    sample_tasks = list(zip(range(n), matches_paths, kept_paths))
    if workers == 1:
        kept = sum(_sample_shard(m, k, p, seed) for _, m, k in sample_tasks)
    else:
        with ctx.Pool(workers, _init_sample_worker, (p, seed)) as pool:
            kept = sum(k for _, k in pool.imap_unordered(_sample_task, sample_tasks))
    if not write_matches:
        for path in matches_paths:
            os.remove(path)

    write_counts(os.path.join(out_dir, "counts.tsv"), entries, counts)
    summary = make_summary(stats, kept, counts, len(entries), t, seed, n, "local")
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- reading outputs


def read_kept_keys(out_dir: str) -> set[str]:
    """The kept keys of a `clipjax curate` output folder; FileNotFoundError / ValueError when its
    `kept-SSSSS-of-NNNNN.txt` files are missing or incomplete (a shard number absent)."""
    paths = glob.glob(os.path.join(glob.escape(out_dir), "kept-*-of-*.txt"))
    if not paths:
        raise FileNotFoundError(f"no kept-SSSSS-of-NNNNN.txt files in {out_dir!r}; expected a `clipjax curate` "
                                "output folder")
    found: dict[int, set[int]] = {}
    for path in paths:
        m = _SHARD_FILE.search(os.path.basename(path))
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if len(found) != 1 or any(idx != set(range(total)) for total, idx in found.items()):
        raise ValueError(f"kept-key files in {out_dir!r} are incomplete or from several runs: found "
                         f"{ {total: len(idx) for total, idx in found.items()} } (total: files present); "
                         "expected kept-00000-of-N through kept-(N-1)-of-N")
    keys: set[str] = set()
    for path in paths:
        with open(path, encoding="utf-8", newline="\n") as f:
            keys.update(line.rstrip("\n") for line in f)
    return keys


def read_counts(out_dir: str) -> dict[str, int]:
    """`counts.tsv` as entry -> count (the count is after the last tab; entries may hold tabs)."""
    counts = {}
    with open(os.path.join(out_dir, "counts.tsv"), encoding="utf-8", newline="\n") as f:
        for line in f:
            entry, count = line.rstrip("\n").rsplit("\t", 1)
            counts[entry] = int(count)
    return counts
