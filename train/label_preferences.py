"""AI preference labels from the constitution (RL-CAI, Bai et al., 2022, sec. 4.1).

For each prompt the policy samples two responses; the feedback model answers a multiple-choice question built
from a comparison principle drawn at random from the constitution ("Which response is less harmful?"),
scored by the probabilities of the answer letters (minicai.judge; no free text is parsed). The question is
asked in both option orders and the two probabilities that response a is better are averaged, which cancels
the feedback model's position bias; that average is the soft label. With --cot the feedback model first
writes its reasoning (greedy) and each order's probabilities are clamped to [0.4, 0.6], as the paper does
because chain-of-thought makes them overconfident.

Output (--out, JSONL): TRL's conversational preference format - prompt (message list), chosen and rejected
(one assistant message each) - plus soft_label = P(chosen is better) in [0.5, 1], the principle, both
orders' probabilities that the chosen response is better (p_chosen_first: chosen shown as option A;
p_chosen_second: shown as B), each response's finish_reason ("length" = cut at --max-new-tokens, so the
reward model appends no EOS to it), and provenance. Pairs whose two samples are identical or empty are
skipped and counted: they carry no preference.

Resumable: rows whose id is already in --out are skipped and a torn last line is redone. Prompts are
processed in fixed chunks of --batch-size over the whole prompt list, each chunk sampled with a seed
derived from (--seed, its row ids), so an interrupted run finishes with exactly the rows of an
uninterrupted one.

At the end the feedback model's agreement with hand-labelled pairs (--agreement,
data/eval/judge_labelled.jsonl) is printed and written to OUT.agreement.json.

--from-revisions FILE instead writes the open-source recipe's pairs from train.critique_revise output
(final revision = chosen, initial response = rejected, soft_label 1.0), no model needed, so both label
sources can be compared downstream.

    python -m train.label_preferences --model default --limit 32 --out runs/prefs.jsonl
    python -m train.label_preferences --from-revisions runs/revisions.jsonl --out runs/prefs_revisions.jsonl
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import torch
from tqdm import tqdm

from minicai.checkpoint import generation_dtype, load_pretrained, resolve_device, resolve_path
from minicai.constitution import DEFAULT_CONSTITUTION, as_messages, load_constitution, row_messages
from minicai.garak_data import check_trainable_messages
from minicai.io import append_jsonl, atomic_write, check_output_path, read_jsonl_lines, read_jsonl_tolerant
from minicai.judge import choice_logprobs, compare_pairs, load_labelled_pairs, pairwise_question
from minicai.sampling import generate

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="default", help="policy checkpoint that samples the two responses")
parser.add_argument("--feedback-model", default=None, help="checkpoint that judges (default: the policy itself)")
parser.add_argument("--prompts", nargs="+", default=["data/red_team_prompts.jsonl", "data/helpful_prompts.jsonl"],
                    help="JSONL files with 'prompt' or 'messages' per row (optional 'id')")
parser.add_argument("--limit", type=int, default=0, help="use the first N prompts (0 = all)")
parser.add_argument("--out", required=True, help="output JSONL (appended to; rows already there are skipped)")
parser.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION), help="constitution file")
parser.add_argument("--max-new-tokens", type=int, default=96, help="length cap of each sampled response (and of a --cot rationale)")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the two responses")
parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling of the two responses")
parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation / judging chunk")
parser.add_argument("--cot", action="store_true", help="let the feedback model reason before choosing (probabilities clamped to [0.4, 0.6])")
parser.add_argument("--from-revisions", default=None, help="critique_revise output: write (final revision, initial) pairs instead of sampling")
parser.add_argument("--agreement", default="data/eval/judge_labelled.jsonl", help="hand-labelled pairs to report the labeller's agreement on ('' to skip)")
parser.add_argument("--seed", type=int, default=0, help="seed for sampling and principle draws")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
parser.add_argument("--dtype", default="auto", help="model dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
parser.add_argument("--quiet", action="store_true", help="no progress bar")

COT_CLAMP = (0.4, 0.6)
COT_INSTRUCTION = " Think it through step by step first, then give the letter."


def load_prompt_rows(paths, limit=0):
    """(id, messages) for the prompt files' rows; ids are the row's 'id' or "file:line". Errors name file:line."""
    rows, seen = [], set()
    for path in paths:
        for lineno, row in read_jsonl_lines(path):
            where = f"{path}:{lineno}"
            messages = row_messages(row, where)
            check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
            rid = str(row.get("id", f"{os.path.basename(path)}:{lineno}"))
            if rid in seen:
                raise ValueError(f"{where}: duplicate id {rid!r}")
            seen.add(rid)
            rows.append((rid, messages))
    if not rows:
        raise ValueError(f"{', '.join(paths)}: no prompts (no rows)")
    return rows[:limit] if limit else rows


def chunk_seed(seed, ids) -> int:
    """Sampling seed of one chunk from the run seed and its row ids: stable across runs and resumes."""
    return int.from_bytes(hashlib.sha256(repr((seed, tuple(ids))).encode()).digest()[:8], "little") % (2 ** 62)


def pairs_from_revisions(path, out):
    """The open-source recipe: train.critique_revise's final revision preferred over its initial response.
    Rows need id, messages (or prompt), initial, final; the finish reasons are carried over when present."""
    done = {r.get("id") for r in read_jsonl_tolerant(out)}
    written = skipped = 0
    for lineno, row in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("id", "initial", "final") if k not in row]
        if "messages" not in row and "prompt" not in row:
            missing.append("messages")
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing} (expected train.critique_revise output)")
        if not isinstance(row["initial"], str) or not isinstance(row["final"], str):
            raise ValueError(f"{where}: fields 'initial' and 'final' must be strings")
        try:
            messages = as_messages(row["messages"] if "messages" in row else row["prompt"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        rid = f"rev:{row['id']}"
        if rid in done:
            continue
        final, initial = row["final"].strip(), row["initial"].strip()
        if not final or not initial or final == initial:
            skipped += 1
            continue
        done.add(rid)
        append_jsonl(out, {
            "id": rid, "prompt": messages,
            "chosen": [{"role": "assistant", "content": final}],
            "rejected": [{"role": "assistant", "content": initial}],
            "soft_label": 1.0, "source": "revisions",
            "principles": [r.get("principle") for r in row.get("rounds", [])],
            "chosen_finish_reason": row.get("final_finish_reason", "stop_token"),
            "rejected_finish_reason": row.get("initial_finish_reason", "stop_token"),
            "revisions_file": path})
        written += 1
    print(f"label_preferences: wrote {written} revision pairs to {out}; skipped {skipped} with an empty or unchanged revision")
    return written, skipped


def labeller_agreement(model, tokenizer, path, batch_size, rows=None):
    """Fraction of hand-labelled pairs where the feedback model (both orders averaged) puts > 0.5 on the
    preferred response; also the agreement of each order alone, which shows the position bias."""
    rows = rows if rows is not None else load_labelled_pairs(path)
    p_a, p_first, p_second = compare_pairs(model, tokenizer, [as_messages(r["prompt"]) for r in rows],
                                           [r["response_a"] for r in rows], [r["response_b"] for r in rows],
                                           [r["principle"] for r in rows], batch_size=batch_size)
    truth = torch.tensor([r["preferred"] == "a" for r in rows])

    def agree(p):
        return float(((p > 0.5) == truth).float().mean())

    return {"agreement": agree(p_a), "agreement_a_shown_first": agree(p_first),
            "agreement_a_shown_second": agree(p_second), "chance": 0.5, "n": len(rows), "file": path}


def cot_compare(judge, tok, convs, a, b, questions, max_new_tokens, batch_size):
    """Chain-of-thought labels: reason first (greedy), then score the letters; each order's probabilities are
    clamped to COT_CLAMP (paper sec. 4.1). Returns (p_a, p_a_first, p_a_second) like compare_pairs."""
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


def label_chunk(chunk, policy, tok, judge, judge_tok, constitution, args):
    """Sample two responses per prompt and judge them; returns (output rows, number skipped)."""
    prompt_ids = [tok.apply_chat_template(m, add_generation_prompt=True) for _, m in chunk]
    gens = generate(policy, prompt_ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, num_samples=2, seed=chunk_seed(args.seed, [rid for rid, _ in chunk]),
                    tokenizer=tok)
    keep, a, b, questions, principles, finish = [], [], [], [], [], []
    for i, (rid, messages) in enumerate(chunk):
        ga, gb = gens[2 * i], gens[2 * i + 1]
        ra, rb = ga.text.strip(), gb.text.strip()
        if not ra or not rb or ra == rb:
            continue  # no preference to learn from two identical (or empty) responses
        principle = constitution.sample_comparison(random.Random(f"{args.seed}:{rid}"))
        keep.append((rid, messages))
        a.append(ra), b.append(rb), questions.append(principle.question), principles.append(principle.name)
        finish.append((ga.finish_reason, gb.finish_reason))
    if not keep:
        return [], len(chunk)
    convs = [m for _, m in keep]
    if args.cot:
        p_a, p_first, p_second = cot_compare(judge, judge_tok, convs, a, b, questions, args.max_new_tokens, args.batch_size)
    else:
        p_a, p_first, p_second = compare_pairs(judge, judge_tok, convs, a, b, questions, batch_size=args.batch_size)
    rows = []
    for j, (rid, messages) in enumerate(keep):
        pa, a_wins = float(p_a[j]), float(p_a[j]) >= 0.5
        # both orders as P(chosen is better): when b wins, b was shown second in the first question
        p_chosen_first = float(p_first[j]) if a_wins else 1 - float(p_second[j])
        p_chosen_second = float(p_second[j]) if a_wins else 1 - float(p_first[j])
        rows.append({
            "id": rid, "prompt": messages,
            "chosen": [{"role": "assistant", "content": a[j] if a_wins else b[j]}],
            "rejected": [{"role": "assistant", "content": b[j] if a_wins else a[j]}],
            "soft_label": pa if a_wins else 1 - pa, "principle": principles[j], "question": questions[j],
            "p_chosen_first": p_chosen_first, "p_chosen_second": p_chosen_second,
            "chosen_finish_reason": finish[j][0 if a_wins else 1],
            "rejected_finish_reason": finish[j][1 if a_wins else 0],
            "source": "ai_feedback", "policy": args.model, "feedback_model": args.feedback_model or args.model,
            "cot": args.cot, "seed": args.seed,
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}})
    return rows, len(chunk) - len(keep)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = generation_dtype(args.device)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be >= 1")
    check_output_path(args.out, "file")
    resolve_device(args.device)
    agreement_rows = load_labelled_pairs(args.agreement) if args.agreement else None  # checked before any work
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.from_revisions:
        return pairs_from_revisions(args.from_revisions, args.out)
    constitution = load_constitution(args.constitution)
    rows = load_prompt_rows(args.prompts, args.limit)
    done = {r.get("id") for r in read_jsonl_tolerant(args.out)}
    chunks = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    todo = [c for c in chunks if any(rid not in done for rid, _ in c)]
    n_todo = sum(rid not in done for c in todo for rid, _ in c)
    print(f"label_preferences: {len(rows)} prompts, {len(rows) - n_todo} already in {args.out}, {n_todo} to do")

    t0 = time.time()
    policy, tok = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    if args.feedback_model and resolve_path(args.feedback_model) != resolve_path(args.model):
        judge, judge_tok = load_pretrained(args.feedback_model, dtype=args.dtype, device=args.device)
    else:
        judge, judge_tok = policy, tok
    written, skipped = [], 0
    bar = tqdm(total=n_todo, unit="prompt", disable=args.quiet, dynamic_ncols=True)
    for chunk in todo:
        # the whole chunk is redone (same seed, same samples) and only its missing rows are written
        out_rows, n_skipped = label_chunk(chunk, policy, tok, judge, judge_tok, constitution, args)
        for r in out_rows:
            if r["id"] not in done:
                append_jsonl(args.out, r)
                written.append(r)
        skipped += n_skipped
        bar.update(sum(rid not in done for rid, _ in chunk))
        done.update(rid for rid, _ in chunk)
    bar.close()
    t_label = time.time() - t0
    summary = {"written": len(written), "skipped_identical_or_empty": skipped, "seconds": round(t_label, 1)}
    if written:
        soft = torch.tensor([r["soft_label"] for r in written])
        flips = sum((r["p_chosen_first"] > 0.5) != (r["p_chosen_second"] > 0.5) for r in written)
        summary.update(mean_soft_label=float(soft.mean()), orders_disagree=flips / len(written))
    print(f"label_preferences: wrote {len(written)} pairs in {t_label:.1f} s; skipped {skipped} prompts whose two "
          f"samples were identical or empty" + (f"; mean soft label {summary['mean_soft_label']:.3f}, the two option "
          f"orders pick different winners on {summary['orders_disagree']:.0%} of pairs" if written else ""))
    if args.agreement:
        t1 = time.time()
        report = labeller_agreement(judge, judge_tok, args.agreement, args.batch_size, agreement_rows)
        report.update(feedback_model=args.feedback_model or args.model, seconds=round(time.time() - t1, 1), run=summary)
        atomic_write(os.path.splitext(args.out)[0] + ".agreement.json", json.dumps(report, indent=2))
        print(f"label_preferences: labeller agreement with {report['n']} hand-labelled pairs: {report['agreement']:.3f} "
              f"(chance 0.5; option a shown first {report['agreement_a_shown_first']:.3f}, "
              f"shown second {report['agreement_a_shown_second']:.3f})")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train.label_preferences: error: {e}", file=sys.stderr)
        sys.exit(2)
