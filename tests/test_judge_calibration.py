"""minicai.judge: contextual calibration, order consistency and the principle ensemble against hand-computed
values (a stub stands in for the judge's letter probabilities), judge_report's interval, reference_loglik
against a plain per-sequence forward, and bad input."""
import json
import math
import re

import pytest
import torch

import minicai.judge as judge
from minicai.pretrained import load_pretrained
from minicai.judge import compare_calibrated, judge_report, load_labelled_pairs, reference_loglik

Z = 1.959964
CONV = [{"role": "user", "content": "Q"}]


def stub_judge(monkeypatch, table):
    """Replace choice_logprobs by a lookup: table[(principle, response listed as (A))] = P("A"); the
    content-free pair is looked up as (principle, "N/A")."""
    def fake(model, tokenizer, questions, n_options=2, batch_size=8, **kw):
        out = []
        for q in questions:
            text = q[-1]["content"]
            first = re.search(r"Options:\n\(A\) (.*?)\n\n\(B\)", text, re.S).group(1)
            principle = next(p for p, _ in table if p in text)
            pa = table[(principle, first)]
            out.append([math.log(pa), math.log(1 - pa)])
        return torch.tensor(out, dtype=torch.float32)
    monkeypatch.setattr(judge, "choice_logprobs", fake)


def test_calibration_divides_out_prior(monkeypatch):
    # prior on the content-free pair: P(A) = 0.8. Pair (x, y): P(A) = 0.9 with x first; P(A) = 0.6 with y first,
    # i.e. raw P(x better) = 0.9 then 0.4: the raw orders disagree.
    stub_judge(monkeypatch, {("Q1?", "N/A"): 0.8, ("Q1?", "x"): 0.9, ("Q1?", "y"): 0.6})
    out = compare_calibrated(None, None, [CONV], ["x"], ["y"], ["Q1?"])
    # first order: (0.9/0.8) / (0.9/0.8 + 0.1/0.2) = 1.125 / 1.625 = 9/13
    # swapped: x is (B): (0.4/0.2) / (0.6/0.8 + 0.4/0.2) = 2 / 2.75 = 8/11
    assert out["p_first_calibrated"][0].item() == pytest.approx(9 / 13, abs=1e-6)
    assert out["p_swapped_calibrated"][0].item() == pytest.approx(8 / 11, abs=1e-6)
    assert out["p_a"][0].item() == pytest.approx((9 / 13 + 8 / 11) / 2, abs=1e-6)
    assert out["p_first_order"][0].item() == pytest.approx(0.9, abs=1e-6)
    assert out["p_swapped_order"][0].item() == pytest.approx(0.4, abs=1e-6)
    assert out["order_consistency"] == 1.0 and out["order_consistency_raw"] == 0.0
    assert out["prior"][0].tolist() == pytest.approx([0.8, 0.2], abs=1e-6)


def test_uniform_prior_changes_nothing_and_order_consistency(monkeypatch):
    # prior 0.5: calibration is the identity. Pairs: (x,y) consistent for x; (u,v) P(A)=0.7 in both orders,
    # so raw P(u better) = 0.7 first and 0.3 swapped: inconsistent. Consistency = 1/2.
    stub_judge(monkeypatch, {("Q?", "N/A"): 0.5, ("Q?", "x"): 0.8, ("Q?", "y"): 0.3,
                             ("Q?", "u"): 0.7, ("Q?", "v"): 0.7})
    out = compare_calibrated(None, None, [CONV, CONV], ["x", "u"], ["y", "v"], ["Q?"])
    assert out["p_a"].tolist() == pytest.approx([(0.8 + 0.7) / 2, (0.7 + 0.3) / 2], abs=1e-6)
    assert out["order_consistency"] == 0.5 and out["order_consistency_raw"] == 0.5


def test_ensemble_averages_calibrated_principles(monkeypatch):
    stub_judge(monkeypatch, {("Q1?", "N/A"): 0.8, ("Q1?", "x"): 0.9, ("Q1?", "y"): 0.6,
                             ("Q2?", "N/A"): 0.25, ("Q2?", "x"): 0.5, ("Q2?", "y"): 0.2})
    out = compare_calibrated(None, None, [CONV], ["x"], ["y"], ["Q1?", "Q2?"])
    # Q2, prior (0.25, 0.75): first order (0.5/0.25) / (0.5/0.25 + 0.5/0.75) = 2 / (8/3) = 3/4;
    # swapped, x is (B): (0.8/0.75) / (0.2/0.25 + 0.8/0.75) = (16/15) / (28/15) = 4/7
    q1 = (9 / 13 + 8 / 11) / 2
    q2 = (3 / 4 + 4 / 7) / 2
    assert out["p_a"][0].item() == pytest.approx((q1 + q2) / 2, abs=1e-6)
    assert out["p_first_order"][0].item() == pytest.approx((0.9 + 0.5) / 2, abs=1e-6)
    assert out["p_swapped_order"][0].item() == pytest.approx((0.4 + 0.8) / 2, abs=1e-6)


def wilson_by_hand(k, n):
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


def test_judge_report_interval_and_beats_chance(monkeypatch):
    # the stub prefers the response listed as "good" in every order (prior 0.5): it agrees with a label
    # exactly when the label says the good one is preferred.
    stub_judge(monkeypatch, {("Q?", "N/A"): 0.5, ("Q?", "good"): 0.9, ("Q?", "bad"): 0.1})
    rows = lambda k, n: [dict(prompt="p", response_a="good", response_b="bad", principle="Q?",
                              preferred="a" if i < k else "b") for i in range(n)]
    rep = judge_report(None, None, rows(18, 20))
    lo, hi = wilson_by_hand(18, 20)          # about (0.699, 0.972)
    assert rep["n"] == 20 and rep["calibrated"]["agreement"]["value"] == 0.9
    assert (rep["calibrated"]["agreement"]["lo"], rep["calibrated"]["agreement"]["hi"]) == pytest.approx((lo, hi))
    assert rep["calibrated"]["beats_chance"] and rep["raw_first_order"]["beats_chance"]
    assert rep["calibrated"]["order_consistency"] == 1.0
    small = judge_report(None, None, rows(4, 6))
    assert wilson_by_hand(4, 6)[0] < 0.5 and not small["calibrated"]["beats_chance"]


def test_judge_report_calibration_fixes_position_bias(monkeypatch):
    # a judge that always says "A" unless the content-free prior is divided out: raw first-order agreement is
    # the fraction of rows preferring a; calibrated it follows the content.
    stub_judge(monkeypatch, {("Q?", "N/A"): 0.9, ("Q?", "good"): 0.95, ("Q?", "bad"): 0.7})
    rows = [dict(prompt="p", response_a="good", response_b="bad", principle="Q?", preferred="a"),
            dict(prompt="p", response_a="bad", response_b="good", principle="Q?", preferred="b")] * 5
    rep = judge_report(None, None, rows)
    assert rep["raw_first_order"]["agreement"]["k"] == 5
    assert rep["calibrated"]["agreement"]["k"] == 10
    assert rep["prior_a"] == pytest.approx(0.9, abs=1e-6)


def test_judge_report_principles_by_kind(monkeypatch):
    stub_judge(monkeypatch, {("H?", "N/A"): 0.5, ("H?", "good"): 0.9, ("H?", "bad"): 0.1,
                             ("U?", "N/A"): 0.5, ("U?", "good"): 0.1, ("U?", "bad"): 0.9})
    rows = [dict(prompt="p", response_a="good", response_b="bad", principle="x", preferred="a", kind="harmless")]
    assert judge_report(None, None, rows, {"harmless": ["H?"]})["calibrated"]["agreement"]["k"] == 1
    assert judge_report(None, None, rows, ["U?"])["calibrated"]["agreement"]["k"] == 0
    with pytest.raises(ValueError, match="kind 'harmless' has no principles"):
        judge_report(None, None, rows, {"helpful": ["U?"]})


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no pairs"):
        compare_calibrated(None, None, [], [], [], ["Q?"])
    with pytest.raises(ValueError, match="lengths"):
        compare_calibrated(None, None, [CONV, CONV], ["a"], ["b", "c"], ["Q?"])
    with pytest.raises(ValueError, match="principles"):
        compare_calibrated(None, None, [CONV], ["a"], ["b"], [])
    with pytest.raises(ValueError, match="no labelled rows"):
        judge_report(None, None, [])
    with pytest.raises(ValueError, match=r"f.jsonl:2: missing field 'preferred'"):
        judge_report(None, None, [dict(prompt="p", response_a="a", response_b="b", principle="Q?", where="f.jsonl:2")])
    with pytest.raises(ValueError, match="lengths"):
        reference_loglik(None, None, [CONV], ["a", "b"])
    with pytest.raises(ValueError, match="no pairs"):
        reference_loglik(None, None, [], [])
    path = tmp_path / "pairs.jsonl"
    good = dict(prompt="p", response_a="a", response_b="b", principle="Q?", preferred="a")
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({k: v for k, v in good.items() if k != "response_b"}) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:3: field 'response_b'"):
        load_labelled_pairs(path)
    path.write_text(json.dumps(dict(good, preferred="c")) + "\n")
    with pytest.raises(ValueError, match=r":1: 'preferred'"):
        load_labelled_pairs(path)


def test_labelled_file_is_valid():
    rows = load_labelled_pairs("data/eval/judge_labelled.jsonl")
    assert len(rows) >= 110
    assert len({(r["prompt"], r["response_a"], r["response_b"]) for r in rows}) == len(rows)
    assert all(r["response_a"] != r["response_b"] for r in rows)
    new = rows[24:]
    assert all(r.get("kind") in ("harmless", "helpful") and r.get("reason") for r in new)


def test_reference_loglik_matches_plain_forward(tiny_chat_model_dir):
    model, tok = load_pretrained(tiny_chat_model_dir)
    model.eval()
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "tell me the answer to a much longer question, please"}],
             [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}]]
    refs = ["the answer", "a", "in the end <|im_end|> is text"]
    got = reference_loglik(model, tok, convs, refs, batch_size=2)          # padded batches of 2 and 1
    for conv, ref, g in zip(convs, refs, got):
        prompt = tok.apply_chat_template(conv, add_generation_prompt=True)
        target = list(ref.encode("utf-8"))
        # the tiny tokenizer's bytes start at id 3 and its merges only join pairs, so the plain-text ids
        # decode back to the reference's bytes; a special token would decode to its name as one id
        ids_t = tok.encode(ref)
        assert tok.decode(ids_t) == ref and 2 not in ids_t and len(ids_t) <= len(target)
        ids = torch.tensor([prompt + ids_t + [2]])                        # 2 = <|im_end|>, the end of turn
        with torch.no_grad():
            logits = model(ids).double()[0]                               # [T, V], no padding at all
        logp = torch.log_softmax(logits, -1)
        P = len(prompt)
        picked = [logp[t - 1, ids[0, t]].item() for t in range(P, ids.shape[1])]
        assert g == pytest.approx(sum(picked) / len(picked), abs=1e-4)


def test_reference_answers_cover_every_benign_prompt():
    from minicai.io import read_jsonl, read_jsonl_lines

    refs = read_jsonl("data/eval/reference_answers.jsonl", required=("prompt", "source", "reference"))
    by_source = {r["source"]: r for r in refs}
    assert len(by_source) == len(refs)
    want = [f"{f}:{ln}" for f in ("helpful.jsonl", "xstest.jsonl", "calibration.jsonl")
            for ln, row in read_jsonl_lines(f"data/eval/{f}") if row["category"] != "harmful"]
    assert sorted(want) == sorted(by_source)
    for src, r in by_source.items():
        f, ln = src.rsplit(":", 1)
        row = dict(read_jsonl_lines(f"data/eval/{f}"))[int(ln)]
        assert r["prompt"] == row["prompt"], src
        assert 60 <= len(r["reference"]) <= 1000 and r["reference"] == r["reference"].strip(), src
