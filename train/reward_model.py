"""Preference (reward) model of RL-CAI (Bai et al., 2022, sec. 4.1), trained on the AI preference labels.

The model is the policy's transformer trunk with a scalar head (minicai.reward.RewardModel), initialised from
an LM checkpoint (--model: the SFT output, or "default"); the reward is read at the last real token of
prompt + response, which is the end-of-turn token (EOS) the chat template closes the response with. Loss:
the Bradley-Terry negative log-likelihood (minicai.losses.bradley_terry_loss), with d = r(x, y_c) - r(x, y_r):

    hard labels (Ouyang et al., 2022, eq. 1):                 L = -log sigmoid(d - m)
    --soft-labels p = soft_label (Bai et al., 2022, sec. 4.1): L = -[p log sigmoid(d - m) + (1-p) log sigmoid(-(d - m))]

--margin M sets m = M (2p - 1) per pair (p = the row's soft_label, 1 when absent): Llama 2's margin
(Touvron et al., 2023, eq. 2) grows with the preference strength; here the strength is the feedback model's
confidence instead of a human rating. The loss is averaged over every pair of the optimizer step (all
gradient-accumulation micro-batches together).

Data: JSONL in TRL's preference format (train.label_preferences output), read by minicai.preferences: prompt,
chosen, rejected, optional soft_label in [0, 1] and chosen_finish_reason / rejected_finish_reason; a bad row is
an error naming file:line, empty or identical pairs are skipped and counted. Each side is tokenised as
chat_template(prompt) + response + EOS, the layout SFT and DPO use, except a response cut at the sampler's
length cap (no EOS); pairs longer than --max-len tokens are skipped and counted.

Held-out split: --eval-frac of the distinct prompts (seeded by --seed), so no prompt is on both sides.
Accuracy (share of pairs with r_c > r_r; chance 0.5), mean margin r_c - r_r and the chosen / rejected
reward mean and std are reported on it before and after training, and every --eval-every steps;
--extra-eval files (e.g. data/eval/judge_labelled.jsonl turned into pairs) are scored before and after too.
When the held-out pairs come from more than one `source` (label_preferences --sources), the accuracy after
training is also reported per source (held_out_after_by_source).

Outputs: --out gets the reward model in transformers' *ForSequenceClassification layout
(minicai.reward.save_reward_model; load it with minicai.reward.load_reward_model), with reward_metrics.json,
train_log.jsonl, training_args.json and loss.png beside the weights. --run-dir (default OUT.run) holds the
live log, plot and the training state (minicai.training), saved atomically every --save-every steps;
--resume continues from it and reproduces the uninterrupted run exactly. Every input is read and checked
before anything is written; a fresh run over an earlier one needs --overwrite. A diverging run (NaN/inf,
zero gradient, loss back at ln 2, a loss jump) stops and keeps the last good state (training.DivergenceGuard).

    python -m train.reward_model --data runs/prefs.jsonl --model runs/sft --out runs/rm --epochs 2
"""
import json
import math
import os
import time
from contextlib import nullcontext
from functools import partial

import torch

from minicai import training
from minicai.checkpoint import resolve_device
from minicai.io import append_jsonl, atomic_write
from minicai.losses import bradley_terry_loss
from minicai.model import pad_batch
from minicai.preferences import encode_pair, read_pair_files, read_pairs, split_by_prompt
from minicai.pretrained import resolve_path
from minicai.reward import load_reward_model, save_reward_model
from minicai.tokenizer import load_tokenizer

parser = training.script_parser(__doc__)
parser.add_argument("--data", nargs="+", required=True, help="preference JSONL file(s) (train.label_preferences output)")
parser.add_argument("--model", default="default", help="LM checkpoint to start from (the SFT output; 'default' = SmolLM2-135M-Instruct)")
parser.add_argument("--out", required=True, help="output directory of the reward model")
parser.add_argument("--run-dir", default=None, help="training state, live log and plot (default: OUT.run)")
parser.add_argument("--eval-frac", type=float, default=0.1, help="fraction of the distinct prompts held out for evaluation")
parser.add_argument("--max-len", type=int, default=1024, help="pairs with a side longer than this many tokens are skipped")
parser.add_argument("--padding", choices=("right", "left"), default="right", help="padding side of a batch (the reward does not depend on it)")
parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (2x sequences)")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs (ignored with --max-steps)")
parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = from --epochs)")
parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps spent in linear warmup")
parser.add_argument("--margin", type=float, default=0.0, help="M: require r_c - r_r > M (2 soft_label - 1) (0 = no margin)")
parser.add_argument("--soft-labels", "--use-soft-labels", action="store_true", help="train on the rows' soft_label (required field) instead of hard labels")
parser.add_argument("--extra-eval", nargs="*", default=[], help="preference files scored before and after training, never trained on (e.g. hand-labelled pairs)")
parser.add_argument("--eval-every", type=int, default=0, help="evaluate on the held-out pairs every N steps (0 = before and after only)")
training.add_train_flags(parser)
training.add_speed_flags(parser, bucket=False)


# ----------------------------------------------------------------------------- data

def encode_pairs(tokenizer, pairs, max_len) -> tuple:
    """Token ids of both sides, chat_template(prompt) + response (+ EOS: preferences.encode_pair). Skips pairs
    over max_len."""
    out, too_long = [], 0
    for pr in pairs:
        prompt, c, r = encode_pair(tokenizer, pr)
        if len(prompt) + max(len(c), len(r)) > max_len:
            too_long += 1
            continue
        out.append({**pr, "chosen_ids": prompt + c, "rejected_ids": prompt + r})
    return out, too_long


def collate_pairs(examples, pad_id, side="right", device=None) -> tuple:
    """[2B, T] input_ids and attention_mask: the B chosen sequences, then the B rejected ones."""
    return pad_batch([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pad_id, side, device)


def pair_rewards(rm, examples, pad_id, side, autocast=nullcontext) -> tuple:
    """(r_chosen [B], r_rejected [B]) in one forward over both sides."""
    ids, mask = collate_pairs(examples, pad_id, side, rm.score.weight.device)
    with autocast():
        r = rm(ids, mask)                                                     # [2B]
    return r[:len(examples)], r[len(examples):]


def pair_targets(examples, margin, soft_labels, device) -> tuple:
    """(margin [B] or None, soft labels [B] or None) for bradley_terry_loss."""
    p = torch.tensor([e["p"] for e in examples], device=device)
    return (margin * (2 * p - 1) if margin else None), (p if soft_labels else None)


@torch.no_grad()
def evaluate(rm, examples, batch_size, pad_id, side, autocast=nullcontext) -> dict:
    """Held-out accuracy (r_c > r_r), hard-label BT loss, mean margin, chosen/rejected reward mean and std."""
    was_training = rm.training
    rm.eval()
    rc, rr = [], []
    for i in range(0, len(examples), batch_size):
        c, r = pair_rewards(rm, examples[i:i + batch_size], pad_id, side, autocast)
        rc.append(c.float().cpu()), rr.append(r.float().cpu())
    rm.train(was_training)
    rc, rr = torch.cat(rc), torch.cat(rr)
    loss, _ = bradley_terry_loss(rc, rr)
    longer = torch.tensor([len(e["chosen_ids"]) > len(e["rejected_ids"]) for e in examples], dtype=torch.float)

    def std(x):
        return float(x.std()) if len(x) > 1 else 0.0

    return {"n": len(examples), "accuracy": float((rc > rr).float().mean()), "loss": float(loss),
            "margin": float((rc - rr).mean()), "chosen_mean": float(rc.mean()), "chosen_std": std(rc),
            "rejected_mean": float(rr.mean()), "rejected_std": std(rr),
            "longer_is_chosen": float(longer.mean())}  # the accuracy of "prefer the longer response"


def load_data(args, tokenizer) -> tuple:
    pairs, skipped = read_pair_files(args.data, args.soft_labels)
    examples, too_long = encode_pairs(tokenizer, pairs, args.max_len)
    print(f"reward_model: {len(pairs) + sum(skipped.values())} pairs from {len(args.data)} file(s); skipped "
          f"{skipped['identical']} with identical responses, {skipped['empty']} with an empty response and "
          f"{too_long} longer than --max-len={args.max_len} tokens")
    train, held = split_by_prompt(examples, args.eval_frac, args.seed)
    if not train:
        raise ValueError(f"{', '.join(args.data)}: no training pairs left after skipping bad rows and holding "
                         f"out --eval-frac")
    print(f"reward_model: {len(train)} training pairs, {len(held)} held out "
          f"({len({e['key'] for e in held})} of {len({e['key'] for e in examples})} prompts)")
    return train, held


def describe(m) -> str:
    return (f"accuracy {m['accuracy']:.3f} (chance 0.5, n={m['n']}), loss {m['loss']:.4f}, margin {m['margin']:+.3f}, "
            f"chosen {m['chosen_mean']:+.3f}±{m['chosen_std']:.3f}, rejected {m['rejected_mean']:+.3f}±{m['rejected_std']:.3f}")


def scores_before(score, held, extra_sets, log_path) -> tuple:
    """Held-out metrics (logged as step 0) and --extra-eval metrics before any update."""
    before = score(held) if held else None
    if before:
        print(f"reward_model: held-out before training: {describe(before)}")
        append_jsonl(log_path, {"step": 0, **{f"eval_{k}": v for k, v in before.items()}})
    extra_before = {p: score(ex) for p, ex in extra_sets.items()}
    for p, m in extra_before.items():
        print(f"reward_model: {p} before training: {describe(m)}")
    return before, extra_before


def scores_after(score, train, held, extra_sets, before, extra_before, step) -> dict:
    """reward_metrics.json: held-out before / after (per pair source when they mix, label_preferences
    --sources), the training pairs after, --extra-eval before / after; printed."""
    after = score(held) if held else None
    sources = sorted({e["source"] for e in held})
    by_source = {s: score([e for e in held if e["source"] == s]) for s in sources} if len(sources) > 1 else {}
    metrics = {"held_out_before": before, "held_out_after": after, "held_out_after_by_source": by_source,
               "train_after": score(train), "steps": step, "n_train": len(train), "n_eval": len(held),
               "chance_accuracy": 0.5, "extra_eval": {p: {"before": (extra_before or {}).get(p), "after": score(ex)}
                                                      for p, ex in extra_sets.items()}}
    for s, m in by_source.items():
        print(f"reward_model: held-out after, source {s or '(none)'}: {describe(m)}")
    print(f"reward_model: {step} steps; training pairs after: {describe(metrics['train_after'])}")
    if after:
        print(f"reward_model: held-out before: {describe(before)}")
        print(f"reward_model: held-out after:  {describe(after)}")
    for p, m in metrics["extra_eval"].items():
        if m["before"]:
            print(f"reward_model: {p} before: {describe(m['before'])}")
        print(f"reward_model: {p} after:  {describe(m['after'])}")
    return metrics


# ----------------------------------------------------------------------------- training

def rm_step(rm, optimizer, micro, pad_id, args, step, guard=None, autocast=nullcontext) -> dict:
    """One optimizer step on `micro` (lists of encoded pairs): the Bradley-Terry loss (--margin, --soft-labels)
    averaged over every pair of the step, then training.clip_and_step. Returns the step's metrics."""
    n_pairs = sum(map(len, micro))
    loss_value = correct = margin_sum = 0.0
    for mb in micro:
        rc, rr = pair_rewards(rm, mb, pad_id, args.padding, autocast)
        margin, soft = pair_targets(mb, args.margin, args.soft_labels, rc.device)
        loss, metrics = bradley_terry_loss(rc, rr, margin=margin, soft_labels=soft)
        loss = loss * (len(mb) / n_pairs)  # the step's loss is the mean over all its pairs
        loss.backward()
        loss_value += loss.item()
        correct += float(metrics["accuracy"]) * len(mb)
        margin_sum += float(metrics["reward_margin"]) * len(mb)
    grad_norm = training.clip_and_step(optimizer, step, loss_value, args.grad_clip, guard)
    return {"loss": loss_value, "accuracy": correct / n_pairs, "margin": margin_sum / n_pairs, "grad_norm": grad_norm,
            "pairs": n_pairs}


def run(args):
    """The script on parsed flags (parser.parse_args, or training.script_args from a typed config)."""
    training.check_flags(args, ge1="batch_size grad_accum max_len", pos="epochs lr", unit="min_lr_ratio",
                         nonneg="max_steps save_every eval_every weight_decay grad_clip margin max_loss_jump",
                         unit_open="warmup_ratio eval_frac")
    run_dir = args.run_dir or args.out.rstrip("/") + ".run"
    state_dir, log_path, png_path = (os.path.join(run_dir, n) for n in ("state", "train_log.jsonl", "loss.png"))
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(resolve_path(args.model))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{args.model}: the tokenizer has no eos_token (the reward is read at the EOS)")
    train, held = load_data(args, tokenizer)
    extra_sets = {path: encode_pairs(tokenizer, read_pairs(path)[0], args.max_len)[0] for path in args.extra_eval}
    for path in (p for p, ex in extra_sets.items() if not ex):
        raise ValueError(f"{path}: no usable pairs for --extra-eval")
    resuming = training.start_run(run_dir, args, logs=("train_log.jsonl", "loss.png"), outputs=(args.out,))
    atomic_write(os.path.join(run_dir, "args.json"), json.dumps(vars(args), indent=2))  # what --resume must match
    torch.manual_seed(args.seed)  # the head's initialisation
    rm = load_reward_model(args.model, dtype=args.dtype, device=device, init_from_lm=True)
    rm.trunk.gradient_checkpointing = args.gradient_checkpointing
    rm.train()
    optimizer = training.make_optimizer(rm, args.lr, args.weight_decay)
    guard = training.DivergenceGuard(state_dir, math.log(2), args.max_loss_jump)
    autocast = partial(training.autocast, args.autocast, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    score = lambda examples: evaluate(rm, examples, args.batch_size, pad_id, args.padding, autocast)

    per_epoch = math.ceil(math.ceil(len(train) / args.batch_size) / args.grad_accum)
    total = args.max_steps or max(1, math.ceil(per_epoch * args.epochs))
    step, position = 0, {"epoch": 0, "batch": 0}
    if resuming:
        step, position, saved = training.resume_state(state_dir, rm, optimizer, guard, [log_path],
                                                      {"n_train": len(train), "n_eval": len(held)}, "reward_model")
        before, extra_before = saved.get("before"), saved.get("extra_before")
    else:
        before, extra_before = scores_before(score, held, extra_sets, log_path)
    batches = training.micro_batches(len(train), args.batch_size, args.seed, position)
    t0 = time.time()

    def one_step(step, lr):  # the next grad-accum micro-batches of pairs, rm_step, the log row
        micro = []
        for _ in range(args.grad_accum):
            idx, position = next(batches)
            micro.append([train[i] for i in idx])
        m = rm_step(rm, optimizer, micro, pad_id, args, step, guard, autocast)
        row = {"step": step + 1, "loss": m["loss"], "accuracy": m["accuracy"], "margin": m["margin"], "lr": lr,
               "grad_norm": m["grad_norm"], "pairs": m["pairs"], "elapsed_s": round(time.time() - t0, 3),
               "epoch": position["epoch"] + position["batch"] / math.ceil(len(train) / args.batch_size)}
        if held and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            row.update({f"eval_{k}": v for k, v in score(held).items()})
        return row, position

    step, position = training.train_loop(
        one_step, rm, optimizer, guard, start=step, end=total, position=position, log_path=log_path,
        schedule=dict(lr=args.lr, warmup=int(args.warmup_ratio * total), total=total, min_ratio=args.min_lr_ratio),
        save_every=args.save_every, quiet=args.quiet, show=lambda r: {"loss": f"{r['loss']:.4f}", "acc": f"{r['accuracy']:.2f}"},
        extra={"n_train": len(train), "n_eval": len(held), "total_steps": total, "before": before, "extra_before": extra_before})
    rm.eval()
    metrics = scores_after(score, train, held, extra_sets, before, extra_before, step)
    rows = training.finish_log(log_path, step, png_path, keys=("loss", "eval_loss", "accuracy", "eval_accuracy"),
                               title=f"reward model ({os.path.basename(args.out.rstrip('/'))})",
                               last={f"eval_{k}": v for k, v in (metrics["held_out_after"] or {}).items()})
    save_reward_model(rm, tokenizer, args.out, extra_files={
        "reward_metrics.json": json.dumps(metrics, indent=2), "training_args.json": json.dumps(vars(args), indent=2),
        "train_log.jsonl": "".join(json.dumps(r) + "\n" for r in rows)})
    if rows:  # no rows: a resume after the end whose log is gone has nothing to plot
        with open(png_path, "rb") as f:
            atomic_write(os.path.join(args.out, "loss.png"), f.read())
    print(f"reward_model: saved to {args.out}; log and plot in {run_dir}")
    return metrics


def main(argv=None):
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    training.script_main(main, "train.reward_model")
