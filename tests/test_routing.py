"""Principle routing (applies: harmful | benign | any), contrast instructions, prompt_kind."""
import random

import pytest

from minicai.constitution import DEFAULT_CONSTITUTION, load_constitution, prompt_kind

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
    contrasts = [p for p in c.critiques + c.comparisons if p.positive]
    assert len(contrasts) >= 8 and all(p.negative and p.negative != p.positive for p in contrasts)
    assert {"harmful", "benign"} <= {p.applies for p in contrasts}


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
