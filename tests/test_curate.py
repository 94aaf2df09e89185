"""MetaCLIP curation (`clipjax.data.curate`, `clipjax.data.curate_beam`, `clipjax curate`).

Oracles written here from the definitions (methods.md §17, MetaCLIP's `metaclip1/substr_matching.py`
and `metaclip1/balancing.py`), not from the code under test: `reference_spacing` / `reference_match`
(the plain loop over entries), `reference_coin` (the documented BLAKE2b coin) and the balancing
formula P(keep) = 1 - prod_e (1 - min(1, t / count_e)).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import struct

import numpy as np
import pytest

from clipjax.data import curate

PUNCTUATION_WRAPPED = [",", ".", ";", ":", "?", "!", "`"]  # MetaCLIP's puncts_to_wrap


def reference_spacing(text: str) -> str:
    text = f" {text} "
    for punct in PUNCTUATION_WRAPPED:
        text = text.replace(punct, f" {punct} ")
    for char in ("\t", "\n", "\r"):
        text = text.replace(char, " ")
    return text


def reference_match(spaced_entries: list[str], caption: str) -> list[int]:
    text = reference_spacing(caption)
    return [i for i, e in enumerate(spaced_entries) if e in text]


def reference_coin(key: str, entry_id: int, seed: int) -> float:
    digest = hashlib.blake2b(struct.pack("<QQ", seed, entry_id) + key.encode("utf-8"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2**53


def reference_kept(records, entries: list[str], t: float, seed: int) -> tuple[set[str], list[int]]:
    spaced = [f" {e} " for e in entries]
    matched = [(k, reference_match(spaced, c)) for k, c in records if c is not None]
    counts = [0] * len(entries)
    for _, ids in matched:
        for i in ids:
            counts[i] += 1
    p = [min(1.0, t / c) if c else 1.0 for c in counts]
    return {k for k, ids in matched if any(reference_coin(k, e, seed) < p[e] for e in ids)}, counts


# ----------------------------------------------------------------------------- matching vs the plain loop

HANDMADE_ENTRIES = ["black", "black cat", "cat", "Apple", "apple", "APPLE", "e . g .", "e.g.", "St. Louis",
                    "U . S", "rock 'n' roll", "o'clock", "Jean-Pierre", "C++", "café", "東京", "a", "A", "!", ",",
                    "?", "`", "a a", "New York City", "York"]


def make_entries(seed: int = 0) -> list[str]:
    from english_words import get_english_words_set

    rng = random.Random(seed)
    words = sorted(get_english_words_set(["gcide"], lower=False, alpha=False))
    single = [w for w in words if w.isalpha()]
    multi = [w for w in words if " " in w.strip() and "\n" not in w]
    punct = [w for w in words if any(c in w for c in ",.;:?!`-'")]
    picked = HANDMADE_ENTRIES + rng.sample(single, 1500) + rng.sample(multi, 300) + rng.sample(punct, 120)
    return list(dict.fromkeys(picked))


def make_captions(entries: list[str], n: int, seed: int = 0) -> list[str]:
    """Captions from entry strings, their words and filler, with punctuation, case changes and tabs/newlines."""
    rng = random.Random(seed)
    fillers = ["a", "the", "photo", "of", "with", "and", "in", "on", "my", "at", "image"]
    words = sorted({w for e in entries for w in e.split()})
    attach = [",", ".", ";", ":", "?", "!", "`", "'", "-", "(", ")", '"', "..."]
    seps = [" "] * 8 + ["  ", "\t", "\n", "\r", "\r\n", ""]
    captions = []
    for _ in range(n):
        tokens = []
        for _ in range(rng.randint(2, 14)):
            r = rng.random()
            token = rng.choice(entries) if r < 0.35 else rng.choice(words) if r < 0.7 else rng.choice(fillers)
            r = rng.random()
            case = str.capitalize if r < 0.1 else str.upper if r < 0.15 else str.lower if r < 0.2 else str
            token = case(token)
            if rng.random() < 0.15:
                token += rng.choice(attach)
            if rng.random() < 0.05:
                token = rng.choice(attach) + token
            tokens.append(token)
        caption = tokens[0]
        for token in tokens[1:]:
            caption += rng.choice(seps) + token
        captions.append(caption)
    return captions


@pytest.fixture(scope="module")
def word_data():
    entries = make_entries()
    return entries, make_captions(entries, 10_000)


def test_spacing_is_metaclips():
    assert curate.spacing("a,b.c;d:e?f!g`h") == " a , b . c ; d : e ? f ! g ` h "
    assert curate.spacing("x\ty\nz\rw") == " x y z w "
    assert curate.spacing("") == "  "
    assert curate.spacing("it's (x) - \"y\"") == " it's (x) - \"y\" "  # only MetaCLIP's set is spaced


def test_match_equals_the_plain_loop(word_data):
    entries, captions = word_data
    matcher = curate.build_matcher(entries)
    spaced = [f" {e} " for e in entries]
    got = [curate.match(matcher, c) for c in captions]
    want = [reference_match(spaced, c) for c in captions]
    mismatched = [(c, g, w) for c, g, w in zip(captions, got, want) if g != w]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]}"
    # the data exercise what they should: multi-word, punctuation, overlapping and case-distinct entries
    hit = {i for ids in want for i in ids}
    for entry in ["black cat", "e . g .", "rock 'n' roll", "Jean-Pierre", "!", ",", "a a", "Apple", "apple",
                  "café", "New York City", "York"]:
        assert entries.index(entry) in hit, entry
    assert entries.index("e.g.") not in hit and entries.index("St. Louis") not in hit  # never spaced like that
    assert sum(1 for e in hit if " " in entries[e].strip(" ,.;:?!`")) > 30
    assert sum(len(ids) >= 3 for ids in want) > 1000
    assert sum(not ids for ids in want) > 100
    counts = curate.count_matches(got, len(entries))
    assert counts.dtype == np.int64 and counts.tolist() == np.bincount([i for ids in want for i in ids],
                                                                        minlength=len(entries)).tolist()


def test_match_is_case_sensitive_and_whole_word():
    matcher = curate.build_matcher(["cat", "Cat", "black cat", "at"])
    assert curate.match(matcher, "A black cat.") == [0, 2]
    assert curate.match(matcher, "Cat!") == [1]
    assert curate.match(matcher, "cats concatenate") == []
    assert curate.match(matcher, "black\tcat") == [0, 2]
    assert curate.match(matcher, "black  cat") == [0]  # two spaces: " black cat " is not a substring


@pytest.mark.parametrize("entries, message", [
    ([], "no metadata entries"),
    (["cat", "", "dog", ""], "index 1, 3"),
    (["cat", "dog", "cat", "cat", "emu", "dog"], "'cat' at index 0, 2, 3; 'dog' at index 1, 5"),
    (["cat", "new\nline"], "line breaks"),
])
def test_build_matcher_refuses_bad_entries(entries, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        curate.build_matcher(entries)


def test_load_entries(tmp_path):
    path = tmp_path / "m.txt"
    path.write_bytes(" padded \nwith\ttab\r\nlast".encode("utf-8"))
    assert curate.load_entries(str(path)) == [" padded ", "with\ttab", "last"]
    path.write_text("café\n東京\n", encoding="utf-8")
    assert curate.load_entries(str(path)) == ["café", "東京"]
    js = tmp_path / "metadata.json"
    js.write_text(json.dumps(["a", "b c"]))
    assert curate.load_entries(str(js)) == ["a", "b c"]
    path.write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"m\.txt.*index 1"):
        curate.load_entries(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        curate.load_entries(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- balancing


def test_balance_probabilities_and_coins():
    p = curate.balance_probabilities([0, 3, 10, 40, 1000], t=10)
    np.testing.assert_allclose(p, [1, 1, 1, 0.25, 0.01])
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="threshold t"):
            curate.balance_probabilities([1], bad)
    u = np.array([curate.coin(f"k{i}", 7, 3) for i in range(20_000)])
    assert u.tolist() == [reference_coin(f"k{i}", 7, 3) for i in range(20_000)]
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    assert curate.coin("k", 7, 3) != curate.coin("k", 8, 3) != curate.coin("k", 7, 4)
    p = np.array([1.0, 0.0, 0.5])
    assert curate.keep("x", [0], p, 0) and not curate.keep("x", [1], p, 0) and not curate.keep("x", [], p, 0)


# groups of captions: (number, entry words in each caption); entries alpha..delta; t = 1200 gives
# counts alpha 3000, beta 3000, gamma 3500, delta 50, so p = 0.4, 0.4, 0.342857, 1
FORMULA_ENTRIES = ["alpha", "beta", "gamma", "delta", "omega"]
FORMULA_GROUPS = [(3000, ["alpha"]), (1000, ["beta"]), (1500, ["gamma"]), (2000, ["beta", "gamma"]),
                  (50, ["delta"]), (2000, []), (200, None)]
FORMULA_T = 1200


def formula_records(seed: int = 1) -> list[tuple[str, str | None]]:
    rng = random.Random(seed)
    records = []
    for g, (n, words) in enumerate(FORMULA_GROUPS):
        for i in range(n):
            if words is None:
                caption = None
            else:
                parts = ["a", "photo", "of"] + [w + rng.choice(["", ",", "!"]) for w in words] + ["Alpha", "alphas"]
                rng.shuffle(parts)
                caption = " ".join(parts)
            records.append((f"g{g}/{i:05d}", caption))
    rng.shuffle(records)
    return records


def split(records, num_shards: int) -> list[list]:
    return [records[i::num_shards] for i in range(num_shards)]


@pytest.fixture(scope="module")
def formula_runs(tmp_path_factory):
    """The formula data curated locally: 4 shards with 1 and 2 workers, 7 shards with 1 worker, another seed."""
    records = formula_records()
    out = tmp_path_factory.mktemp("formula")
    runs = {}
    for name, shards, workers, seed in (("w1", 4, 1, 0), ("w2", 4, 2, 0), ("s7", 7, 1, 0), ("seed5", 4, 1, 5)):
        summary = curate.curate_local(split(records, shards), iter, FORMULA_ENTRIES, FORMULA_T, seed,
                                      str(out / name), workers=workers, write_matches=name == "w1")
        runs[name] = {"summary": summary, "kept": curate.read_kept_keys(str(out / name)),
                      "counts": curate.read_counts(str(out / name)), "dir": out / name}
    return records, runs


def test_kept_fraction_follows_the_formula(formula_runs):
    records, runs = formula_runs
    kept = runs["w1"]["kept"]
    counts = runs["w1"]["counts"]
    assert counts == {"alpha": 3000, "beta": 3000, "gamma": 3500, "delta": 50, "omega": 0}
    p = {e: min(1.0, FORMULA_T / c) if c else 1.0 for e, c in counts.items()}
    for g, (n, words) in enumerate(FORMULA_GROUPS):
        group_kept = sum(k.startswith(f"g{g}/") for k in kept)
        if not words:  # no match or no caption: never kept
            assert group_kept == 0, (g, words)
            continue
        expected = 1 - math.prod(1 - p[w] for w in words)
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(group_kept / n - expected) <= 4 * sigma + 1e-12, (words, group_kept / n, expected, sigma)
    assert runs["w1"]["summary"] == {
        "captions": 9750, "missing_captions": 200, "matched": 7550, "kept": len(kept), "entries": 5,
        "entries_matched": 4, "t": float(FORMULA_T), "seed": 0, "shards": 4, "runner": "local"}
    assert kept == reference_kept(records, FORMULA_ENTRIES, FORMULA_T, 0)[0]


def test_local_runs_are_deterministic_across_workers_and_shards(formula_runs):
    _, runs = formula_runs
    w1, w2, s7, seed5 = runs["w1"], runs["w2"], runs["s7"], runs["seed5"]
    assert w1["kept"] == w2["kept"] == s7["kept"]
    assert w1["counts"] == w2["counts"] == s7["counts"]
    assert w1["summary"] == w2["summary"] == {**s7["summary"], "shards": 4}
    for name in ["counts.tsv"] + [f"kept-{i:05d}-of-00004.txt" for i in range(4)]:
        assert (w1["dir"] / name).read_bytes() == (w2["dir"] / name).read_bytes(), name
    assert seed5["kept"] != w1["kept"] and seed5["counts"] == w1["counts"]
    assert sorted(os.listdir(w2["dir"])) == ["counts.tsv", "kept-00000-of-00004.txt", "kept-00001-of-00004.txt",
                                              "kept-00002-of-00004.txt", "kept-00003-of-00004.txt", "summary.json"]
    lines = [json.loads(line) for i in range(4) for line in open(w1["dir"] / f"matches-{i:05d}-of-00004.jsonl")]
    assert len(lines) == 7550 and {"key": lines[0]["key"], "entry_ids": lines[0]["entry_ids"]} == lines[0]


def test_read_kept_keys_refuses_incomplete_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="no kept-"):
        curate.read_kept_keys(str(tmp_path))
    (tmp_path / "kept-00000-of-00002.txt").write_text("a\n")
    with pytest.raises(ValueError, match="incomplete"):
        curate.read_kept_keys(str(tmp_path))
    (tmp_path / "kept-00001-of-00002.txt").write_text("b\nc\n")
    assert curate.read_kept_keys(str(tmp_path)) == {"a", "b", "c"}
    with pytest.raises(FileExistsError, match="not empty"):
        curate.curate_local([[("k", "alpha")]], iter, FORMULA_ENTRIES, 1, 0, str(tmp_path))
    curate.curate_local([[("k", "alpha")]], iter, FORMULA_ENTRIES, 1, 0, str(tmp_path), overwrite=True)
    assert curate.read_kept_keys(str(tmp_path)) == {"k"}  # the earlier run's kept files were removed


# ----------------------------------------------------------------------------- Beam


@pytest.fixture(scope="module")
def beam_run(formula_runs, tmp_path_factory):
    """One DirectRunner pipeline over the formula data in 5 shards (Beam is slow to start)."""
    from clipjax.data.curate_beam import curate_beam

    records, _ = formula_runs
    out = tmp_path_factory.mktemp("beam") / "out"
    summary = curate_beam(split(records, 5), FORMULA_ENTRIES, FORMULA_T, 0, str(out),
                          pipeline_options=["--direct_num_workers=1"], read_shard=iter, write_matches=True)
    return summary, out


def test_beam_equals_local(beam_run, formula_runs):
    summary, out = beam_run
    local = formula_runs[1]["w1"]
    assert curate.read_kept_keys(str(out)) == local["kept"]
    assert (out / "counts.tsv").read_bytes() == (local["dir"] / "counts.tsv").read_bytes()
    assert summary == {**local["summary"], "shards": 5, "runner": "beam"}
    assert json.loads((out / "summary.json").read_text()) == summary
    matches = sorted(f for f in os.listdir(out) if f.startswith("matches-"))
    beam_matches = sorted(line for f in matches for line in open(out / f))
    local_matches = sorted(line for i in range(4) for line in open(local["dir"] / f"matches-{i:05d}-of-00004.jsonl"))
    assert beam_matches == local_matches


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(monkeypatch, capsys):
    """`clipjax.cli.main` with the curate command registered; returns (rc, stdout, stderr)."""
    import clipjax.cli as cli_module

    monkeypatch.setattr(cli_module, "COMMANDS", tuple(dict.fromkeys(cli_module.COMMANDS + ("clipjax.cli.curate",))))

    def run(*argv):
        capsys.readouterr()
        rc = cli_module.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def jsonl_source(tmp_path, word_data):
    entries, captions = word_data
    entries, captions = entries[:400], captions[:600]
    captions[5] = None
    metadata = tmp_path / "metadata.txt"
    metadata.write_text("".join(e + "\n" for e in entries), encoding="utf-8")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"filepath": f"{i}.jpg", "title": c}) + "\n" for i, c in enumerate(captions)),
                    encoding="utf-8")
    return metadata, data, [(str(i), c) for i, c in enumerate(captions)], entries


def test_cli_curate_end_to_end(cli, jsonl_source, tmp_path):
    metadata, data, records, entries = jsonl_source
    out = tmp_path / "curated"
    rc, stdout, stderr = cli("curate", "--metadata", metadata, "--data", data, "--t", 3, "--out", out,
                             "--seed", 11, "--workers", 1, "--write-matches")
    assert rc == 0, stderr
    summary = json.loads(stdout)
    want_kept, want_counts = reference_kept(records, entries, 3, 11)
    assert curate.read_kept_keys(str(out)) == want_kept and 0 < len(want_kept) < 590
    assert list(curate.read_counts(str(out)).values()) == want_counts
    assert summary["kept"] == len(want_kept) and summary["captions"] == 600 and summary["missing_captions"] == 1
    assert summary["t"] == 3.0 and summary["seed"] == 11 and summary["runner"] == "local"
    assert json.loads((out / "summary.json").read_text()) == {k: v for k, v in summary.items()
                                                              if k not in ("metadata", "data", "out")}
    assert (out / "matches-00000-of-00001.jsonl").exists()


def test_cli_passes_pipeline_options_to_beam(cli, jsonl_source, tmp_path, monkeypatch):
    import clipjax.data.curate_beam as curate_beam_module

    metadata, data, _, _ = jsonl_source
    seen = {}

    def fake_curate_beam(shards, entries, t, seed, out_dir, pipeline_options=None, **kw):
        seen.update(shards=shards, t=t, seed=seed, options=pipeline_options, **kw)
        return {"kept": 0}

    monkeypatch.setattr(curate_beam_module, "curate_beam", fake_curate_beam)
    rc, stdout, stderr = cli("curate", "--metadata", metadata, "--data", data, "--t", 2, "--out", tmp_path / "o",
                             "--runner", "beam", "--", "--runner=DataflowRunner", "--project=p")
    assert rc == 0, stderr
    assert seen["options"] == ["--runner=DataflowRunner", "--project=p"] and seen["t"] == 2.0
    assert seen["shards"] == [f"{data}#rows=0:600"] and seen["read_shard"].__name__ == "iter_captions"
    rc, _, stderr = cli("curate", "--metadata", metadata, "--data", data, "--t", 2, "--out", tmp_path / "o2",
                        "--", "--runner=DataflowRunner")
    assert rc == 2 and "need --runner beam" in stderr


def test_cli_errors(cli, jsonl_source, tmp_path):
    metadata, data, _, _ = jsonl_source

    def error(*extra, metadata=metadata, out=tmp_path / "out", t=2):
        rc, stdout, stderr = cli("curate", "--metadata", metadata, "--data", data, f"--t={t}", "--out", out,
                                 "--workers", 1, *extra)
        assert rc == 2 and not stdout, (stdout, stderr)
        return stderr

    assert "does not exist" in error(metadata=tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no entries" in error(metadata=empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n")
    assert "duplicate" in error(metadata=dup) and "'cat' at index 0, 2" in error(metadata=dup)
    assert "threshold t" in error(t=0) and "threshold t" in error(t=-1)
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("x")
    assert "not empty" in error(out=used)
    assert not (tmp_path / "out").exists()  # nothing written by the failed runs
    rc, _, stderr = cli("curate", "--metadata", metadata, "--data", data, "--t", 2, "--out", used, "--workers", 1,
                        "--overwrite")
    assert rc == 0, stderr
    assert (used / "notes.txt").exists() and (used / "summary.json").exists()
    rc, _, stderr = cli("curate", "--metadata", metadata, "--data", tmp_path / "nothing.jsonl", "--t", 2,
                        "--out", tmp_path / "o3")
    assert rc == 2 and "nothing.jsonl" in stderr
