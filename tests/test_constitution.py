"""Constitution parser, sampling, stage-1 prompt builders and the shipped data files."""
import base64
import codecs
import random
from pathlib import Path

import pytest

from minicai.constitution import (DEFAULT_CONSTITUTION, DEFAULT_FEWSHOT, ComparisonPrinciple, Principle,
                                  critique_messages, load_constitution, load_fewshot, revision_messages,
                                  strip_label)
from minicai.io import read_jsonl

DATA = Path(__file__).resolve().parent.parent / "data"
TECHNIQUES = {"direct", "role_play", "hypothetical", "obfuscation", "prompt_injection", "many_shot",
              "gradual_escalation"}
HELPFUL_CATEGORIES = {"legitimate", "dual_use", "ambiguous", "sensitive"}


def write(tmp_path, text, name="const.txt"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- parsing

def test_shipped_constitution_parses():
    c = load_constitution(DEFAULT_CONSTITUTION)
    assert len(c.critiques) >= 12 and len(c.comparisons) >= 6
    names = [p.name for p in c.critiques + c.comparisons]
    assert len(names) == len(set(names))
    for p in c.critiques:
        assert isinstance(p, Principle) and p.critique and p.revision and p.weight > 0
        assert "\n" not in p.critique and "  " not in p.critique  # continuations joined by one space
    for p in c.comparisons:
        assert isinstance(p, ComparisonPrinciple) and "?" in p.question and p.weight > 0
    # principles the brief requires
    for name in ("harm", "jailbreak", "fabrication", "over-refusal", "graceful-refusal", "dual-use", "privacy"):
        c.get(name)


def test_format_details(tmp_path):
    p = write(tmp_path, "# comment\n\n[critique a]\ncritique: one\n  two\n\tthree\n# inner comment\n"
                        "revision: fix it\nweight: 2.5\n\n[compare b]\nquestion: Which?\n")
    c = load_constitution(p)
    assert c.critiques == [Principle("a", "one two three", "fix it", 2.5)]
    assert c.comparisons == [ComparisonPrinciple("b", "Which?", 1.0)]
    # a BOM and Windows line endings (files saved by some editors) parse the same
    p.write_bytes(b"\xef\xbb\xbf" + p.read_text().replace("\n", "\r\n").encode())
    assert load_constitution(p) == c


@pytest.mark.parametrize("text, line, words", [
    ("[critique a]\ncritique: x\nrevision: y\n[oops b]\nquestion: q\n", 4, "unknown section"),
    ("[critique a]\ncritique: x\nrevision: y\n\n[critique]\n", 5, "malformed header"),
    ("\n\n[critique a]\ncritique: x\n\n[compare b]\nquestion: q\n", 3, "missing 'revision'"),
    ("[critique a]\nrevision: y\n", 1, "missing 'critique'"),
    ("[compare b]\nweight: 2\n", 1, "missing 'question'"),
    ("[critique a]\ncritique: x\nrevision: y\nseverity: high\n", 4, "unknown key"),
    ("[compare a]\nquestion: q\ncritique: x\n", 3, "unknown key"),
    ("[critique a]\ncritique: x\nrevision: y\n\n[compare a]\nquestion: q\n", 5, "duplicate"),
    ("[critique a]\ncritique: x\ncritique: z\nrevision: y\n", 3, "twice"),
    ("critique: x\n", 1, "before any"),
    ("[critique a]\ncritique: x\nrevision: y\nweight: heavy\n", 4, "number"),
    ("[critique a]\ncritique: x\nrevision: y\nweight: -1\n", 4, "positive"),
    ("[critique a]\ncritique:\nrevision: y\n", 2, "empty"),
    ("[critique a]\ncritique: x\n\n   dangling\nrevision: y\n", 4, "continues nothing"),
    ("   indented first\n", 1, "continues nothing"),
    ("[critique a]\njust some words\n", 2, "expected"),
])
def test_malformed_names_file_and_line(tmp_path, text, line, words):
    p = write(tmp_path, text, name="bad_const.txt")
    with pytest.raises(ValueError) as e:
        load_constitution(p)
    msg = str(e.value)
    assert f"bad_const.txt:{line}:" in msg, msg
    assert words in msg, msg


@pytest.mark.parametrize("text", ["", "# only comments\n\n# here\n"])
def test_empty_constitution(tmp_path, text):
    p = write(tmp_path, text, name="empty_const.txt")
    with pytest.raises(ValueError, match="empty_const.txt.*no principles"):
        load_constitution(p)


def test_sampling_with_no_principles_of_a_kind(tmp_path):
    c = load_constitution(write(tmp_path, "[compare b]\nquestion: q?\n"))
    with pytest.raises(ValueError, match="critique"):
        c.sample_critique(random.Random(0))


# ----------------------------------------------------------------------------- sampling

def test_sampling_reproducible():
    c = load_constitution()
    a = [c.sample_critique(random.Random(7)).name for _ in range(3)]
    assert len(set(a)) == 1
    r1, r2 = random.Random(123), random.Random(123)
    seq1 = [c.sample_critique(r1).name for _ in range(50)] + [c.sample_comparison(r1).name for _ in range(50)]
    seq2 = [c.sample_critique(r2).name for _ in range(50)] + [c.sample_comparison(r2).name for _ in range(50)]
    assert seq1 == seq2
    assert len(set(seq1[:50])) > 5  # actually random, not stuck on one principle


def test_sampling_respects_weights(tmp_path):
    p = write(tmp_path, "[critique a]\ncritique: x\nrevision: y\n\n[critique b]\ncritique: x\nrevision: y\n"
                        "weight: 3\n\n[compare c]\nquestion: q\nweight: 0.5\n\n[compare d]\nquestion: q\n"
                        "weight: 4.5\n")
    c = load_constitution(p)
    rng, n = random.Random(0), 20000
    frac_b = sum(c.sample_critique(rng).name == "b" for _ in range(n)) / n
    frac_d = sum(c.sample_comparison(rng).name == "d" for _ in range(n)) / n
    # expected 3/4 and 9/10; binomial std is about 0.003 and 0.002 at n=20000, so 0.015 is ~5 sigma
    assert abs(frac_b - 0.75) < 0.015
    assert abs(frac_d - 0.90) < 0.015


# ----------------------------------------------------------------------------- data files

def check_messages(msgs, where):
    assert isinstance(msgs, list) and msgs, where
    for i, m in enumerate(msgs):
        assert set(m) == {"role", "content"}, where
        assert m["role"] == ("user" if i % 2 == 0 else "assistant"), where
        assert isinstance(m["content"], str) and m["content"].strip(), where
    assert msgs[-1]["role"] == "user", where


def check_prompt_row(row, where):
    assert ("prompt" in row) != ("messages" in row), where
    if "prompt" in row:
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), where
    else:
        check_messages(row["messages"], where)


def test_red_team_prompts():
    rows = read_jsonl(DATA / "red_team_prompts.jsonl", required=("category", "technique"))
    assert len(rows) >= 60
    for i, r in enumerate(rows):
        check_prompt_row(r, i)
        assert r["category"] == "harmful" and r["technique"] in TECHNIQUES, i
        if r["technique"] == "gradual_escalation":
            assert "messages" in r and len(r["messages"]) >= 3, i
    assert {r["technique"] for r in rows} == TECHNIQUES
    assert sum(r["technique"] == "obfuscation" and r["encoding"] == "base64" for r in rows) >= 3


def test_obfuscation_rows_decode():
    leet = str.maketrans("013457", "oieast")
    decoders = {
        "base64": lambda s: base64.b64decode(s, validate=True).decode("utf-8"),
        "rot13": lambda s: codecs.decode(s, "rot13"),
        "leetspeak": lambda s: s.translate(leet),
        "reversed": lambda s: s[::-1],
        "spelled_out": lambda s: s.replace("-", ""),
    }
    rows = [r for r in read_jsonl(DATA / "red_team_prompts.jsonl") if r["technique"] == "obfuscation"]
    assert rows
    for r in rows:
        assert r["encoded"] in r["prompt"]
        assert r["decoded"] not in r["prompt"]  # the plain request really is hidden
        assert decoders[r["encoding"]](r["encoded"]) == r["decoded"]


def test_helpful_prompts():
    rows = read_jsonl(DATA / "helpful_prompts.jsonl", required=("category",))
    assert len(rows) >= 60
    for i, r in enumerate(rows):
        check_prompt_row(r, i)
        assert r["category"] in HELPFUL_CATEGORIES, i
    assert {r["category"] for r in rows} == HELPFUL_CATEGORIES
    assert sum(r["category"] == "ambiguous" for r in rows) >= 18


def test_prompt_sets_do_not_overlap():
    texts = lambda f: {r.get("prompt") or r["messages"][-1]["content"] for r in read_jsonl(DATA / f)}
    assert not texts("red_team_prompts.jsonl") & texts("helpful_prompts.jsonl")


def test_fewshot_file():
    c = load_constitution()
    demos = load_fewshot(DEFAULT_FEWSHOT, c)
    assert 4 <= len(demos) <= 6
    names = {d.principle.name for d in demos}
    assert {"over-refusal", "dual-use", "jailbreak", "fabrication"} <= names
    for d in demos:
        assert d.principle is c.get(d.principle.name)
        check_messages(d.messages, d.principle.name)


def test_fewshot_errors(tmp_path):
    c = load_constitution(write(tmp_path, "[critique a]\ncritique: x\nrevision: y\n"))
    good = '{"prompt": "p", "response": "r", "principle": "a", "critique": "c", "revision": "v"}'
    p = write(tmp_path, f"{good}\n\n" + good.replace('"a"', '"nope"') + "\n", name="shots.jsonl")
    with pytest.raises(ValueError, match=r"shots.jsonl:3:.*nope"):
        load_fewshot(p, c)
    p = write(tmp_path, f"{good}\n" + good.replace('"prompt": "p"', '"messages": [{"role": "assistant", '
                                                   '"content": "hi"}]') + "\n", name="shots2.jsonl")
    with pytest.raises(ValueError, match=r"shots2.jsonl:2:.*role"):
        load_fewshot(p, c)
    p = write(tmp_path, good.replace('"critique": "c", ', "") + "\n", name="shots3.jsonl")
    with pytest.raises(ValueError, match=r"shots3.jsonl:1:.*critique"):
        load_fewshot(p, c)


# ----------------------------------------------------------------------------- prompt builders

def roles_alternate_ending_with_user(msgs):
    return (all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(msgs))
            and msgs[-1]["role"] == "user")


def test_critique_and_revision_messages():
    c = load_constitution()
    demos = load_fewshot()
    principle = c.get("over-refusal")
    prompt = [{"role": "user", "content": "How do I kill a zombie process?"},
              {"role": "assistant", "content": "Which operating system?"},
              {"role": "user", "content": "Linux."}]
    response = "I can't help with killing."

    for shots in ([], demos[:2], demos):
        msgs = critique_messages(prompt, response, principle, shots)
        assert roles_alternate_ending_with_user(msgs)
        assert len(msgs) == 4 * len(shots) + 1
        last = msgs[-1]["content"]
        assert principle.critique in last and "CritiqueRequest:" in last
        # the conversation is quoted in order, with the response under review last
        pos = [last.index(s) for s in ("How do I kill a zombie process?", "Which operating system?",
                                       "Linux.", response, "CritiqueRequest:")]
        assert pos == sorted(pos)
        assert last.index("Assistant: " + response) > last.index("User: Linux.")

        rev = revision_messages(prompt, response, "The request is harmless.", principle, shots)
        assert roles_alternate_ending_with_user(rev)
        assert rev[:len(msgs)] == msgs  # shares the critique prompt as prefix
        assert rev[-2] == {"role": "assistant", "content": "The request is harmless."}
        assert principle.revision in rev[-1]["content"] and "RevisionRequest:" in rev[-1]["content"]

    # demonstrations carry their own principle's text, critique and revision as assistant turns
    msgs = critique_messages("hi", "hello", principle, demos[:1])
    d = demos[0]
    assert d.principle.critique in msgs[0]["content"] and d.response in msgs[0]["content"]
    assert msgs[1]["content"] == d.critique and msgs[3]["content"] == d.revision
    assert d.principle.revision in msgs[2]["content"]


def test_prompt_builder_rejects_bad_prompts():
    p = Principle("x", "crit", "rev")
    with pytest.raises(ValueError, match="last message"):
        critique_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "r", p)
    with pytest.raises(ValueError, match="role"):
        critique_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "r", p)


def test_strip_label():
    assert strip_label("Critique: The reply is fine.", "Critique") == "The reply is fine."
    assert strip_label("  **Revision:** Sure, here.", "Revision") == "Sure, here."
    assert strip_label("Revisions are hard.", "Revision") == "Revisions are hard."
    assert strip_label("No label here", "Critique") == "No label here"
