"""RL-CAI with DPO: fit the policy to the AI preference labels directly (Rafailov et al. 2023).

The RL stage of Constitutional AI (Bai et al. 2022, sec. 4) trains a preference model on AI labels and runs
PPO against it; DPO optimises the same KL-regularised objective in closed form from the preference pairs:
loss = -log sigmoid(beta [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))]) (eq. 7), or
IPO (Azar et al. 2023) with --loss ipo, conservative DPO with --label-smoothing eps, or the feedback model's
soft labels p = P(chosen better) with --soft-labels (eps = 1 - p per pair). The math is in
minicai.losses.dpo_loss; this script plumbs data, reference log-probs and the optimiser.

Data: JSONL in TRL's preference format, read by minicai.preferences (the reward model's reader: "prompt",
"chosen", "rejected", with --soft-labels a "soft_label" in [0, 1]; bad rows are errors naming file:line,
empty or identical pairs are skipped and counted). Each completion is tokenised as the assistant turn after
the chat template's generation prompt, as SFT does: the stripped text, then the EOS (the EOS is trained: it
is how the policy learns to stop), none after a response cut at the length cap. Prompts longer than
--max-prompt-tokens are skipped and counted; completions longer than --max-completion-tokens are truncated.

Choices:
- Reference log-probs are computed once, before the first update, in one pass over all pairs, by the
  initial model (with --lora-rank: the same model with its adapters switched off, i.e. the base model,
  which at that point it equals anyway, since LoRA's B starts at 0). They are kept in memory and cached in
  OUT/ref_logps.safetensors, reused on --resume when the data, model and settings match. Precomputing
  also under LoRA keeps one code path and costs one forward per pair instead of one per pair per epoch.
- Sequence log-probs are sums over completion tokens for "sigmoid", means for "ipo" (IPO's length
  normalisation, as in the IPO authors' experiments and TRL).
- Chosen and rejected rows of a micro-batch go through one forward, right padded to the longest real row,
  without an attention mask (causal attention keeps right padding out of every real token's view, and the
  mask-free call is the fast causal kernel); --bucket-window sorts windows of the shuffled order by length so
  a batch pads little (a function of --seed and the step: resume stays exact). --autocast runs the forward
  in bf16 over fp32 master weights, the log-probs and the loss in fp32; the reference log-probs are computed
  under the same setting. Peak memory is logged per step and printed per stage (load, reference, train).
- --nll-weight w adds w x the mean per-token NLL of the chosen completions (RPO, Pang et al. 2024).
- A held-out split (--eval-frac of the distinct prompts, so no prompt is on both sides) is scored before and
  after training: implicit reward margin beta (delta_policy - delta_ref), accuracy, loss, and the policy's
  own log-prob margin.
- Deterministic given --seed (split, epoch order); resumable at step boundaries (--resume). Inputs are all
  checked before anything is written; a fresh run over an earlier one in --out needs --overwrite; a diverging
  run stops and keeps the last good state (minicai.training.DivergenceGuard).

    python -m train.dpo --model runs/sft --data prefs.jsonl --out runs/dpo --epochs 1
"""
import hashlib
import json
import math
import os
import random
import time
from functools import partial

import torch
from safetensors.torch import load_file, save

from minicai import training
from minicai.checkpoint import resolve_device, save_pretrained
from minicai.io import atomic_write
from minicai.losses import dpo_loss
from minicai.preferences import encode_pair, read_pairs, split_by_prompt
from minicai.pretrained import load_model, resolve_path
from minicai.rl import completion_logprobs
from minicai.sft_data import IGNORE, collate
from minicai.tokenizer import load_tokenizer

parser = training.script_parser(__doc__)
parser.add_argument("--model", default="default", help="initial policy = reference (the SL-CAI / SFT checkpoint)")
parser.add_argument("--data", nargs="+", required=True, help="preference JSONL file(s) (format above)")
parser.add_argument("--out", default="runs/dpo", help="output dir: final/ (HF checkpoint), state/, log.jsonl, eval.json, curves.png")
parser.add_argument("--loss", choices=("sigmoid", "ipo"), default="sigmoid", help="DPO (sigmoid) or IPO")
parser.add_argument("--beta", type=float, default=0.1, help="KL strength beta")
parser.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO: assumed label-flip rate eps in [0, 0.5]")
parser.add_argument("--soft-labels", "--use-soft-labels", action="store_true", help="per-pair eps = 1 - soft_label from each row's 'soft_label' field")
parser.add_argument("--nll-weight", type=float, default=0.0, help="weight of the NLL term on the chosen completions")
parser.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
parser.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward, gradients accumulated (0 = --batch-size)")
parser.add_argument("--lr", type=float, default=1e-6, help="peak learning rate (LoRA wants ~1e-4)")
parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
parser.add_argument("--eval-frac", type=float, default=0.1, help="held-out share of the distinct prompts, 0 = no evaluation")
parser.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
parser.add_argument("--max-completion-tokens", type=int, default=256, help="longer completions are truncated")
parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights (0 = full)")
parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha")
parser.add_argument("--lora-targets", default="q,k,v,o", help="LoRA target linear layers")
parser.add_argument("--stop-after", type=int, default=0, help="stop (state saved) after N steps in this run; 0 = to the end")
training.add_train_flags(parser)
training.add_speed_flags(parser)


# ----------------------------------------------------------------------------- data

def load_pairs(path, tok, *, soft_labels=False, max_prompt_tokens=512, max_completion_tokens=256):
    """preferences.read_pairs' pairs of `path` as token ids [{prompt, chosen, rejected, soft_label, key}]: prompts
    over max_prompt_tokens skipped, completions over max_completion_tokens truncated; with the counts."""
    rows, counts = read_pairs(path, soft_labels)
    pairs, counts = [], {**counts, "prompt_too_long": 0, "truncated": 0}
    for row in rows:
        prompt, c, r = encode_pair(tok, row)
        if len(prompt) > max_prompt_tokens:
            counts["prompt_too_long"] += 1
            continue
        if max(len(c), len(r)) > max_completion_tokens:
            counts["truncated"] += 1
            c, r = c[:max_completion_tokens], r[:max_completion_tokens]
        pairs.append({"prompt": prompt, "chosen": c, "rejected": r, "soft_label": row["p"], "key": row["key"]})
    return pairs, counts


def pair_batch(pairs, pad_id, device):
    """chosen rows then rejected rows, one right-padded batch of 2b sequences prompt + completion, labels
    on the completion only, as wide as the longest real row."""
    rows = [{"input_ids": p["prompt"] + p[k], "labels": [IGNORE] * len(p["prompt"]) + p[k]}
            for k in ("chosen", "rejected") for p in pairs]
    return {k: v.to(device) for k, v in collate(rows, pad_id).items()}


def pair_length(p) -> int:
    return len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"]))


# ----------------------------------------------------------------------------- log-probs

def pair_logprobs(model, pairs, pad_id, args):
    """(chosen [b], rejected [b]) sequence log-probs, plus the chosen per-token log-probs and mask."""
    batch = pair_batch(pairs, pad_id, args.device)
    seq, tok_logp, mask = completion_logprobs(model, batch, average=args.loss == "ipo",
                                              autocast=partial(training.autocast, args.autocast, args.device))
    b = len(pairs)
    return seq[:b], seq[b:], tok_logp[:b], mask[:b]


@torch.no_grad()
def reference_logprobs(model, pairs, pad_id, args):
    """One pass of the reference over all pairs -> [N, 2] (chosen, rejected), in --micro-batch-size chunks."""
    from minicai.lora import lora_disabled

    out = []
    with lora_disabled(model):  # no-op without LoRA
        for i in range(0, len(pairs), args.micro_batch_size):
            c, r, _, _ = pair_logprobs(model, pairs[i:i + args.micro_batch_size], pad_id, args)
            out.append(torch.stack([c, r], 1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def fingerprint(args, model_path) -> str:
    """What the reference log-probs depend on: data bytes, model weights file stamp, tokenisation settings."""
    h = hashlib.sha256()
    for data in args.data:
        with open(data, "rb") as f:
            h.update(f.read())
    for name in sorted(os.listdir(model_path)):
        st = os.stat(os.path.join(model_path, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps([args.loss, args.max_prompt_tokens, args.max_completion_tokens, args.eval_frac, args.seed,
                         args.dtype, args.soft_labels, args.autocast, "right-padded", "split-by-prompt"]).encode())
    return h.hexdigest()


def cached_reference(model, train_pairs, eval_pairs, pad_id, args, path) -> dict:
    """Reference log-probs {"train", "eval"}: one pass before any update, cached in OUT for --resume."""
    cache = os.path.join(args.out, "ref_logps.safetensors")
    fp = fingerprint(args, path)
    if args.resume and os.path.exists(cache):
        from safetensors import safe_open
        with safe_open(cache, framework="pt") as f:
            if f.metadata().get("fingerprint") == fp:
                return load_file(cache)
    t0 = time.perf_counter()
    model.eval()
    ref = {"train": reference_logprobs(model, train_pairs, pad_id, args),
           "eval": reference_logprobs(model, eval_pairs, pad_id, args)}
    print(f"dpo: reference log-probs of {len(train_pairs) + len(eval_pairs)} pairs in {time.perf_counter() - t0:.1f}s")
    atomic_write(cache, save(ref, metadata={"fingerprint": fp}))
    return ref


@torch.no_grad()
def evaluate(model, pairs, ref, pad_id, args) -> dict:
    """Held-out loss, reward accuracy and margins (means over pairs)."""
    if not pairs:
        return {}
    was_training = model.training
    model.eval()
    sums = {}
    for i in range(0, len(pairs), args.micro_batch_size):
        chunk = pairs[i:i + args.micro_batch_size]
        c, r, _, _ = pair_logprobs(model, chunk, pad_id, args)
        rc, rr = ref[i:i + len(chunk), 0].to(c.device), ref[i:i + len(chunk), 1].to(c.device)
        losses, cr, rjr = dpo_loss(c, r, rc, rr, beta=args.beta, loss_type=args.loss)
        vals = {"loss": losses, "reward_accuracy": (cr > rjr).float(), "reward_margin": cr - rjr,
                "chosen_reward": cr, "rejected_reward": rjr, "logp_margin": c - r}
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
    model.train(was_training)
    return {k: v / len(pairs) for k, v in sums.items()}


# ----------------------------------------------------------------------------- training

def batch_rows(n, batch_size, seed, step, steps_per_epoch, lengths=None, window=1) -> list:
    """The pair indices of optimizer step `step`: a seeded shuffle per epoch, with `lengths` sorted in
    windows of `window` steps (training.sort_in_windows), so a function of seed and step alone."""
    epoch, k = divmod(step, steps_per_epoch)
    order = random.Random(seed * 1_000_003 + epoch + 1).sample(range(n), n)
    if lengths is not None:
        order = training.sort_in_windows(order, lengths, window * batch_size)
    return order[k * batch_size:(k + 1) * batch_size]


def train_step(model, opt, pairs, ref, rows, pad_id, args, step, guard=None) -> dict:
    """One optimizer step on pairs[rows] (reference log-probs ref [len(pairs), 2]) in micro-batches of
    --micro-batch-size, the forward under --autocast; args: this script's parsed flags. A DivergenceGuard
    checks the loss and gradient norm as step + 1 before the update. Returns the step's metrics."""
    n_pairs = len(rows)
    mbs = args.micro_batch_size or n_pairs
    n_chosen_tokens = sum(len(pairs[i]["chosen"]) for i in rows)
    sums = {}
    opt.zero_grad(set_to_none=True)
    for i in range(0, n_pairs, mbs):
        mb = rows[i:i + mbs]
        chunk = [pairs[j] for j in mb]
        c, r, c_tok, c_mask = pair_logprobs(model, chunk, pad_id, args)
        ref_mb = ref[torch.as_tensor(mb)].to(c.device)
        soft = torch.tensor([p["soft_label"] for p in chunk], device=c.device) if args.soft_labels else None
        losses, cr, rjr = dpo_loss(c, r, ref_mb[:, 0], ref_mb[:, 1], beta=args.beta, loss_type=args.loss,
                                   label_smoothing=args.label_smoothing, soft_labels=soft)
        nll = -torch.where(c_mask, c_tok, 0).sum() / n_chosen_tokens           # share of the batch's token mean
        loss = losses.sum() / n_pairs + args.nll_weight * nll                    # this micro-batch's share
        with training.autocast("off", c.device):  # the fused log-prob backward stays fp32 under an outer autocast
            loss.backward()
        with torch.no_grad():
            vals = {"loss": loss * 1.0, "dpo_loss": losses.sum() / n_pairs, "nll": nll,
                    "reward_accuracy": (cr > rjr).float().sum() / n_pairs, "reward_margin": (cr - rjr).sum() / n_pairs,
                    "chosen_reward": cr.sum() / n_pairs, "rejected_reward": rjr.sum() / n_pairs,
                    "chosen_logp": c.sum() / n_pairs, "rejected_logp": r.sum() / n_pairs}
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v.detach()
    grad_norm = training.clip_and_step(opt, step, sums["loss"], args.grad_clip, guard)
    return {**{k: float(v) for k, v in sums.items()}, "grad_norm": grad_norm}


def load_policy(path, args):
    """The policy to train (= the reference before any update), with LoRA adapters under --lora-rank."""
    model = load_model(path, dtype=getattr(torch, args.dtype), device=args.device)
    model.gradient_checkpointing = args.gradient_checkpointing
    if args.lora_rank:
        from minicai.lora import apply_lora
        apply_lora(model, targets=args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha)
    return model


def show(m, total) -> str:
    return (f"step {m['step']:4d}/{total} | loss {m['loss']:.4f} | acc {m['reward_accuracy']:.2f} | margin "
            f"{m['reward_margin']:+.4f} (c {m['chosen_reward']:+.4f}, r {m['rejected_reward']:+.4f}) | logp c "
            f"{m['chosen_logp']:.1f} r {m['rejected_logp']:.1f} | {m['tok_s']:.0f} tok/s | {m['peak_mem_mb']:.0f} MB")


def load_data(args, tok) -> tuple:
    """(train pairs, held-out pairs) of --data, with what was skipped printed."""
    pairs, counts = [], {}
    for path in args.data:
        p, c = load_pairs(path, tok, soft_labels=args.soft_labels, max_prompt_tokens=args.max_prompt_tokens,
                          max_completion_tokens=args.max_completion_tokens)
        pairs, counts = pairs + p, {k: counts.get(k, 0) + v for k, v in c.items()}
    print(f"dpo: {len(pairs)} pairs from {', '.join(args.data)}; skipped {counts['identical']} identical, {counts['empty']} "
          f"with an empty completion, {counts['prompt_too_long']} with a prompt > {args.max_prompt_tokens} tokens; "
          f"truncated {counts['truncated']}")
    train_pairs, eval_pairs = split_by_prompt(pairs, args.eval_frac, args.seed)
    if not train_pairs:
        raise ValueError(f"{', '.join(args.data)}: no usable preference pairs")
    return train_pairs, eval_pairs


def run(args):
    """The script on parsed flags (parser.parse_args, or training.script_args from a typed config)."""
    training.check_flags(args, ge1="epochs batch_size max_prompt_tokens max_completion_tokens bucket_window",
                         pos="lr beta",
                         nonneg="save_every micro_batch_size warmup weight_decay grad_clip nll_weight stop_after lora_rank max_loss_jump",
                         unit="min_lr_ratio", unit_open="eval_frac", half="label_smoothing")
    args.micro_batch_size = args.micro_batch_size or args.batch_size
    if args.soft_labels and args.label_smoothing:
        raise ValueError("give --label-smoothing or --soft-labels, not both")
    torch.manual_seed(args.seed)
    resolve_device(args.device)
    log_path, state_dir = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "state")
    path = resolve_path(args.model)
    tok = load_tokenizer(path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    train_pairs, eval_pairs = load_data(args, tok)
    resuming = training.start_run(args.out, args, logs=("log.jsonl", "eval_before.json", "eval.json", "curves.png"),
                                  outputs=(os.path.join(args.out, "final"),), run_flag="--out")
    os.makedirs(args.out, exist_ok=True)
    guard = training.DivergenceGuard(state_dir, math.log(2) if args.loss == "sigmoid" and not args.nll_weight else None,
                                     args.max_loss_jump)

    model = load_policy(path, args)
    peaks = {"load": training.peak_memory_mb(args.device)}
    training.reset_peak_memory(args.device)
    ref = cached_reference(model, train_pairs, eval_pairs, pad_id, args, path)
    peaks["reference"] = training.peak_memory_mb(args.device)
    lengths = [pair_length(p) for p in train_pairs]

    opt = training.make_optimizer(model, args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_pairs) / args.batch_size)
    total = args.epochs * steps_per_epoch
    same = {"n_train": len(train_pairs), "n_eval": len(eval_pairs), "pairs": training.digest([train_pairs, eval_pairs])}
    start = training.resume_state(state_dir, model, opt, guard, [log_path], same=same, name="dpo")[0] if resuming else 0
    if not resuming:  # what --resume reads back
        atomic_write(os.path.join(args.out, "eval_before.json"),
                     json.dumps(evaluate(model, eval_pairs, ref["eval"], pad_id, args), indent=2))
    with open(os.path.join(args.out, "eval_before.json"), encoding="utf-8") as f:
        before = json.load(f)
    if eval_pairs:
        print(f"dpo: held-out ({len(eval_pairs)} pairs) before: " + _fmt(before))

    def one_step(step, lr):  # the pairs of this step (batch_rows), train_step, the log row
        rows = batch_rows(len(train_pairs), args.batch_size, args.seed, step, steps_per_epoch, lengths, args.bucket_window)
        t0 = time.perf_counter()
        m = train_step(model, opt, train_pairs, ref["train"], rows, pad_id, args, step, guard)
        n_tok = sum(len(train_pairs[i][k]) + len(train_pairs[i]["prompt"]) for i in rows for k in ("chosen", "rejected"))
        return {**m, "step": step + 1, "epoch": step / steps_per_epoch, "lr": lr,
                "tok_s": n_tok / max(time.perf_counter() - t0, 1e-9), "peak_mem_mb": training.peak_memory_mb(args.device)}, None

    model.train()
    end = total if not args.stop_after else min(total, start + args.stop_after)
    training.reset_peak_memory(args.device)
    step, _ = training.train_loop(one_step, model, opt, guard, start=start, end=end, log_path=log_path,
                                  schedule=dict(lr=args.lr, warmup=args.warmup, total=total, min_ratio=args.min_lr_ratio),
                                  save_every=args.save_every, show=partial(show, total=total), quiet=args.quiet,
                                  extra=same)
    peaks["train"] = training.peak_memory_mb(args.device)
    print("dpo: peak memory " + ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items()))
    rows = training.finish_log(log_path, step, os.path.join(args.out, "curves.png"),
                               keys=("loss", "reward_margin", "reward_accuracy"), title=f"DPO ({args.loss})")
    if end < total:
        return rows
    after = evaluate(model, eval_pairs, ref["eval"], pad_id, args)
    if eval_pairs:
        print(f"dpo: held-out ({len(eval_pairs)} pairs) after:  " + _fmt(after))
        atomic_write(os.path.join(args.out, "eval.json"), json.dumps({"before": before, "after": after}, indent=2))
    if args.lora_rank:
        from minicai.lora import merge_lora
        merge_lora(model)
    save_pretrained(model.eval(), tok, os.path.join(args.out, "final"),
                    extra_files={"dpo_args.json": json.dumps(vars(args), indent=2)})
    print(f"dpo: saved {os.path.join(args.out, 'final')}")
    return rows


def _fmt(e):
    return (f"loss {e['loss']:.4f} | reward acc {e['reward_accuracy']:.2f} | reward margin {e['reward_margin']:+.4f} "
            f"| logp margin {e['logp_margin']:+.2f}")


def main(argv=None):
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    training.script_main(main, "train.dpo")
