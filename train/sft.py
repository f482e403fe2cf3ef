"""Stage 1 of Constitutional AI (SL-CAI, Bai et al., 2022, sec. 3): supervised fine-tuning on the revisions.

The model is trained on (prompt, final revision) pairs written by train.critique_revise, optionally mixed
with helpful (prompt, response) data (--mix) so it is not trained on refusals alone. Loss: the usual
next-token cross-entropy on response tokens only,

    L = -1/|M| sum_{t in M} log p(x_t | x_<t),   M = response tokens + the end-of-turn token,

averaged over every response token of the optimizer step (all gradient-accumulation micro-batches
together, so a long answer is not down-weighted). Log-probs come from the fused path
(minicai.logprobs.cross_entropy_loss on the final hidden states and the unembedding, which forms the
gradients chunk by chunk during the forward): the [tokens, vocab] logits are never materialised.

Speed: micro-batches are right padded and the forward gets no attention mask (the fast causal kernel; right
padding is invisible to real tokens under causal attention); --bucket-window sorts windows of the shuffled
order by length so little is padded (the order stays a function of --seed and the position: resume is
exact); --autocast runs the forward in bf16 over fp32 master weights, the loss math in fp32. Each log row
has tok_s (real tokens per second of the step), padding (share of padded positions) and peak_mem_mb.

Data rules (minicai.sft_data): malformed JSON or a row with missing / wrong-typed fields is an error naming
file:line; a row with an empty response, or longer than --max-len tokens, is skipped and counted.

Outputs: --out gets an HF-format checkpoint (LoRA merged), with train_log.jsonl, training_args.json and
loss.png beside the weights. --run-dir (default OUT.run) holds the live log, plot and the training state,
saved atomically every --save-every steps; --resume continues from it and reproduces the uninterrupted
run's losses and weights exactly (same data order, optimizer moments and RNG states). Every input is read
and checked before anything is written; a fresh run over an earlier one needs --overwrite. A diverging
run stops with the step and the measure and keeps the last good state (minicai.training.DivergenceGuard).

    python -m train.sft --data runs/revisions.jsonl --out runs/sft --max-steps 40
"""
import json
import math
import os
import time
from contextlib import nullcontext
from functools import partial

import torch

from minicai.checkpoint import resolve_device, save_pretrained
from minicai.io import atomic_write
from minicai.logprobs import cross_entropy_loss
from minicai.lora import apply_lora, merge_lora
from minicai.pretrained import load_pretrained
from minicai.sft_data import IGNORE, build_examples, collate, read_sft_rows
from minicai import training

parser = training.script_parser(__doc__)
parser.add_argument("--model", default="default", help="checkpoint to fine-tune ('default' = SmolLM2-135M-Instruct)")
parser.add_argument("--data", nargs="+", required=True,
                    help="critique_revise output JSONL file(s): trains on (messages/prompt, final)")
parser.add_argument("--mix", nargs="*", default=[],
                    help="extra JSONL file(s) of prompt+response, or messages ending in an assistant turn")
parser.add_argument("--out", required=True, help="output directory of the final HF-format checkpoint")
parser.add_argument("--run-dir", default=None, help="training state, live log and plot (default: OUT.run)")
parser.add_argument("--max-len", type=int, default=512, help="examples longer than this many tokens are skipped")
parser.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data (ignored with --max-steps)")
parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0 = from --epochs)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5, or 2e-4 with LoRA)")
parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps spent in linear warmup")
parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank r (0 = full fine-tuning)")
parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (update scaled by alpha/r)")
parser.add_argument("--lora-targets", default="q,k,v,o", help="comma-separated linear layer names to adapt")
parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
training.add_train_flags(parser)
training.add_speed_flags(parser)


def batch_loss(model, batch, n_tokens, autocast=nullcontext):
    """Sum over the batch's labelled tokens of -log p(label), divided by n_tokens (the step's total),
    via the fused log-prob path. batch: input_ids, labels [B, T], right padded. The forward (under
    autocast()) gets no attention mask: causal attention alone keeps right padding out of every real
    token's view, and the mask-free call is the fast causal kernel. The loss is fp32, outside autocast."""
    with autocast():
        hidden = model(batch["input_ids"], return_hidden=True)                  # [B, T, H]
    with training.autocast("off", hidden.device):
        targets = batch["labels"][:, 1:]                                    # [B, T-1] hidden at t predicts t+1
        return cross_entropy_loss(hidden[:, :-1], model.output_weight, targets, ignore_index=IGNORE,
                                  reduction="sum") / n_tokens


def sft_step(model, optimizer, micro, pad_id, *, grad_clip=1.0, autocast=nullcontext, guard=None, step=0) -> dict:
    """One optimizer step on `micro`, a list of micro-batches, each a list of examples {input_ids, labels}
    (build_examples'): the loss is the mean over every loss token of the step, gradients are clipped to
    grad_clip (0 = off) and, with a DivergenceGuard, checked as step + 1 before the update. autocast: a
    zero-argument callable giving the forward's context (training.autocast). Returns {loss, grad_norm,
    tokens (loss tokens), real_tokens (prompt + response), padding (share of the padded positions)}."""
    device = model.output_weight.device
    batches = [collate(m, pad_id) for m in micro]
    n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    n_real = sum(len(e["input_ids"]) for m in micro for e in m)
    loss_sum = torch.zeros((), device=device)
    for b in batches:
        loss = batch_loss(model, {k: v.to(device) for k, v in b.items()}, max(n_tokens, 1), autocast)
        with training.autocast("off", device):  # the fused log-prob backward stays fp32 under an outer autocast
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = training.clip_and_step(optimizer, step, loss_sum, grad_clip, guard)
    padded = sum(b["input_ids"].numel() for b in batches)
    return {"loss": float(loss_sum), "grad_norm": grad_norm, "tokens": n_tokens, "real_tokens": n_real,
            "padding": 1 - n_real / padded}


def load_data(args, tokenizer, rows):
    examples, skipped = build_examples(tokenizer, rows, args.max_len)
    print(f"sft: {len(rows)} rows from {len(args.data) + len(args.mix)} file(s); skipped {skipped['empty']} "
          f"with an empty response and {skipped['too_long']} longer than --max-len={args.max_len} tokens")
    if not examples:
        raise ValueError(f"{', '.join([*args.data, *args.mix])}: no training examples (the file(s) have no rows, "
                         f"or all were skipped as empty or over-long)")
    return examples


def run(args):
    """The script on parsed flags (parser.parse_args, or training.script_args from a typed config)."""
    lora = args.lora_rank > 0
    if args.lr is None:
        args.lr = 2e-4 if lora else 2e-5
    training.check_flags(args, ge1="batch_size grad_accum max_len bucket_window", pos="epochs lr lora_alpha", unit="min_lr_ratio",
                         nonneg="max_steps save_every weight_decay grad_clip lora_rank max_loss_jump",
                         unit_open="warmup_ratio lora_dropout")
    run_dir = args.run_dir or args.out.rstrip("/") + ".run"
    state_dir, log_path, png_path = (os.path.join(run_dir, n) for n in ("state", "train_log.jsonl", "loss.png"))
    device = resolve_device(args.device)
    rows = [r for path in [*args.data, *args.mix] for r in read_sft_rows(path)]  # every input checked first
    torch.manual_seed(args.seed)  # LoRA's A initialisation
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=device)
    examples = load_data(args, tokenizer, rows)
    resuming = training.start_run(run_dir, args, logs=("train_log.jsonl", "loss.png"), outputs=(args.out,))
    atomic_write(os.path.join(run_dir, "args.json"), json.dumps(vars(args), indent=2))  # what --resume must match
    if lora:
        wrapped = apply_lora(model, args.lora_targets, rank=args.lora_rank, alpha=args.lora_alpha,
                             dropout=args.lora_dropout)
        n_train = sum(p.numel() for _, p in training.trainable_named_parameters(model))
        print(f"sft: LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(wrapped)} layers, "
              f"{n_train:,} trainable parameters")
    model.gradient_checkpointing = args.gradient_checkpointing
    model.train()
    optimizer = training.make_optimizer(model, args.lr, args.weight_decay)
    guard = training.DivergenceGuard(state_dir, math.log(model.config.vocab_size), args.max_loss_jump)
    per_epoch = math.ceil(math.ceil(len(examples) / args.batch_size) / args.grad_accum)
    total = args.max_steps or max(1, math.ceil(per_epoch * args.epochs))
    step, position = 0, {"epoch": 0, "batch": 0}
    if resuming:
        step, position, _ = training.resume_state(state_dir, model, optimizer, guard, [log_path],
                                                  {"n_examples": len(examples)}, "sft")
    autocast = partial(training.autocast, args.autocast, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = training.micro_batches(len(examples), args.batch_size, args.seed, position,
                                     lengths=[len(e["input_ids"]) for e in examples], window=args.bucket_window)
    load_mb, t0 = training.peak_memory_mb(device), time.time()
    training.reset_peak_memory(device)

    def one_step(step, lr):  # the next grad-accum micro-batches of the data order, sft_step, the log row
        micro = []
        for _ in range(args.grad_accum):
            idx, position = next(batches)
            micro.append([examples[i] for i in idx])
        t = time.perf_counter()
        m = sft_step(model, optimizer, micro, pad_id, grad_clip=args.grad_clip, autocast=autocast, guard=guard, step=step)
        return {"step": step + 1, "loss": m["loss"], "lr": lr, "grad_norm": m["grad_norm"], "tokens": m["tokens"],
                "epoch": position["epoch"] + position["batch"] / math.ceil(len(examples) / args.batch_size),
                "tok_s": round(m["real_tokens"] / (time.perf_counter() - t), 1), "padding": round(m["padding"], 4),
                "peak_mem_mb": round(training.peak_memory_mb(device)), "elapsed_s": round(time.time() - t0, 3)}, position

    step, position = training.train_loop(
        one_step, model, optimizer, guard, start=step, end=total, position=position, log_path=log_path,
        schedule=dict(lr=args.lr, warmup=int(args.warmup_ratio * total), total=total, min_ratio=args.min_lr_ratio),
        save_every=args.save_every, extra={"n_examples": len(examples), "total_steps": total}, quiet=args.quiet,
        show=lambda r: {"loss": f"{r['loss']:.4f}", "lr": f"{r['lr']:.2e}", "tok_s": f"{r['tok_s']:.0f}"})
    print(f"sft: peak memory {load_mb:.0f} MB loading, {training.peak_memory_mb(device):.0f} MB training")
    rows = training.finish_log(log_path, step, png_path, title=f"SFT loss ({os.path.basename(args.out.rstrip('/'))})")
    if lora:
        merge_lora(model)
    save_pretrained(model.eval(), tokenizer, args.out, extra_files={
        "train_log.jsonl": "".join(json.dumps(r) + "\n" for r in rows), "training_args.json": json.dumps(vars(args), indent=2)})
    if rows:  # no rows: a resume after the end whose log is gone has nothing to plot
        with open(png_path, "rb") as f:
            atomic_write(os.path.join(args.out, "loss.png"), f.read())
        print(f"sft: {step} steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}; "
              f"checkpoint in {args.out}, log and plot in {run_dir}")
    return rows


def main(argv=None):
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    training.script_main(main, "train.sft")
