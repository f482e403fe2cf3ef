"""Stage 1 data of Constitutional AI (SL-CAI, Bai et al., 2022, sec. 3.1): critique -> revision.

For every prompt the policy writes an initial response; then, for --rounds rounds, a critique principle is
drawn from the constitution, the critic writes a critique of the current response under it, and the reviser
rewrites the response following the principle's revision request. The last revision is the SFT target
(train.sft). Prompts are built by minicai.constitution (few-shot demonstrations first, chat template),
and every generation step runs batched over --batch-size rows through minicai.generate.

Models: --model is the policy (initial responses). --critic-model (default: the policy; loaded once when
they are the same) writes the critiques. --reviser picks who writes revisions: "policy" (default, the
paper's self-revision) or "critic" (distillation from a stronger feedback model).

Randomness: each row draws its principles and demonstrations from its own random.Random seeded by
(--seed, row id), so they do not depend on which rows share a batch or on resuming. Sampling seeds are
derived from (--seed, step, batch's row ids); the sampler seeds each row of a call separately.

Context budget (the 135M default model is short on it): each prompt must fit in --max-context tokens
together with the tokens still to be generated for it (the critique prompt reserves room for the
critique and the revision). When it does not, demonstrations are dropped from the front of the few-shot
block one at a time; if the prompt is still too long with none, its tokens are cut from the left (the
start of the system/conversation text) and the round records "truncated": true.

Output JSONL (--out), one row per prompt, with provenance: id, prompt / messages, source (the input row's
other fields), initial (+ initial_finish_reason), rounds [{principle, fewshot (demo indices), critique,
critique_finish_reason, revision, revision_finish_reason, empty_revision, truncated}], final (+
final_finish_reason), policy_model, critic_model, reviser, sampling settings and seed. A revision that
comes out empty keeps the previous response (empty_revision: true; counted at the end). The run is
resumable: rows whose id is already in --out are skipped, and a torn last line is cut and redone.

    python -m train.critique_revise --limit 32 --out runs/revisions.jsonl
"""
import argparse
import hashlib
import os
import random
import sys
import time
from types import SimpleNamespace

import torch
from tqdm import tqdm

from minicai.checkpoint import generation_dtype, load_pretrained, resolve_device, resolve_path
from minicai.constitution import (DEFAULT_CONSTITUTION, DEFAULT_FEWSHOT, critique_messages, load_constitution,
                                  load_fewshot, revision_messages, row_messages, strip_label)
from minicai.garak_data import check_trainable_messages
from minicai.io import append_jsonl, check_output_path, read_jsonl_lines, read_jsonl_tolerant
from minicai.sampling import generate

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default."""


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=HelpFormatter)
parser.add_argument("--model", default="default", help="policy checkpoint: writes the initial responses")
parser.add_argument("--critic-model", default=None, help="checkpoint that writes critiques (default: --model)")
parser.add_argument("--reviser", choices=("policy", "critic"), default="policy", help="which model writes revisions")
parser.add_argument("--prompts", default="data/red_team_prompts.jsonl",
                    help="JSONL with 'prompt' or 'messages' per row (optional 'id'; optional 'response' = given initial response)")
parser.add_argument("--out", required=True, help="output JSONL (appended to; rows already there are skipped)")
parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
parser.add_argument("--rounds", type=int, default=2, help="critique -> revision rounds per prompt")
parser.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION), help="constitution file")
parser.add_argument("--fewshot", default=str(DEFAULT_FEWSHOT), help="few-shot demonstrations JSONL")
parser.add_argument("--n-fewshot", type=int, default=2, help="demonstrations shown before each critique")
parser.add_argument("--max-context", type=int, default=2048,
                    help="token budget per prompt + generation (capped at the model's context)")
parser.add_argument("--max-new-tokens", type=int, default=128, help="cap on each response, critique and revision")
parser.add_argument("--batch-size", type=int, default=16, help="rows generated together (decoding reads the weights once per step for the whole batch)")
parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (1 = off)")
parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (0 = off)")
parser.add_argument("--seed", type=int, default=0, help="seed of principle/demo draws and sampling")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
parser.add_argument("--dtype", default="auto", help="model dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_prompts(path, limit=0) -> list:
    """[(id, row, messages)]; id is the row's 'id' field or '<file stem>-<row index>'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    out, seen = [], set()
    for i, (lineno, row) in enumerate(read_jsonl_lines(path)):
        if limit and len(out) >= limit:
            break
        where = f"{path}:{lineno}"
        messages = row_messages(row, where)
        check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
        if "response" in row and (not isinstance(row["response"], str) or not row["response"].strip()):
            raise ValueError(f"{where}: field 'response' must be a non-empty string")
        rid = str(row.get("id", f"{stem}-{i:05d}"))
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        out.append((rid, row, messages))
    if not out:
        raise ValueError(f"{path}: no prompts (the file has no rows)")
    return out


def call_seed(seed, *parts) -> int:
    """A sampling seed from the run seed and a description of the call (stable across runs and machines)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") % (2 ** 62)


def pick(demos, indices, d) -> list:
    """The last d of the chosen demonstrations (dropping from the front of the few-shot block)."""
    return [demos[i] for i in indices[len(indices) - d:]] if d else []


def fit_prompt(tokenizer, build, n_demos, limit) -> tuple:
    """Token ids of build(d) for the largest d <= n_demos that fits in `limit` tokens; demonstrations are
    dropped from the front of the few-shot block. With none left, cut the ids from the left.
    Returns (ids, d, truncated)."""
    for d in range(n_demos, -1, -1):
        ids = tokenizer.apply_chat_template(build(d), add_generation_prompt=True)
        if len(ids) <= limit:
            return ids, d, False
    return ids[len(ids) - limit:], 0, True


def load_models(args) -> SimpleNamespace:
    """policy, critic and reviser (model, tokenizer) pairs; the critic is the policy object itself when
    --critic-model names the same checkpoint (loaded once)."""
    policy, policy_tok = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    critic, critic_tok = policy, policy_tok
    if args.critic_model and resolve_path(args.critic_model) != resolve_path(args.model):
        critic, critic_tok = load_pretrained(args.critic_model, dtype=args.dtype, device=args.device)
    reviser, reviser_tok = (policy, policy_tok) if args.reviser == "policy" else (critic, critic_tok)
    return SimpleNamespace(policy=policy, policy_tok=policy_tok, critic=critic, critic_tok=critic_tok,
                           reviser=reviser, reviser_tok=reviser_tok)


def sample_batch(model, tokenizer, prompts, args, seed) -> list:
    gens = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None,
                    seed=seed, tokenizer=tokenizer)
    return [(g.text.strip(), g.finish_reason) for g in gens]


def context_limit(model, args) -> int:
    return min(args.max_context, model.config.max_position_embeddings)


def process_batch(batch, models, constitution, demos, args) -> list:
    """Run initial response + rounds for a batch of (id, row, messages); returns output rows."""
    ids = tuple(rid for rid, _, _ in batch)
    rngs = [random.Random(f"{args.seed}:{rid}") for rid in ids]  # per-row: independent of batch composition
    n = args.max_new_tokens

    # initial responses (given ones are kept)
    todo = [j for j, (_, row, _) in enumerate(batch) if "response" not in row]
    initial_truncated = [False] * len(batch)
    current = [(row["response"].strip(), "given") if "response" in row else None for _, row, _ in batch]
    if todo:
        tok, lim = models.policy_tok, context_limit(models.policy, args)
        fitted = [fit_prompt(tok, lambda d, m=batch[j][2]: m, 0, lim - n) for j in todo]
        outs = sample_batch(models.policy, tok, [f[0] for f in fitted], args, call_seed(args.seed, "initial", ids))
        for j, o, f in zip(todo, outs, fitted):
            current[j] = o
            initial_truncated[j] = f[2]
    initial = list(current)
    rounds = [[] for _ in batch]

    for r in range(args.rounds):
        principles, chosen = [], []
        for rng in rngs:
            principles.append(constitution.sample_critique(rng))
            k = min(args.n_fewshot, len(demos))
            chosen.append(rng.sample(range(len(demos)), k) if k else [])  # demo indices
        # critique: reserve room for the critique and, later, the revision
        tok, lim = models.critic_tok, context_limit(models.critic, args)
        crit_prompts, used, trunc = [], [], []
        for j, (_, _, msgs) in enumerate(batch):
            build = lambda d, j=j, msgs=msgs: critique_messages(msgs, current[j][0], principles[j], pick(demos, chosen[j], d))
            ids_j, d, t = fit_prompt(tok, build, len(chosen[j]), lim - 2 * n - 32)
            crit_prompts.append(ids_j)
            used.append(d)
            trunc.append(t)
        crits = sample_batch(models.critic, tok, crit_prompts, args, call_seed(args.seed, "critique", r, ids))
        crits = [(strip_label(text, "Critique"), fin) for text, fin in crits]

        # revision, with the same demonstrations (fewer if the critique made it too long)
        tok, lim = models.reviser_tok, context_limit(models.reviser, args)
        rev_prompts, rev_rows = [], []
        for j, (_, _, msgs) in enumerate(batch):
            if not crits[j][0]:
                continue  # nothing to revise from: keep the response (recorded below)
            build = lambda d, j=j, msgs=msgs: revision_messages(msgs, current[j][0], crits[j][0], principles[j],
                                                                pick(demos, chosen[j], d))
            ids_j, d, t = fit_prompt(tok, build, used[j], lim - n)
            rev_prompts.append(ids_j)
            rev_rows.append(j)
            used[j], trunc[j] = d, trunc[j] or t
        revs = dict(zip(rev_rows, sample_batch(models.reviser, tok, rev_prompts, args,
                                               call_seed(args.seed, "revision", r, ids)) if rev_prompts else []))
        for j in range(len(batch)):
            text, fin = revs.get(j, ("", "skipped"))
            text = strip_label(text, "Revision")
            empty = not text
            rounds[j].append({"principle": principles[j].name,
                              "fewshot": chosen[j][len(chosen[j]) - used[j]:],
                              "critique": crits[j][0], "critique_finish_reason": crits[j][1],
                              "revision": text, "revision_finish_reason": fin,
                              "empty_revision": empty, "truncated": trunc[j]})
            if not empty:
                current[j] = (text, fin)

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                "max_new_tokens": args.max_new_tokens, "n_fewshot": args.n_fewshot, "max_context": args.max_context}
    out = []
    for j, (rid, row, msgs) in enumerate(batch):
        o = {"id": rid}
        if "prompt" in row and "messages" not in row:
            o["prompt"] = row["prompt"]
        o["messages"] = msgs
        o["source"] = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages", "response")}
        o.update(initial=initial[j][0], initial_finish_reason=initial[j][1], initial_truncated=initial_truncated[j],
                 rounds=rounds[j],
                 final=current[j][0], final_finish_reason=current[j][1],
                 policy_model=args.model, critic_model=args.critic_model or args.model, reviser=args.reviser,
                 sampling=sampling, seed=args.seed, constitution=args.constitution)
        out.append(o)
    return out


def main(argv=None):
    args = parser.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = generation_dtype(args.device)
    if args.rounds < 1 or args.batch_size < 1 or args.n_fewshot < 0 or args.max_new_tokens < 1:
        raise ValueError("--rounds, --batch-size and --max-new-tokens must be >= 1 and --n-fewshot >= 0")
    check_output_path(args.out, "file")
    resolve_device(args.device)
    constitution = load_constitution(args.constitution)
    demos = load_fewshot(args.fewshot, constitution) if args.n_fewshot else []
    rows = load_prompts(args.prompts, args.limit)
    done = {r.get("id") for r in read_jsonl_tolerant(args.out)}
    todo = [r for r in rows if r[0] not in done]
    print(f"critique_revise: {len(rows)} prompts, {len(rows) - len(todo)} already in {args.out}, {len(todo)} to do")
    if not todo:
        return []
    models = load_models(args)
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)

    t0, written = time.time(), []
    bar = tqdm(total=len(todo), unit="row", disable=args.quiet, dynamic_ncols=True)
    for b0 in range(0, len(todo), args.batch_size):
        for o in process_batch(todo[b0:b0 + args.batch_size], models, constitution, demos, args):
            append_jsonl(args.out, o)
            written.append(o)
        bar.update(min(args.batch_size, len(todo) - b0))
    bar.close()

    rounds = [x for o in written for x in o["rounds"]]
    n_empty = sum(x["empty_revision"] for x in rounds)
    print(f"critique_revise: wrote {len(written)} rows to {args.out} in {time.time() - t0:.1f} s; "
          f"{n_empty} of {len(rounds)} revisions came out empty (previous response kept); "
          f"{sum(x['revision_finish_reason'] == 'length' for x in rounds)} revisions and "
          f"{sum(x['critique_finish_reason'] == 'length' for x in rounds)} critiques hit --max-new-tokens; "
          f"{sum(x['truncated'] for x in rounds)} prompts cut to fit --max-context")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train.critique_revise: error: {e}", file=sys.stderr)
        sys.exit(2)
