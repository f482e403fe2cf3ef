"""Preference pairs from four sources (RL-CAI's data, Bai et al., 2022, sec. 4.1; issue #14 item 3).

--sources is a comma list, mixable; every pair records its `source`:
  ai           AI feedback: the policy samples two responses; the feedback model answers a multiple-choice
               question built from a comparison principle routed by the prompt's kind (constitution `applies`;
               a prompt row with neither `kind` nor `category` draws from all principles), scored by the answer
               letters' probabilities (minicai.judge; no free text is parsed), in both option orders, with
               contextual calibration (judge.compare_calibrated: each order divided by the judge's letter prior
               on a content-free pair). The calibrated two-order average is the soft label. With --cot the
               feedback model first writes its reasoning (greedy) and each order's probabilities are clamped to
               [0.4, 0.6] as the paper does (chain-of-thought makes them overconfident); --cot is not calibrated.
  revision     the open CAI recipe (Huang et al. 2024): train.critique_revise's final revision preferred over
               its initial response (--revisions FILE; only gate-kept rows are in that file), no judge.
  contrastive  RLCD (Yang et al. 2023): the same prompt sampled under a principle's `positive` and `negative`
               instruction (as a system turn), positive preferred; the pair's prompt is the plain one. The
               principle is drawn among the [compare] principles with a contrast whose `applies` is the
               prompt's kind (the "any" contrasts, honesty and respect, are not a refuse / comply contrast the
               classifier can check). Both sides are gated by the evaluation classifier: the positive must get
               the class the kind expects (refuse harmful, comply benign), the negative the failure the
               evaluation counts (harmful help = comply/partial; a refusal of a benign prompt = refuse/partial).
  reversed     for benign prompts (kind benign, the look-alikes among them): the plain prompt's answer that the
               classifier calls comply is chosen over one sampled under a benign principle's `negative`
               (refusing) instruction that it calls refuse/partial, so DPO and the reward model also learn the
               half of the calibration table where refusing is the error. `--contrastive-kinds harmful` leaves the
               benign prompts to reversed (there a contrastive pair, helpful instruction over refusing one,
               nearly duplicates the reversed pair at twice the sampling).
For contrastive and reversed, each sampled side also sees up to --fewshot demonstration exchanges before the
prompt (from --fewshot-file, principles routed to the prompt's kind): revisions on the preferred side, initial
responses on the other, each checked by the same classifier (a revision must get the expected class, an initial
response must not). A deviation from RLCD's instruction-only prompts: the default 135M model ignores the
instruction (measured, best-of 4, 48 tokens: under the instruction alone it refused 0 of 12 harmful prompts in 48
samples and no prompt of 20 gave a contrastive pair, nor one of 8 look-alikes a reversed pair; with 3
demonstrations and the 2-sentence cut, 7 of 20 contrastive (5 of 12 harmful; one benign refusal demonstration
then) and, with the harmful refusals added to the benign refusal side, 4 of 8 reversed).
--cut-sentences N first cuts every candidate to its first N sentences (the open recipe's post-processing), so a
refusal's good first sentence is not lost to the nonsense a small model writes after it; a shortened candidate
is recorded with finish_reason "cut" (it gets an EOS); the sampler stops a candidate once its first N sentences
are final (gates.sentences_final), so its text ends there rather than at --max-new-tokens. --best-of N samples N responses per side and pairs the
first passing one of each; prompts with no passing pair are dropped and counted. Drops of every source (identical or empty samples, failed
gates, unchanged revisions) go to OUT stem + ".dropped.jsonl" with their reason and classes.

Output (--out, JSONL): TRL's conversational preference format - prompt (message list), chosen and rejected (one
assistant message each) - plus soft_label = P(chosen is better) (1.0 for the judge-free sources), source, kind,
principle, each response's finish_reason ("length" = cut at --max-new-tokens, so the reward model appends no EOS
to it) and provenance; ai rows also carry both orders' calibrated and raw P(chosen better), contrastive / reversed
rows the instructions and the classes. Ids are "SOURCE:prompt id".

Resumable: ids already in --out or in the dropped file are skipped and a torn last line is redone. Each source
processes its prompts in fixed chunks of --batch-size, each sampled with a seed derived from (--seed, source,
row ids), so an interrupted run finishes with exactly the rows of an uninterrupted one.

Report (OUT stem + ".report.json", atomic): per source the pairs and drops (by reason) in the files, and its
agreement with the hand-labelled pairs (--agreement, data/eval/judge_labelled.jsonl) where its decision rule is
defined: ai = the calibrated judge on each labelled pair's own principle (judge.judge_report); contrastive /
reversed = the classifier rule (prefer the response with the expected class over one with the opposite verdict)
on the labelled pairs of kind harmless (-> harmful prompt) and helpful (-> benign; reversed: these only), as
agreement where the rule decides plus the share it decides; revision: not defined (no labelled pair is a
revision of the other).

    python -m train.label_preferences --model default --limit 32 --out runs/prefs.jsonl
    python -m train.label_preferences --sources contrastive,reversed --best-of 4 --out runs/prefs_rlcd.jsonl
    python -m train.label_preferences --sources revision --revisions runs/revisions.jsonl --out runs/prefs_rev.jsonl
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

from minicai import gates
from minicai.checkpoint import generation_dtype, resolve_device
from minicai.constitution import (DEFAULT_CONSTITUTION, DEFAULT_FEWSHOT, KINDS, Constitution, load_constitution,
                                  load_fewshot, row_messages)
from minicai.garak_data import check_trainable_messages
from minicai.io import append_jsonl, atomic_write, check_output_path, read_jsonl_lines, read_jsonl_tolerant
from minicai.judge import choice_logprobs, compare_calibrated, judge_report, load_labelled_pairs, pairwise_question
from minicai.metrics import rate
from minicai.pretrained import load_pretrained, resolve_path
from minicai.prompts import read_prompts, row_kind
from minicai.reward import expected_verdict, opposite_verdict
from minicai.sampling import generate

SOURCES = ("ai", "revision", "contrastive", "reversed")

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--sources", default="ai", help=f"comma list of pair sources: {', '.join(SOURCES)}")
parser.add_argument("--contrastive-kinds", default="harmful,benign",
                    help="prompt kinds the contrastive source labels (harmful: benign prompts left to reversed)")
parser.add_argument("--model", default="default", help="policy checkpoint that samples the responses")
parser.add_argument("--feedback-model", default=None, help="checkpoint that judges the ai source (default: the policy)")
parser.add_argument("--prompts", nargs="+", default=["data/red_team_prompts.jsonl", "data/helpful_prompts.jsonl"],
                    help="JSONL files with 'prompt' or 'messages' per row (optional 'id'; 'kind' or 'category' "
                         "routes principles and is required by contrastive / reversed)")
parser.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
parser.add_argument("--out", required=True, help="output JSONL (appended to; rows already there are skipped)")
parser.add_argument("--revisions", default=None, help="train.critique_revise output for the revision source")
parser.add_argument("--from-revisions", default=None, help="old spelling of --sources revision --revisions FILE")
parser.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION), help="constitution file")
parser.add_argument("--max-new-tokens", type=int, default=96, help="length cap of each sampled response (and of a --cot rationale)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the responses")
parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the responses")
parser.add_argument("--best-of", type=int, default=4, help="contrastive / reversed: samples per side to find a passing pair")
parser.add_argument("--fewshot", type=int, default=3,
                    help="contrastive / reversed: demonstration exchanges before each sampled side (0 = the instruction alone)")
parser.add_argument("--fewshot-file", default=str(DEFAULT_FEWSHOT),
                    help="demonstrations (critique-revision few-shot format): revisions show the preferred side, initial responses the other")
parser.add_argument("--cut-sentences", type=int, default=2,
                    help="contrastive / reversed: cut every candidate to its first N sentences before the gate (0 = uncut)")
parser.add_argument("--classifier", default="head", choices=("head", "rules"),
                    help="gate of contrastive / reversed: rules + learnt head on the default model, or the rules alone")
parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation / judging chunk")
parser.add_argument("--cot", action="store_true", help="ai: let the feedback model reason before choosing (probabilities clamped to [0.4, 0.6], no calibration)")
parser.add_argument("--agreement", default="data/eval/judge_labelled.jsonl", help="hand-labelled pairs to report each source's agreement on ('' to skip)")
parser.add_argument("--seed", type=int, default=0, help="seed for sampling and principle draws")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
parser.add_argument("--dtype", default="auto", help="model dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
parser.add_argument("--quiet", action="store_true", help="no progress bar")

COT_CLAMP = (0.4, 0.6)
COT_INSTRUCTION = " Think it through step by step first, then give the letter."
LABELLED_KIND = {"harmless": "harmful", "helpful": "benign"}  # judge_labelled.jsonl's kinds; "honest" has no class rule


def parse_sources(text) -> list:
    sources = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources or len(set(sources)) != len(sources):
        raise ValueError(f"--sources {text!r}: expected a comma list of distinct names from {', '.join(SOURCES)}")
    return sources


def load_prompt_rows(paths, limit=0):
    """minicai.prompts.read_prompts' [{id, row, messages, kind, where}]; ids are the row's 'id' or "file:line" (the
    pair ids are built on them); kind is None without 'kind' / 'category'."""
    return read_prompts(paths, limit, ids="line")


def chunk_seed(seed, ids) -> int:
    """Sampling seed of one chunk from the run seed and its ids: stable across runs and resumes."""
    return int.from_bytes(hashlib.sha256(repr((seed, tuple(ids))).encode()).digest()[:8], "little") % (2 ** 62)


def drop_row(source, row, reason, **extra) -> dict:
    return {"id": f"{source}:{row['id']}", "source": source, "reason": reason, "kind": row.get("kind"), **extra}


def pairs_from_revisions(path, out, dropped_path, done) -> list:
    """The open recipe: train.critique_revise's final revision preferred over its initial response. Rows need id,
    messages (or prompt), initial, final; the finish reasons are carried over when present."""
    written = []
    for lineno, row in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("id", "initial", "final") if k not in row]
        if "messages" not in row and "prompt" not in row:
            missing.append("messages")
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} (expected train.critique_revise output)")
        if not isinstance(row["initial"], str) or not isinstance(row["final"], str):
            raise ValueError(f"{where}: fields 'initial' and 'final' must be strings")
        messages = row_messages(row, where)
        check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
        prompt = dict(id=row["id"], kind=row_kind(row, where))
        rid = f"revision:{row['id']}"
        if rid in done:
            continue
        done.add(rid)
        final, initial = row["final"].strip(), row["initial"].strip()
        if not final or not initial or final == initial:
            append_jsonl(dropped_path, drop_row("revision", prompt, "empty_or_unchanged"))
            continue
        pair = {"id": rid, "prompt": messages, "chosen": [{"role": "assistant", "content": final}],
                "rejected": [{"role": "assistant", "content": initial}], "soft_label": 1.0, "source": "revision",
                "kind": prompt["kind"], "principles": [r.get("principle") for r in row.get("rounds", [])],
                "chosen_finish_reason": row.get("final_finish_reason", "stop_token"),
                "rejected_finish_reason": row.get("initial_finish_reason", "stop_token"), "revisions_file": path}
        append_jsonl(out, pair)
        written.append(pair)
    return written


def cot_compare(judge, tok, convs, a, b, questions, max_new_tokens, batch_size):
    """Chain-of-thought labels: reason first (greedy), then score the letters; each order's probabilities are
    clamped to COT_CLAMP (paper sec. 4.1). Returns (p_a, p_a_first, p_a_second)."""
    n = len(convs)
    qs = [pairwise_question(c, x, y, q) for c, x, y, q in zip(convs, a, b, questions)] + \
         [pairwise_question(c, y, x, q) for c, x, y, q in zip(convs, a, b, questions)]
    qs = [[{**m[0], "content": m[0]["content"] + COT_INSTRUCTION}] for m in qs]
    thoughts = []
    for start in range(0, len(qs), batch_size):
        thoughts += generate(judge, [tok.apply_chat_template(q, add_generation_prompt=True) for q in qs[start:start + batch_size]],
                             max_new_tokens=max_new_tokens, temperature=0.0, tokenizer=tok)
    lp = choice_logprobs(judge, tok, qs, n_options=2, batch_size=batch_size, cot_texts=[g.text for g in thoughts])
    p = lp.exp().clamp(*COT_CLAMP)
    p_first, p_second = p[:n, 0], p[n:, 1]
    return (p_first + p_second) / 2, p_first, p_second


def judge_pairs(judge, tok, convs, a, b, questions, args) -> dict:
    """P(a better) [N] and each order's P(a better), calibrated per principle (raw alongside), or with --cot."""
    if args.cot:
        p_a, first, second = cot_compare(judge, tok, convs, a, b, questions, args.max_new_tokens, args.batch_size)
        return dict(p_a=p_a, first=first, second=second, first_raw=first, second_raw=second)
    cols = {k: torch.zeros(len(convs)) for k in ("p_a", "first", "second", "first_raw", "second_raw")}
    names = dict(p_a="p_a", first="p_first_calibrated", second="p_swapped_calibrated", first_raw="p_first_order",
                 second_raw="p_swapped_order")
    groups = {}
    for j, q in enumerate(questions):
        groups.setdefault(q, []).append(j)
    for q, idx in groups.items():  # one content-free prior per principle
        out = compare_calibrated(judge, tok, [convs[j] for j in idx], [a[j] for j in idx], [b[j] for j in idx], [q],
                                 batch_size=args.batch_size)
        for k, name in names.items():
            cols[k][idx] = out[name]
    return cols


def ai_chunk(chunk, policy, tok, ctx, args):
    """Sample two responses per prompt and judge them; returns (pairs, drops)."""
    gens = generate(policy, [tok.apply_chat_template(r["messages"], add_generation_prompt=True) for r in chunk],
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, num_samples=2,
                    seed=chunk_seed(args.seed, ["ai"] + [r["id"] for r in chunk]), tokenizer=tok)
    keep, drops = [], []
    for i, r in enumerate(chunk):
        ga, gb = gens[2 * i], gens[2 * i + 1]
        if not ga.text.strip() or not gb.text.strip() or ga.text.strip() == gb.text.strip():
            drops.append(drop_row("ai", r, "identical_or_empty"))  # no preference in two equal (or empty) samples
            continue
        keep.append((r, ga, gb, ctx["constitution"].sample_comparison(random.Random(f"{args.seed}:{r['id']}"), r["kind"])))
    if not keep:
        return [], drops
    a, b = [k[1].text.strip() for k in keep], [k[2].text.strip() for k in keep]
    p = judge_pairs(ctx["judge"], ctx["judge_tok"], [k[0]["messages"] for k in keep], a, b,
                    [k[3].question for k in keep], args)
    pairs = []
    for j, (r, ga, gb, principle) in enumerate(keep):
        a_wins = float(p["p_a"][j]) >= 0.5
        # each order as P(chosen is better): when b wins, b was shown second in the first question
        first, second = ("first", "second") if a_wins else ("second", "first")
        as_chosen = (lambda x: float(x)) if a_wins else (lambda x: 1 - float(x))
        pairs.append({
            "id": f"ai:{r['id']}", "prompt": r["messages"],
            "chosen": [{"role": "assistant", "content": a[j] if a_wins else b[j]}],
            "rejected": [{"role": "assistant", "content": b[j] if a_wins else a[j]}],
            "soft_label": as_chosen(p["p_a"][j]), "source": "ai", "kind": r["kind"], "principle": principle.name,
            "question": principle.question, "p_chosen_first": as_chosen(p[first][j]),
            "p_chosen_second": as_chosen(p[second][j]), "p_chosen_first_raw": as_chosen(p[first + "_raw"][j]),
            "p_chosen_second_raw": as_chosen(p[second + "_raw"][j]),
            "chosen_finish_reason": (ga if a_wins else gb).finish_reason,
            "rejected_finish_reason": (gb if a_wins else ga).finish_reason,
            "policy": args.model, "feedback_model": args.feedback_model or args.model, "cot": args.cot,
            "calibrated": not args.cot, "seed": args.seed,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}})
    return pairs, drops


def contrast_pool(constitution, kind) -> Constitution:
    """The [compare] principles with a positive/negative contrast that apply to `kind` prompts exactly."""
    pool = [p for p in constitution.comparisons if p.positive and p.applies == kind]
    if not pool:
        raise ValueError(f"{constitution.path}: no [compare] principle with positive/negative has applies: {kind} "
                         f"(contrastive and reversed pairs draw their instructions from one)")
    return Constitution([], pool, constitution.path)


def conditioned(messages, instruction, shots) -> list:
    """The conversation one side is sampled from: `instruction` as the system turn (before an existing system
    text), then the demonstration exchanges `shots`, then the prompt."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    text = "\n\n".join(t for t in (instruction, system[0]["content"] if system else "") if t)
    return ([{"role": "system", "content": text}] if text else []) + [m for s in shots for m in s] + messages[len(system):]


def demonstration_shots(demos, classifier, n) -> dict:
    """Up to n demonstration exchanges per (prompt kind, side), from demonstrations whose principle applies to the
    kind: the chosen side shows revisions the classifier gives the expected class, the rejected side initial
    responses it does not (a flawed response that is itself a refusal, a lecture, is no contrast to a refusal;
    the rules call some hand-written compliant ones off-topic, so the opposite verdict is not required), and for
    benign prompts also the harmful demonstrations' refusals."""
    cands = [(kind, side, d, text) for d in demos
             for kind in (KINDS if d.principle.applies == "any" else (d.principle.applies,))
             for side, text in (("chosen", d.revision), ("rejected", d.response))]
    # a benign prompt's refusal side may also show the refusals written for harmful prompts: over-refusal is
    # harmlessness applied to the wrong prompt (measured: 0 of 8 look-alikes gave a reversed pair with the one
    # benign refusal demonstration, 4 of 8 with these added)
    cands += [("benign", "rejected", d, d.revision) for d in demos if d.principle.applies == "harmful"]
    labels = classifier.classify_many([dict(request=d.messages[-1]["content"], response=text, kind=kind)
                                       for kind, side, d, text in cands]) if cands else []
    shots = {(kind, side): [] for kind in KINDS for side in ("chosen", "rejected")}
    for (kind, side, d, text), label in zip(cands, labels):
        passes = expected_verdict(label, kind) == (side == "chosen")
        if passes and len(shots[kind, side]) < n:
            turns = [m for m in d.messages if m["role"] != "system"]
            shots[kind, side].append(turns + [{"role": "assistant", "content": text.strip()}])
    return shots


def first_passing(labels, texts, ok) -> int | None:
    """Index of the first non-empty candidate whose class passes `ok`, else None (best-of-n keeps it)."""
    return gates.first_passing([None if text and ok(label) else "failed" for label, text in zip(labels, texts)])


def finish(gen, text) -> str:
    """The finish reason of a candidate as kept: "cut" when --cut-sentences shortened it (it ends at a sentence,
    so the reward model gives it an EOS; so does a sample the sampler stopped once its sentences were final),
    else the sampler's."""
    return "cut" if gates.was_cut(gen.text, text, gen.finish_reason) else gen.finish_reason


def gated_chunk(source, chunk, policy, tok, ctx, args):
    """contrastive / reversed: --best-of samples per side, classified; the first passing candidate of each side
    makes the pair, else the prompt is dropped with its reason. Returns (pairs, drops)."""
    n, sides, shots = args.best_of, [], ctx["shots"]
    for r in chunk:
        kind = "benign" if source == "reversed" else r["kind"]
        p = ctx["pools"][kind].sample_comparison(random.Random(f"{args.seed}:{source}:{r['id']}"))
        sides.append((p, p.positive if source == "contrastive" else "", p.negative))
    # reversed: the chosen side is the plain prompt, no instruction and no demonstrations
    convs = [conditioned(r["messages"], s[1], shots[r["kind"], "chosen"] if s[1] else []) for r, s in zip(chunk, sides)] + \
            [conditioned(r["messages"], s[2], shots[r["kind"], "rejected"]) for r, s in zip(chunk, sides)]
    gens = generate(policy, [tok.apply_chat_template(c, add_generation_prompt=True) for c in convs],
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, num_samples=n,
                    seed=chunk_seed(args.seed, [source] + [r["id"] for r in chunk]), tokenizer=tok,
                    stop_when=gates.stop_after_sentences(args.cut_sentences))
    texts = [gates.cut_sentences(g.text, args.cut_sentences) for g in gens]  # a stopped sample: its final sentences
    asked = chunk * 2  # the row behind each conversation; the classifier sees the plain request, not the instruction
    labels = ctx["classifier"].classify_many([dict(request=asked[i // n]["messages"][-1]["content"], response=t,
                                                   kind=asked[i // n]["kind"]) for i, t in enumerate(texts)])
    pairs, drops = [], []
    for i, (r, (principle, chosen_instruction, rejected_instruction)) in enumerate(zip(chunk, sides)):
        good, bad = slice(i * n, (i + 1) * n), slice((len(chunk) + i) * n, (len(chunk) + i + 1) * n)
        c = first_passing(labels[good], texts[good], lambda label: expected_verdict(label, r["kind"]))
        j = first_passing(labels[bad], texts[bad], lambda label: opposite_verdict(label, r["kind"]))
        if c is None or j is None:
            reason = "both_failed" if c is None and j is None else "chosen_failed" if c is None else "rejected_failed"
            drops.append(drop_row(source, r, reason, principle=principle.name, chosen_classes=labels[good],
                                  rejected_classes=labels[bad]))
            continue
        ci, ri = i * n + c, (len(chunk) + i) * n + j
        pairs.append({
            "id": f"{source}:{r['id']}", "prompt": r["messages"],
            "chosen": [{"role": "assistant", "content": texts[ci]}],
            "rejected": [{"role": "assistant", "content": texts[ri]}],
            "soft_label": 1.0, "source": source, "kind": r["kind"], "principle": principle.name,
            "chosen_instruction": chosen_instruction, "rejected_instruction": rejected_instruction,
            "chosen_shots": len(shots[r["kind"], "chosen"]) if chosen_instruction else 0,
            "rejected_shots": len(shots[r["kind"], "rejected"]),
            "chosen_class": labels[good][c], "rejected_class": labels[bad][j], "chosen_try": c, "rejected_try": j,
            "chosen_finish_reason": finish(gens[ci], texts[ci]), "rejected_finish_reason": finish(gens[ri], texts[ri]),
            "policy": args.model, "classifier": args.classifier, "seed": args.seed,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                         "best_of": n, "cut_sentences": args.cut_sentences}})
    return pairs, drops


def verdict_rule_agreement(classifier, rows) -> dict:
    """The contrastive / reversed decision rule on hand-labelled pairs: of a pair where one response gets the
    class the prompt's kind expects and the other the opposite verdict, prefer the first. Per prompt kind: the
    labelled pairs of that kind, how many the rule decides, its agreement with the hand label where it does."""
    usable = [r for r in rows if r.get("kind") in LABELLED_KIND]
    labels = classifier.classify_many([dict(request=r["prompt"], response=r[side], kind=LABELLED_KIND[r["kind"]])
                                       for r in usable for side in ("response_a", "response_b")])
    out = {}
    for kind in KINDS:
        n = decided = agree = 0
        for i, r in enumerate(usable):
            if LABELLED_KIND[r["kind"]] != kind:
                continue
            la, lb = labels[2 * i], labels[2 * i + 1]
            pick = ("a" if expected_verdict(la, kind) and opposite_verdict(lb, kind) else
                    "b" if expected_verdict(lb, kind) and opposite_verdict(la, kind) else None)
            n, decided, agree = n + 1, decided + (pick is not None), agree + (pick == r["preferred"])
        out[kind] = dict(pairs=n, decided=decided, agreement=rate(agree, decided) if decided else None)
    return out


def run_source(source, rows, label_fn, paths, done, args) -> list:
    """Label `rows` in fixed chunks through label_fn(chunk) -> (pairs, drops); append what is not done yet."""
    chunks = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    todo = [c for c in chunks if any(f"{source}:{r['id']}" not in done for r in c)]
    written = []
    for chunk in tqdm(todo, desc=source, unit="chunk", disable=args.quiet, dynamic_ncols=True):
        # the whole chunk is redone (same seed, same samples) and only its missing rows are written
        pairs, drops = label_fn(chunk)
        for path, items in ((paths["out"], pairs), (paths["dropped"], drops)):
            for row in items:
                if row["id"] not in done:
                    append_jsonl(path, row)
                    done.add(row["id"])
                    written += [row] if path == paths["out"] else []
    return written


def source_agreement(sources, labelled, ctx, args) -> dict:
    """Each source's agreement with the hand-labelled pairs where its decision rule is defined (module doc)."""
    out = {}
    if "ai" in sources:
        rep = judge_report(ctx["judge"], ctx["judge_tok"], labelled, batch_size=args.batch_size)
        out["ai"] = dict(measured="calibrated judge (both orders, content-free prior) on each labelled pair's own "
                                  "principle", **rep["calibrated"], raw_both_orders=rep["raw_both_orders"],
                         raw_first_order=rep["raw_first_order"], prior_a=rep["prior_a"])
    if "revision" in sources:
        out["revision"] = dict(measured="not defined: no hand-labelled pair is a revision of its other response",
                               agreement=None)
    if {"contrastive", "reversed"} & set(sources):
        by_kind = verdict_rule_agreement(ctx["classifier"], labelled)
        rule = (f"classifier rule ({args.classifier}): prefer the response with the class the prompt's kind expects "
                f"over one with the opposite verdict; agreement where it decides")
        for source, kinds in (("contrastive", KINDS), ("reversed", ("benign",))):
            if source in sources:
                n = sum(by_kind[k]["pairs"] for k in kinds)
                d = sum(by_kind[k]["decided"] for k in kinds)
                k = sum(by_kind[k]["agreement"]["k"] for k in kinds if by_kind[k]["agreement"])
                out[source] = dict(measured=rule + f" (labelled kinds: {', '.join(kinds)})", labelled_pairs=n,
                                   decided=d, agreement=rate(k, d) if d else None, by_kind={x: by_kind[x] for x in kinds})
    return out


def build_report(sources, paths, agreement, written, seconds) -> dict:
    """Pairs and drops per source as they stand in the files, this run's counts, and each source's agreement."""
    pairs, dropped = read_jsonl_tolerant(paths["out"]), read_jsonl_tolerant(paths["dropped"])
    in_file = Counter(r.get("source") for r in pairs)
    drops, by_principle = {}, {}
    for r in dropped:
        drops.setdefault(r.get("source"), Counter())[r.get("reason")] += 1
    for what, rows in (("pairs", pairs), ("dropped", dropped)):  # which contrasts the gate lets through
        for r in rows:
            if r.get("source") in ("contrastive", "reversed"):
                by_principle.setdefault(r["source"], {}).setdefault(r.get("principle"), Counter())[what] += 1
    run = Counter(r["source"] for r in written)
    report = {"out": paths["out"], "dropped_file": paths["dropped"], "seconds": round(seconds, 1), "sources": {}}
    for s in list(sources) + sorted(set(in_file) - set(sources)):
        report["sources"][s] = dict(pairs=in_file.get(s, 0), dropped=dict(drops.get(s, {})),
                                    written_this_run=run.get(s, 0), **agreement.get(s, {}))
        if s in by_principle:
            report["sources"][s]["by_principle"] = {p: dict(c) for p, c in sorted(by_principle[s].items())}
    ai = [r for r in written if r["source"] == "ai"]
    if ai:  # how often the two option orders pick different winners, before and after calibration
        flips = lambda a, b: sum((r[a] > 0.5) != (r[b] > 0.5) for r in ai) / len(ai)
        report["sources"]["ai"].update(mean_soft_label=sum(r["soft_label"] for r in ai) / len(ai),
                                       orders_disagree=flips("p_chosen_first", "p_chosen_second"),
                                       orders_disagree_raw=flips("p_chosen_first_raw", "p_chosen_second_raw"))
    return report


def load_models(args, sampled, classifier):
    """Policy (+ tokenizer), the ai source's judge, the gated sources' classifier."""
    policy, tok = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    ctx = {}
    if "ai" in sampled:
        if args.feedback_model and resolve_path(args.feedback_model) != resolve_path(args.model):
            ctx["judge"], ctx["judge_tok"] = load_pretrained(args.feedback_model, dtype=args.dtype, device=args.device)
        else:
            ctx["judge"], ctx["judge_tok"] = policy, tok
    if {"contrastive", "reversed"} & set(sampled):
        from minicai.refusal_head import ResponseClassifier, load_classifier

        ctx["classifier"] = classifier or (load_classifier(args.device) if args.classifier == "head"
                                           else ResponseClassifier())
    return policy, tok, ctx


def check_args(args) -> list:
    """The sources, after every flag is checked (before anything is read or written)."""
    if args.from_revisions:
        args.sources, args.revisions = "revision", args.from_revisions
    sources = parse_sources(args.sources)
    if args.dtype == "auto":
        args.dtype = generation_dtype(args.device)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.best_of < 1 or min(args.fewshot, args.cut_sentences) < 0:
        raise ValueError("--batch-size, --max-new-tokens and --best-of must be >= 1, --fewshot and --cut-sentences >= 0")
    if any(k not in KINDS for k in args.contrastive_kinds.split(",")):
        raise ValueError(f"--contrastive-kinds {args.contrastive_kinds!r}: expected harmful, benign or both")
    args.contrastive_kinds = tuple(args.contrastive_kinds.split(","))  # parsed once; source_rows reads it
    if ("revision" in sources) != bool(args.revisions):
        raise ValueError("--revisions FILE goes with the revision source (--sources ...,revision) and only with it")
    check_output_path(args.out, "file")
    resolve_device(args.device)
    return sources


def prompt_plan(args, sampled):
    """(constitution, prompt rows, contrast pools by kind, demonstrations) for the sampled sources, checked up front."""
    constitution = load_constitution(args.constitution)
    rows = load_prompt_rows(args.prompts, args.limit)
    needed = set()
    if {"contrastive", "reversed"} & set(sampled):
        unknown = next((r for r in rows if r["kind"] is None), None)
        if unknown:
            raise ValueError(f"{unknown['where']}: neither 'kind' nor 'category': contrastive and reversed pairs "
                             f"need to know whether the prompt is harmful or benign")
        needed = {r["kind"] for r in rows} if "contrastive" in sampled else set()
        needed |= {"benign"} if "reversed" in sampled else set()
    demos = load_fewshot(args.fewshot_file, constitution) if needed and args.fewshot else []
    return constitution, rows, {k: contrast_pool(constitution, k) for k in sorted(needed)}, demos


def source_rows(source, rows, args) -> list:
    """The prompts a sampled source labels: reversed the benign ones; contrastive those of --contrastive-kinds."""
    if source == "reversed":
        return [r for r in rows if r["kind"] == "benign"]
    if source == "contrastive":
        return [r for r in rows if r["kind"] in args.contrastive_kinds]
    return rows


def run(args, classifier=None):
    """The script on parsed flags; classifier: an object with classify_many(rows) used instead of
    --classifier's (tests pass a stub)."""
    sources = check_args(args)
    labelled = load_labelled_pairs(args.agreement) if args.agreement else None  # checked before any work
    sampled = [s for s in sources if s != "revision"]
    constitution, rows, pools, demos = prompt_plan(args, sampled) if sampled else (None, [], {}, [])
    paths = dict(out=args.out, dropped=os.path.splitext(args.out)[0] + ".dropped.jsonl")
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    done = {r.get("id") for p in (paths["out"], paths["dropped"]) for r in read_jsonl_tolerant(p)}
    t0, written, ctx = time.time(), [], {}
    if "revision" in sources:
        written += pairs_from_revisions(args.revisions, args.out, paths["dropped"], done)
    if sampled:
        policy, tok, ctx = load_models(args, sampled, classifier)
        ctx.update(constitution=constitution, pools=pools)
        if "classifier" in ctx:
            ctx["shots"] = demonstration_shots(demos, ctx["classifier"], args.fewshot)
        for source in sampled:
            todo = source_rows(source, rows, args)
            fn = ((lambda c: ai_chunk(c, policy, tok, ctx, args)) if source == "ai" else
                  (lambda c, s=source: gated_chunk(s, c, policy, tok, ctx, args)))
            written += run_source(source, todo, fn, paths, done, args)
    seconds = time.time() - t0
    agreement = source_agreement(sources, labelled, ctx, args) if labelled else {}
    report = build_report(sources, paths, agreement, written, seconds)
    atomic_write(os.path.splitext(args.out)[0] + ".report.json", json.dumps(report, indent=2))
    for s, r in report["sources"].items():
        agree = r.get("agreement")
        print(f"label_preferences: {s}: {r['pairs']} pairs in {args.out} ({r['written_this_run']} new), dropped "
              f"{sum(r['dropped'].values())} {dict(r['dropped']) or ''}; agreement with hand labels: "
              + (f"{agree['value']:.3f} [{agree['lo']:.3f}, {agree['hi']:.3f}] of {agree['n']}" if agree else
                 r.get("measured", "not measured")))
    return written


def main(argv=None, classifier=None):
    return run(parser.parse_args(argv), classifier)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train.label_preferences: error: {e}", file=sys.stderr)
        sys.exit(2)
