"""Stage 1 data of Constitutional AI (SL-CAI, Bai et al., 2022, sec. 3.1) in three modes, gated.

--mode picks how a target is made for a prompt (every mode first samples the policy's plain answer, `initial`):
  critique  the paper's loop: for --rounds rounds a critique principle is drawn, the critic critiques the
            current response under it, and the reviser rewrites it following the principle's revision request.
  direct    no critique step: the revision request that names the principle is asked straight after the
            quoted conversation (demonstrations show conversation -> revision).
  distill   context distillation (Askell et al. 2021, sec. 3.4): the policy answers the prompt with the
            principles for the prompt's kind (their `positive:` instructions, in a system turn) and few-shot
            demonstrations (prompt -> the demonstration's revision) before it; the sample is the target, and the
            SFT row holds the plain prompt (the conditioning is recorded under `conditioning`, never trained on).
            --distill-principles K lists K of those principles per prompt, drawn per row (0 = all: 9-11 of them,
            430-620 tokens of prompt with one demonstration; K = 3 about halves that, and a decoding step of
            32 rows reads the cache of every row's whole prompt).
Routing: principles and demonstrations are drawn only among those whose `applies` matches the prompt's kind
(minicai.constitution.prompt_kind: the row's `kind` or `category`; a row with neither is an error).
Best-of-n: the last round (distill: the one sample) draws --best-of candidates per prompt (critique mode: that
many critiques, each with its own revision) and the row keeps the first that passes the gate.
Gate (minicai.gates; --gate off keeps every first candidate): each candidate is cut to its first
--cut-sentences sentences (0 = not cut; distill samples stop once those are final, gates.sentences_final, as
the rest would be cut off), then must not be empty, meta-text, or a copy of its critique or
instruction, and the response classifier must give the class the kind expects (refuse for harmful, comply for
benign). --gate head is the validated classifier (minicai.refusal_head: rules + a head on the default model's
hidden states); it loads the default model, so with any other --model (a tiny test model) the rules are used
instead, as with --gate rules. Benign prompts go through the same gate, expecting comply.

Models: --model is the policy (initial responses, distill samples). --critic-model (default: the policy; loaded
once when they are the same) writes the critiques. --reviser picks who writes revisions: "policy" (default, the
paper's self-revision) or "critic" (distillation from a stronger feedback model).

Randomness: each row draws its principles and demonstrations from its own random.Random seeded by
(--seed, row id), so they do not depend on which rows share a batch or on resuming. Sampling seeds are
derived from (--seed, step, batch's row ids); the sampler seeds each row of a call separately.

Context budget (the 135M default model is short on it): each prompt must fit in --max-context tokens
together with the tokens still to be generated for it (the critique prompt reserves room for the
critique and the revision). When it does not, demonstrations are dropped from the front of the few-shot
block one at a time; if the prompt is still too long with none, its tokens are cut from the left (the
start of the system/conversation text) and the round records "truncated": true.

Output. Kept rows go to --out (the SFT data, train.sft): id, prompt / messages, source (the input row's other
fields), kind, mode, initial (+ finish reason), rounds [{principle, fewshot (demo indices), critique (critique
mode), revision, revision_finish_reason, empty_revision, truncated, ...}] whose last entry is the chosen
candidate, conditioning (distill), candidates [{text, finish_reason, target (after the cut), cut, label,
reason}], chosen (its index), final (+ final_finish_reason: "cut" when the cut shortened it, so SFT ends it
with EOS), models, sampling and gate settings. A revision that comes out empty keeps the previous response
(empty_revision: true). Rows whose every candidate failed go to <out stem>.dropped.jsonl with `reason` (the first
candidate's) and no `final`. <out stem>.report.json (rewritten atomically at the end of each run, over both
files) counts kept and dropped rows per mode and kind, dropped rows per reason and candidates per reason.
Resumable: ids in either file are skipped, and a torn last line is cut and redone.

    python -m train.critique_revise --prompts data/red_team_prompts.jsonl data/helpful_prompts.jsonl \\
        --mode direct --gate head --best-of 4 --cut-sentences 2 --out runs/revisions.jsonl
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter
from types import SimpleNamespace

import torch
from tqdm import tqdm

from minicai.checkpoint import default_model_dir, generation_dtype, resolve_device
from minicai.constitution import (CONVERSATION_INTRO, DEFAULT_CONSTITUTION, DEFAULT_FEWSHOT, _revision_request,
                                  critique_messages, load_constitution, load_fewshot, render_conversation,
                                  revision_messages, strip_label)
from minicai.gates import class_reason, cut_sentences, first_passing, stop_after_sentences, text_reason, was_cut
from minicai.io import append_jsonl, atomic_write, check_output_path, read_jsonl_tolerant
from minicai.pretrained import load_pretrained, resolve_path
from minicai.prompts import read_prompts
from minicai.refusal import prompt_text
from minicai.refusal_head import ResponseClassifier, load_classifier
from minicai.sampling import generate

MODES = ("critique", "direct", "distill")
DISTILL_INTRO = "You are a helpful, honest and harmless AI assistant. Follow these principles:"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default."""


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=HelpFormatter)
parser.add_argument("--model", default="default", help="policy checkpoint: writes the initial responses")
parser.add_argument("--critic-model", default=None, help="checkpoint that writes critiques (default: --model)")
parser.add_argument("--reviser", choices=("policy", "critic"), default="policy", help="which model writes revisions")
parser.add_argument("--prompts", nargs="+", default=["data/red_team_prompts.jsonl"],
                    help="JSONL file(s) with 'prompt' or 'messages' and 'kind' or 'category' per row (optional 'id'; "
                         "optional 'response' = given initial response)")
parser.add_argument("--out", required=True, help="output JSONL of kept rows (appended to; rows already there or in "
                                                 "<stem>.dropped.jsonl are skipped)")
parser.add_argument("--limit", type=int, default=0, help="only the first N prompts (0 = all)")
parser.add_argument("--mode", choices=MODES, default="critique",
                    help="critique -> revision, direct revision (no critique), or distill (principles + demos in the "
                         "prompt, which the SFT row leaves out)")
parser.add_argument("--gate", choices=("head", "rules", "off"), default="off",
                    help="classifier of the gate: the learnt head (default model only, else rules), the rules, or "
                         "off (keep every first candidate)")
parser.add_argument("--best-of", type=int, default=1, help="candidates per prompt; the first that passes is kept")
parser.add_argument("--cut-sentences", type=int, default=0,
                    help="keep only the first N sentences of each candidate before the gate (0 = no cut)")
parser.add_argument("--rounds", type=int, default=2, help="critique -> revision rounds per prompt (not distill)")
parser.add_argument("--distill-principles", type=int, default=0,
                    help="distill: principles listed per prompt, drawn per row among the routed ones (0 = all)")
parser.add_argument("--constitution", default=str(DEFAULT_CONSTITUTION), help="constitution file")
parser.add_argument("--fewshot", default=str(DEFAULT_FEWSHOT), help="few-shot demonstrations JSONL")
parser.add_argument("--n-fewshot", type=int, default=2, help="demonstrations shown before each request")
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


def load_prompts(paths, limit=0) -> list:
    """[(id, row, messages, kind)] of the prompt files (minicai.prompts.read_prompts); id is the row's 'id' field or
    '<file stem>-<row index>'; every row needs a kind (prompt_kind); an optional 'response' is the initial answer."""
    rows = read_prompts(paths, limit, ids="index", kinds="required", check=_check_response)
    return [(p["id"], p["row"], p["messages"], p["kind"]) for p in rows]


def _check_response(row, where):
    if "response" in row and (not isinstance(row["response"], str) or not row["response"].strip()):
        raise ValueError(f"{where}: field 'response' must be a non-empty string")


def call_seed(seed, *parts) -> int:
    """A sampling seed from the run seed and a description of the call (stable across runs and machines)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:8], "little") % (2 ** 62)


def pick(demos, indices, d) -> list:
    """The last d of the chosen demonstrations (dropping from the front of the few-shot block)."""
    return [demos[i] for i in indices[len(indices) - d:]] if d else []


def draw_demos(rng, demos, kind, k) -> list:
    """Indices of k demonstrations (fewer if fewer apply) whose principle applies to this kind of prompt."""
    fits = [i for i, d in enumerate(demos) if d.principle.applies in (kind, "any")]
    return rng.sample(fits, min(k, len(fits))) if k else []


def fit_prompt(tokenizer, build, n_demos, limit) -> tuple:
    """Token ids of build(d) for the largest d <= n_demos that fits in `limit` tokens; demonstrations are
    dropped from the front of the few-shot block. With none left, cut the ids from the left.
    Returns (ids, d, truncated)."""
    for d in range(n_demos, -1, -1):
        ids = tokenizer.apply_chat_template(build(d), add_generation_prompt=True)
        if len(ids) <= limit:
            return ids, d, False
    return ids[len(ids) - limit:], 0, True


def direct_messages(prompt_messages, response, principle, fewshot=()) -> list:
    """The revision request naming `principle`, straight after the quoted conversation (no critique);
    demonstrations show conversation -> revision."""
    def ask(msgs, resp, p):
        return {"role": "user", "content": f"{CONVERSATION_INTRO}\n\n{render_conversation(msgs, resp)}\n\n"
                                           f"{_revision_request(p)}"}
    turns = []
    for d in fewshot:
        turns += [ask(d.messages, d.response, principle), {"role": "assistant", "content": d.revision.strip()}]
    return turns + [ask(prompt_messages, response, principle)]


def distill_principles(constitution, kind) -> list:
    """The critique principles routed to this kind that carry a `positive:` instruction (distill's system turn)."""
    found = [p for p in constitution.critiques if p.applies in (kind, "any") and p.positive]
    if not found:
        raise ValueError(f"{constitution.path}: no [critique] principle for {kind} prompts has a 'positive:' "
                         "instruction, which --mode distill puts in the prompt")
    return found


def distill_messages(prompt_messages, principles, fewshot=()) -> list:
    """A system turn listing the principles, the demonstrations as earlier exchanges (prompt -> revision), then
    the prompt; a system turn of the prompt's own is appended to ours."""
    system = DISTILL_INTRO + "".join(f"\n- {p.positive}" for p in principles)
    if prompt_messages[0]["role"] == "system":
        system, prompt_messages = system + "\n\n" + prompt_messages[0]["content"], prompt_messages[1:]
    turns = [{"role": "system", "content": system}]
    for d in fewshot:
        turns += [m for m in d.messages if m["role"] != "system"]
        turns.append({"role": "assistant", "content": d.revision.strip()})
    return turns + prompt_messages


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


def load_gate_classifier(args):
    """None for --gate off; else a classifier with classify_many (the head only with the default model)."""
    if args.gate == "off":
        return None
    if args.gate == "head":
        if args.model == "default" or os.path.realpath(args.model) == os.path.realpath(default_model_dir()):
            return load_classifier(args.device, args.dtype)
        print(f"critique_revise: --gate head reads the default model; {args.model} is not it, so the rules gate")
    return ResponseClassifier()  # no head: the rules


def sample_batch(model, tokenizer, prompts, args, seed, num_samples=1, stop_when=None) -> list:
    """(text, finish_reason) per prompt and sample, ordered prompt0-sample0, prompt0-sample1, ..."""
    gens = generate(model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, num_samples=num_samples,
                    stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None,
                    seed=seed, tokenizer=tokenizer, stop_when=stop_when)
    return [(g.text.strip(), g.finish_reason) for g in gens]


def context_limit(model, args) -> int:
    return min(args.max_context, model.config.max_position_embeddings)


def initial_responses(batch, models, args, ids) -> tuple:
    """([(text, finish_reason)], [truncated]) of the policy's plain answers; a row's given 'response' is kept."""
    todo = [j for j, b in enumerate(batch) if "response" not in b[1]]
    truncated = [False] * len(batch)
    current = [(b[1]["response"].strip(), "given") if "response" in b[1] else None for b in batch]
    if todo:
        tok, lim = models.policy_tok, context_limit(models.policy, args)
        fitted = [fit_prompt(tok, lambda d, m=batch[j][2]: m, 0, lim - args.max_new_tokens) for j in todo]
        outs = sample_batch(models.policy, tok, [f[0] for f in fitted], args, call_seed(args.seed, "initial", ids))
        for j, o, f in zip(todo, outs, fitted):
            current[j], truncated[j] = o, f[2]
    return current, truncated


def critique_step(batch, current, principles, chosen, models, demos, args, seed, k) -> tuple:
    """k critiques per row: ({(row, sample): (critique, finish_reason)}, demos used per row, truncated per row).
    The critique prompt reserves room for the critique and, later, the revision."""
    tok, lim, n = models.critic_tok, context_limit(models.critic, args), args.max_new_tokens
    prompts, used, trunc = [], [], []
    for j, b in enumerate(batch):
        build = lambda d, j=j, m=b[2]: critique_messages(m, current[j][0], principles[j], pick(demos, chosen[j], d))
        ids_j, d, t = fit_prompt(tok, build, len(chosen[j]), lim - 2 * n - 32)
        prompts.append(ids_j)
        used.append(d)
        trunc.append(t)
    outs = sample_batch(models.critic, tok, prompts, args, seed, k)
    slots = [(j, s) for j in range(len(batch)) for s in range(k)]
    return {slot: (strip_label(t, "Critique"), f) for slot, (t, f) in zip(slots, outs)}, used, trunc


def revision_round(batch, current, rngs, models, constitution, demos, args, r, k) -> list:
    """One round of (critique ->) revision with k candidates per row: per row, k round records."""
    ids = tuple(b[0] for b in batch)
    principles, chosen = [], []
    for rng, b in zip(rngs, batch):
        principles.append(constitution.sample_critique(rng, b[3]))
        chosen.append(draw_demos(rng, demos, b[3], args.n_fewshot))
    critique_mode = args.mode == "critique"
    if critique_mode:  # one revision per critique; an empty critique leaves nothing to revise from
        crits, used, trunc = critique_step(batch, current, principles, chosen, models, demos, args,
                                           call_seed(args.seed, "critique", r, ids), k)
        asks = [(j, [s], c[0]) for (j, s), c in crits.items() if c[0]]
    else:  # direct: k revisions of one request
        crits, used, trunc = {}, [len(c) for c in chosen], [False] * len(batch)
        asks = [(j, list(range(k)), None) for j in range(len(batch))]
    tok, lim = models.reviser_tok, context_limit(models.reviser, args)
    prompts, keys, fitted = [], [], {}
    for j, samples, crit in asks:
        def build(d, j=j, crit=crit):
            shown = pick(demos, chosen[j], d)
            if crit is None:
                return direct_messages(batch[j][2], current[j][0], principles[j], shown)
            return revision_messages(batch[j][2], current[j][0], crit, principles[j], shown)
        ids_j, d, t = fit_prompt(tok, build, used[j], lim - args.max_new_tokens)
        prompts.append(ids_j)
        keys += [(j, s) for s in samples]
        fitted.update({(j, s): (d, trunc[j] or t) for s in samples})
    outs = sample_batch(models.reviser, tok, prompts, args, call_seed(args.seed, "revision", r, ids),
                        1 if critique_mode else k) if prompts else []
    revs = dict(zip(keys, outs))
    records = [[] for _ in batch]
    for j in range(len(batch)):
        for s in range(k):
            text, fin = revs.get((j, s), ("", "skipped"))
            text = strip_label(text, "Revision")
            d, t = fitted.get((j, s), (used[j], trunc[j]))
            rec = {"principle": principles[j].name, "fewshot": chosen[j][len(chosen[j]) - d:]}
            if critique_mode:
                rec.update(critique=crits[j, s][0], critique_finish_reason=crits[j, s][1])
            rec.update(revision=text, revision_finish_reason=fin, empty_revision=not text, truncated=t)
            rec["text"], rec["finish_reason"] = (text, fin) if text else current[j]
            records[j].append(rec)
    return records


def distill_candidates(batch, rngs, models, constitution, demos, args) -> tuple:
    """k samples per row from the policy conditioned on the routed principles and demonstrations:
    (per row, k candidate records; per row, the conditioning record)."""
    ids, k = tuple(b[0] for b in batch), args.best_of
    tok, lim = models.policy_tok, context_limit(models.policy, args)
    prompts, conditioning = [], []
    for rng, (_, _, msgs, kind) in zip(rngs, batch):
        principles, chosen = distill_principles(constitution, kind), draw_demos(rng, demos, kind, args.n_fewshot)
        if 0 < args.distill_principles < len(principles):  # keep the constitution's order of the drawn ones
            principles = [principles[i] for i in sorted(rng.sample(range(len(principles)), args.distill_principles))]
        build = lambda d, m=msgs, p=principles, c=chosen: distill_messages(m, p, pick(demos, c, d))
        ids_j, d, t = fit_prompt(tok, build, len(chosen), lim - args.max_new_tokens)
        prompts.append(ids_j)
        conditioning.append({"principles": [p.name for p in principles], "fewshot": chosen[len(chosen) - d:],
                             "truncated": t})
    # a sample stops once its first --cut-sentences sentences are final: the gate cuts the rest off anyway
    outs = sample_batch(models.policy, tok, prompts, args, call_seed(args.seed, "distill", ids), k,
                        stop_when=stop_after_sentences(args.cut_sentences))
    return [[{"text": t, "finish_reason": f} for t, f in outs[j * k:(j + 1) * k]] for j in range(len(batch))], \
        conditioning


def process_batch(batch, models, constitution, demos, args) -> list:
    """Initial responses, then the mode's candidates, for a batch of (id, row, messages, kind): output rows
    before the gate (rounds hold the rounds before the last; the last round's records are the candidates)."""
    ids = tuple(b[0] for b in batch)
    rngs = [random.Random(f"{args.seed}:{rid}") for rid in ids]  # per-row: independent of batch composition
    initial, initial_truncated = initial_responses(batch, models, args, ids)
    rounds, conditioning = [[] for _ in batch], [None] * len(batch)
    if args.mode == "distill":
        candidates, conditioning = distill_candidates(batch, rngs, models, constitution, demos, args)
    else:
        current = list(initial)
        for r in range(args.rounds):
            last = r == args.rounds - 1
            recs = revision_round(batch, current, rngs, models, constitution, demos, args, r,
                                  args.best_of if last else 1)
            if last:
                candidates = recs
                break
            for j, (rec,) in enumerate(recs):
                rounds[j].append(rec)
                current[j] = (rec["text"], rec["finish_reason"])
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
                "max_new_tokens": args.max_new_tokens, "n_fewshot": args.n_fewshot, "max_context": args.max_context}
    gate = {"classifier": args.gate_classifier, "best_of": args.best_of, "cut_sentences": args.cut_sentences}
    out = []
    for j, (rid, row, msgs, kind) in enumerate(batch):
        o = {"id": rid}
        if "prompt" in row and "messages" not in row:
            o["prompt"] = row["prompt"]
        o["messages"] = msgs
        o["source"] = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages", "response")}
        o.update(kind=kind, mode=args.mode, initial=initial[j][0], initial_finish_reason=initial[j][1],
                 initial_truncated=initial_truncated[j], rounds=rounds[j],
                 **({"conditioning": conditioning[j]} if conditioning[j] else {}), candidates=candidates[j],
                 policy_model=args.model, critic_model=args.critic_model or args.model, reviser=args.reviser,
                 sampling=sampling, gate=gate, seed=args.seed, constitution=args.constitution)
        out.append(o)
    return out


def instruction_of(o, constitution) -> str:
    """What the candidates were asked to follow: the last round's revision request, or distill's principles."""
    if o["mode"] == "distill":
        return " ".join(constitution.get(p).positive for p in o["conditioning"]["principles"])
    return constitution.get(o["candidates"][0]["principle"]).revision


def gate_rows(rows, classifier, constitution, args) -> list:
    """Cut, check and classify every candidate (classifier None: all pass); a row keeps its first passing
    candidate as `final` (kept: True) or gets the first candidate's `reason` (kept: False). [(row, kept)]"""
    to_classify = []
    for o in rows:
        prompt, instruction = prompt_text(o), instruction_of(o, constitution)
        for c in o["candidates"]:
            c["target"] = cut_sentences(c["text"], args.cut_sentences)
            c["cut"] = was_cut(c["text"], c["target"], c["finish_reason"])
            c["reason"] = None if classifier is None else text_reason(c["target"], prompt, c.get("critique", ""),
                                                                      instruction)
            if classifier is not None and c["reason"] is None:
                to_classify.append((o, c))
    if to_classify:
        labels = classifier.classify_many([dict(request=o["messages"][-1]["content"], response=c["target"],
                                                kind=o["kind"], prompt=prompt_text(o)) for o, c in to_classify])
        for (o, c), label in zip(to_classify, labels):
            c["label"], c["reason"] = label, class_reason(label, o["kind"])
    out = []
    for o in rows:
        i = first_passing([c["reason"] for c in o["candidates"]])
        if i is None:
            o["reason"] = o["candidates"][0]["reason"]
            out.append((o, False))
            continue
        c = o["candidates"][i]
        if o["mode"] != "distill":
            o["rounds"].append(c)
        o.update(chosen=i, final=c["target"], final_finish_reason="cut" if c["cut"] else c["finish_reason"])
        out.append((o, True))
    return out


def side_paths(out) -> tuple:
    """(<out stem>.dropped.jsonl, <out stem>.report.json) next to --out."""
    stem = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return stem + ".dropped.jsonl", stem + ".report.json"


def write_report(out, dropped_path, report_path) -> dict:
    """Counts over both files: kept / dropped rows per mode and kind, dropped rows per reason, candidates per
    reason ("passed" for those that passed); written atomically."""
    by_mode = {}
    for kept, rows in ((True, read_jsonl_tolerant(out)), (False, read_jsonl_tolerant(dropped_path))):
        for o in rows:
            s = by_mode.setdefault(o.get("mode", "critique"), {}).setdefault(o.get("kind", "harmful"), {
                "kept": 0, "dropped": 0, "dropped_by_reason": Counter(), "candidates_by_reason": Counter()})
            s["kept" if kept else "dropped"] += 1
            if not kept:
                s["dropped_by_reason"][o["reason"]] += 1
            s["candidates_by_reason"].update(c.get("reason") or "passed" for c in o.get("candidates", []))
    for kinds in by_mode.values():
        for s in kinds.values():
            s["kept_fraction"] = round(s["kept"] / (s["kept"] + s["dropped"]), 4)
    report = {"kept": sum(s["kept"] for k in by_mode.values() for s in k.values()),
              "dropped": sum(s["dropped"] for k in by_mode.values() for s in k.values()),
              "dropped_by_reason": dict(sum((s["dropped_by_reason"] for k in by_mode.values() for s in k.values()),
                                            Counter())),
              "by_mode": by_mode, "files": {"kept": out, "dropped": dropped_path}}
    atomic_write(report_path, json.dumps(report, indent=1, sort_keys=True) + "\n")
    return report


def check_args(args) -> None:
    if args.rounds < 1 or args.batch_size < 1 or args.n_fewshot < 0 or args.max_new_tokens < 1:
        raise ValueError("--rounds, --batch-size and --max-new-tokens must be >= 1 and --n-fewshot >= 0")
    if args.best_of < 1 or args.cut_sentences < 0 or args.distill_principles < 0:
        raise ValueError(f"--best-of must be >= 1 and --cut-sentences, --distill-principles >= 0, got "
                         f"{args.best_of}, {args.cut_sentences} and {args.distill_principles}")
    for path in (args.out,) + side_paths(args.out):
        check_output_path(path, "file")
    resolve_device(args.device)


def run(args):
    """The script on parsed flags (parser.parse_args, or training.script_args from a typed config)."""
    if args.dtype == "auto":
        args.dtype = generation_dtype(args.device)
    check_args(args)
    dropped_path, report_path = side_paths(args.out)
    constitution = load_constitution(args.constitution)
    demos = load_fewshot(args.fewshot, constitution) if args.n_fewshot else []
    rows = load_prompts(args.prompts, args.limit)
    done = {r.get("id") for path in (args.out, dropped_path) for r in read_jsonl_tolerant(path)}
    todo = [r for r in rows if r[0] not in done]
    print(f"critique_revise: {len(rows)} prompts, {len(rows) - len(todo)} already in {args.out} or {dropped_path}, "
          f"{len(todo)} to do (--mode {args.mode}, --gate {args.gate}, --best-of {args.best_of})")
    if not todo:
        write_report(args.out, dropped_path, report_path)
        return []
    models = load_models(args)
    classifier = load_gate_classifier(args)
    args.gate_classifier = "off" if classifier is None else "head" if classifier.head else "rules"
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    open(args.out, "a").close()  # exists even when every row is dropped

    t0, kept, dropped = time.time(), [], []
    bar = tqdm(total=len(todo), unit="row", disable=args.quiet, dynamic_ncols=True)
    for b0 in range(0, len(todo), args.batch_size):
        batch = process_batch(todo[b0:b0 + args.batch_size], models, constitution, demos, args)
        for o, keep in gate_rows(batch, classifier, constitution, args):
            append_jsonl(args.out if keep else dropped_path, o)
            (kept if keep else dropped).append(o)
        bar.update(min(args.batch_size, len(todo) - b0))
    bar.close()
    report = write_report(args.out, dropped_path, report_path)

    rounds = [x for o in kept for x in o["rounds"]]
    print(f"critique_revise: kept {len(kept)} rows in {args.out}, dropped {len(dropped)} to {dropped_path} in "
          f"{time.time() - t0:.1f} s; {sum(x['empty_revision'] for x in rounds)} of {len(rounds)} revisions "
          f"came out empty (previous response kept); "
          f"{sum(x.get('revision_finish_reason') == 'length' for x in rounds)} revisions and "
          f"{sum(x.get('critique_finish_reason') == 'length' for x in rounds)} critiques hit --max-new-tokens; "
          f"{sum(x['truncated'] for x in rounds)} prompts cut to fit --max-context; all runs so far: "
          f"{report['kept']} kept, {report['dropped']} dropped {report['dropped_by_reason']} ({report_path})")
    return kept


def main(argv=None):
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train.critique_revise: error: {e}", file=sys.stderr)
        sys.exit(2)
