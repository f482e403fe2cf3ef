"""Benchmark: training throughput and peak memory of minicai's DPO and SFT steps against TRL and transformers.

Sides, each in a fresh subprocess (so resident-memory peaks and allocator state never mix), all on the same
model and the same token ids:
- minicai-dpo: train.dpo.train_step with reference log-probs precomputed (train.dpo.reference_logprobs);
- minicai-sft: train.sft.sft_step;
- trl-dpo:     TRL's DPOTrainer, precompute_ref_log_probs=True, same beta, lr, batch and max length;
- hf-dpo:      transformers forward (loss over the completion tokens) + backward + torch AdamW on minicai's
               chosen+rejected batches: the floor of what any DPO step costs (no reference, no DPO math);
- trl-sft / hf-sft: the same for SFT on (prompt, chosen), completion-only loss on every side.
Precision: float32 (minicai --autocast off), or bfloat16 = bf16 autocast over fp32 master weights on every side
(minicai --autocast bf16, TRL bf16=True).
Gradient checkpointing is off on every side (TRL turns it on by default; --trl-defaults keeps it on).

Data: synthetic, fixed by --seed: prompts of --prompt-tokens tokens and completions of a uniform random length in
--completion-tokens (the last token is the EOS), made of single-token words so that TRL's tokeniser gives back
exactly minicai's ids (checked: a mismatch is an error). Tokens/s counts real (non-padding) tokens, prompt and
completion, chosen and rejected, per optimizer step (the share of padded positions is printed beside: minicai
and hf batch the rows as train.dpo / train.sft do, length-bucketed; TRL as its trainers do); the first step is
reported apart from the steady state (median over steps 2..N), with each step's process CPU time beside the
wall time (on a loaded shared machine the CPU time of a --threads 1 run is the steadier number; ratios are
given for both). Peak memory: the
process's resident high-water mark (CPU; getrusage) or torch.cuda.max_memory_allocated (GPU), model loading
included; "after load" is the resident size before step 1. Optimizers: each side's own default AdamW (minicai:
training.make_optimizer, foreach=False; TRL: the Trainer's adamw_torch_fused; hf: torch.optim.AdamW), same
lr, betas (0.9, 0.95), no weight decay, gradient clipping at 1.0.
Setup: reference log-probs (DPO) and, for TRL, the whole trainer construction (dataset map + tokenisation).
TRL, datasets and transformers are the peers being measured: `pip install -e '.[bench]'`; without TRL the
TRL sides are skipped with that message. HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set for every child.

    python tests/bench_train.py --quick                        # seconds-to-minutes check of every side
    python tests/bench_train.py                                # CPU, fp32 + bf16, 64 pairs, batch 4, 8 steps
    python tests/bench_train.py --device cuda --dtypes bfloat16 --json out.json
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="default", help="HF-format checkpoint dir ('default' = SmolLM2-135M-Instruct)")
parser.add_argument("--device", default="cpu", help="cpu or cuda")
parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                    help="float32, and/or bfloat16 autocast over fp32 weights")
SIDES = ["minicai-dpo", "trl-dpo", "hf-dpo", "minicai-sft", "trl-sft", "hf-sft"]
parser.add_argument("--sides", nargs="+", default=SIDES, choices=SIDES, help="which sides to run")
parser.add_argument("--pairs", type=int, default=64, help="synthetic preference pairs (SFT uses prompt + chosen)")
parser.add_argument("--batch-size", type=int, default=4, help="pairs (DPO) or examples (SFT) per optimizer step")
parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
parser.add_argument("--completion-tokens", type=int, nargs=2, default=[64, 192], metavar=("MIN", "MAX"),
                    help="completion lengths, EOS included, drawn uniformly in [MIN, MAX]")
parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first is reported apart)")
parser.add_argument("--lr", type=float, default=1e-6, help="learning rate on every side")
parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in every child (0 = torch's default)")
parser.add_argument("--trl-defaults", action="store_true",
                    help="TRL sides keep TRL's gradient_checkpointing=True default (minicai and hf stay off)")
parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of every side")
parser.add_argument("--quick", action="store_true", help="tiny check: 8 pairs, batch 2, 3 steps, 16 + 8..24 tokens")
parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per side")
parser.add_argument("--json", default=None, help="also write every side's result to this JSON file")
parser.add_argument("--child", nargs=2, default=None, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)  # internal

import importlib.util
import itertools
import json
import math
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "BENCH_TRAIN_RESULT "
PEER_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def missing_peers(sides) -> dict:
    """{side: the install command} for the sides whose peer library is not importable."""
    need = {"trl": ("trl", "datasets", "transformers"), "hf": ("transformers",)}
    out = {}
    for side in sides:
        libs = need.get(side.split("-")[0], ())
        missing = [lib for lib in libs if importlib.util.find_spec(lib) is None]
        if missing:
            out[side] = f"{', '.join(missing)} not installed: pip install -e '.[bench]'"
    return out


# ----------------------------------------------------------------------------- data (shared by every side)

def word_ids(tok) -> list:
    """Token ids that decode to ' ' + lowercase letters and encode back to themselves alone: a sequence of
    them is tokenised to exactly those ids by any byte-level BPE that splits on spaces."""
    out = []
    for i in range(min(tok.vocab_size, 20000)):
        text = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,8}", text) and tok.encode(text) == [i]:
            out.append(i)
    if len(out) < 100:
        raise ValueError(f"{tok.path}: only {len(out)} single-token words found; this benchmark needs a byte-level "
                         f"BPE vocabulary with ' word' tokens")
    return out


def make_data(tok, args) -> list:
    """[{prompt, chosen, rejected}] token-id lists; completions end with the EOS."""
    rng = random.Random(args.seed)
    words, (lo, hi) = word_ids(tok), args.completion_tokens
    sample = lambda n: [rng.choice(words) for _ in range(n)]  # noqa: E731
    return [{"prompt": sample(args.prompt_tokens), "chosen": sample(rng.randint(lo, hi) - 1) + [tok.eos_token_id],
             "rejected": sample(rng.randint(lo, hi) - 1) + [tok.eos_token_id], "soft_label": 1.0}
            for _ in range(args.pairs)]


def step_rows(task, pairs, args) -> list:
    """Pair indices of each step, as train.dpo / train.sft order them (seeded shuffle, length-bucketed in
    windows of their default --bucket-window); the minicai and hf sides train on exactly these rows."""
    from minicai import training
    from train import dpo, sft

    n, bs = len(pairs), args.batch_size
    if task == "dpo":
        lengths, window = [dpo.pair_length(p) for p in pairs], dpo.parser.get_default("bucket_window")
        return [dpo.batch_rows(n, bs, args.seed, i, math.ceil(n / bs), lengths, window) for i in range(args.steps)]
    lengths = [len(p["prompt"]) + len(p["chosen"]) for p in pairs]
    batches = training.micro_batches(n, bs, args.seed, {"epoch": 0, "batch": 0}, lengths,
                                     sft.parser.get_default("bucket_window"))
    return [rows for rows, _ in itertools.islice(batches, args.steps)]


# ----------------------------------------------------------------------------- measurement helpers

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(run_step, n_steps, device) -> dict:
    """run_step(step) -> (real tokens, padded positions) of that step; wall and process CPU seconds per step."""
    out = {"seconds": [], "cpu_s": [], "tokens": [], "padded": []}
    for step in range(n_steps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        real, padded = run_step(step)
        sync(device)
        out["seconds"].append(time.perf_counter() - t0)
        out["cpu_s"].append(time.process_time() - c0)
        out["tokens"].append(int(real))
        out["padded"].append(int(padded))
    return out


# ----------------------------------------------------------------------------- minicai sides

def run_minicai_dpo(ctx):
    import torch
    from minicai import training
    from minicai.pretrained import load_model
    from train import dpo

    args, device, pairs, pad = ctx["args"], ctx["device"], ctx["pairs"], ctx["pad_id"]
    dargs = dpo.parser.parse_args(["--data", "-", "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                                   "--beta", str(args.beta), "--device", str(device), "--autocast", ctx["autocast"]])
    dargs.micro_batch_size = dargs.batch_size  # as train.dpo's run sets it
    model = load_model(ctx["path"], dtype=torch.float32, device=device)
    ctx["after_load_mb"] = rss_mb()
    t0 = time.perf_counter()
    ref = dpo.reference_logprobs(model.eval(), pairs, pad, dargs)
    ctx["setup_s"] = time.perf_counter() - t0
    model.train()
    opt = training.make_optimizer(model, args.lr)
    guard = training.DivergenceGuard(os.path.join(ctx["tmp"], "state"), math.log(2), dargs.max_loss_jump)
    rows = step_rows("dpo", pairs, args)

    def step(i):
        dpo.train_step(model, opt, pairs, ref, rows[i], pad, dargs, i, guard)
        real = sum(len(pairs[r]["prompt"]) * 2 + len(pairs[r]["chosen"]) + len(pairs[r]["rejected"]) for r in rows[i])
        return real, 2 * len(rows[i]) * max(dpo.pair_length(pairs[r]) for r in rows[i])
    return timed_steps(step, args.steps, device)


def run_minicai_sft(ctx):
    from functools import partial

    import torch
    from minicai import training
    from minicai.pretrained import load_model
    from train import sft

    args, device, pairs = ctx["args"], ctx["device"], ctx["pairs"]
    examples = [{"input_ids": p["prompt"] + p["chosen"], "labels": [sft.IGNORE] * len(p["prompt"]) + p["chosen"]}
                for p in pairs]
    model = load_model(ctx["path"], dtype=torch.float32, device=device)
    ctx["after_load_mb"] = rss_mb()
    model.train()
    opt = training.make_optimizer(model, args.lr)
    guard = training.DivergenceGuard(os.path.join(ctx["tmp"], "state"), math.log(model.config.vocab_size),
                                     sft.parser.get_default("max_loss_jump"))
    autocast = partial(training.autocast, ctx["autocast"], device)
    rows = step_rows("sft", pairs, args)

    def step(i):
        batch = [examples[r] for r in rows[i]]
        sft.sft_step(model, opt, [batch], ctx["pad_id"], grad_clip=1.0, autocast=autocast, guard=guard, step=i)
        return sum(len(e["input_ids"]) for e in batch), len(batch) * max(len(e["input_ids"]) for e in batch)
    return timed_steps(step, args.steps, device)


# ----------------------------------------------------------------------------- transformers floor

def run_hf(ctx, task):
    """transformers forward with labels on the completion tokens + backward + torch AdamW, on minicai's rows."""
    import torch
    from transformers import AutoModelForCausalLM
    from minicai.rl import collate

    args, device, pairs, pad = ctx["args"], ctx["device"], ctx["pairs"], ctx["pad_id"]
    model = AutoModelForCausalLM.from_pretrained(ctx["path"], dtype=torch.float32).to(device).train()
    ctx["after_load_mb"] = rss_mb()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rows = step_rows(task, pairs, args)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=ctx["autocast"] == "bf16")  # noqa

    def step(i):
        prompts = [pairs[r]["prompt"] for r in rows[i]]
        completions = [pairs[r]["chosen"] for r in rows[i]]
        if task == "dpo":
            prompts, completions = prompts * 2, completions + [pairs[r]["rejected"] for r in rows[i]]
        b = collate(prompts, completions, pad, device)
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        labels[:, :b["prompt_width"]] = -100
        with autocast():
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         position_ids=b["position_ids"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum()), b["input_ids"].numel()
    return timed_steps(step, args.steps, device)


# ----------------------------------------------------------------------------- TRL

def trl_config(ctx, config_cls, **extra):
    args, device = ctx["args"], ctx["device"]
    kw = dict(output_dir=os.path.join(ctx["tmp"], "trl"), per_device_train_batch_size=args.batch_size,
              gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
              warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, seed=args.seed,
              bf16=ctx["dtype"] == "bfloat16", use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
              logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
              max_length=args.prompt_tokens + args.completion_tokens[1])
    if not args.trl_defaults:
        kw["gradient_checkpointing"] = False
    return config_cls(**kw, **extra)


def run_trl(ctx, task):
    """DPOTrainer / SFTTrainer on text that tokenises to the same ids; times each optimizer step (callback)
    and counts each step's real tokens (compute_loss)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl

    pairs, tok, device = ctx["pairs"], ctx["tok"], ctx["device"]
    text = lambda ids: tok.decode([i for i in ids if i != tok.eos_token_id])  # noqa: E731  TRL appends the EOS
    model = AutoModelForCausalLM.from_pretrained(ctx["path"], dtype=torch.float32)
    hf_tok = AutoTokenizer.from_pretrained(ctx["path"])
    ctx["after_load_mb"] = rss_mb()
    if task == "dpo":
        data = {"prompt": [text(p["prompt"]) for p in pairs], "chosen": [text(p["chosen"]) for p in pairs],
                "rejected": [text(p["rejected"]) for p in pairs]}
        config = trl_config(ctx, trl.DPOConfig, beta=ctx["args"].beta, precompute_ref_log_probs=True,
                            precompute_ref_batch_size=ctx["args"].batch_size)
        base = trl.DPOTrainer
    else:
        data = {"prompt": [text(p["prompt"]) for p in pairs], "completion": [text(p["chosen"]) for p in pairs]}
        config = trl_config(ctx, trl.SFTConfig, completion_only_loss=True, packing=False)
        base = trl.SFTTrainer
    out = {"seconds": [], "cpu_s": [], "tokens": [], "padded": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()
            out["tokens"].append(0)
            out["padded"].append(0)

        def on_step_end(self, *_, **__):
            sync(device)
            out["seconds"].append(time.perf_counter() - self.t0)
            out["cpu_s"].append(time.process_time() - self.c0)

    class Counted(base):
        def compute_loss(self, model, inputs, *a, **kw):
            out["tokens"][-1] += int(inputs["attention_mask"].sum())
            out["padded"][-1] += inputs["input_ids"].numel()
            return super().compute_loss(model, inputs, *a, **kw)

    t0 = time.perf_counter()
    trainer = Counted(model=model, args=config, train_dataset=Dataset.from_dict(data), processing_class=hf_tok,
                      callbacks=[Timer()])
    ctx["setup_s"] = time.perf_counter() - t0
    check_trl_tokens(trainer.train_dataset, pairs, task)
    trainer.train()
    return out


def check_trl_tokens(dataset, pairs, task):
    """TRL must train on exactly minicai's token ids, or the comparison is not like for like."""
    for i, (row, p) in enumerate(zip(dataset, pairs)):
        if task == "dpo":
            got = (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
            want = (p["prompt"], p["chosen"], p["rejected"])
        else:
            got, want = (row["input_ids"],), (p["prompt"] + p["chosen"],)
        if tuple(map(list, got)) != want:
            raise ValueError(f"trl-{task}: pair {i} tokenises differently under TRL than the synthetic ids "
                             f"(first ids {[list(g)[:8] for g in got]} vs {[w[:8] for w in want]})")


# ----------------------------------------------------------------------------- child / parent

def run_child(args):
    import torch
    from minicai.pretrained import resolve_path
    from minicai.tokenizer import load_tokenizer

    side, dtype = args.child
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    path = resolve_path(args.model)
    tok = load_tokenizer(path)
    threads_before = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"args": args, "device": device, "dtype": dtype, "path": path, "tok": tok, "tmp": tmp,
               "pairs": make_data(tok, args), "autocast": {"float32": "off", "bfloat16": "bf16"}[dtype],
               "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        runners = {"minicai-dpo": run_minicai_dpo, "minicai-sft": run_minicai_sft,
                   "hf-dpo": lambda c: run_hf(c, "dpo"), "hf-sft": lambda c: run_hf(c, "sft"),
                   "trl-dpo": lambda c: run_trl(c, "dpo"), "trl-sft": lambda c: run_trl(c, "sft")}
        steps = runners[side](ctx)
    result = {"side": side, "dtype": dtype, "device": str(device), **steps,
              "setup_s": ctx.get("setup_s"), "after_load_mb": ctx.get("after_load_mb"), "peak_mb": peak_mb(device),
              "threads": [threads_before, torch.get_num_threads()]}
    print(RESULT_TAG + json.dumps(result), flush=True)


def summarise(r) -> dict:
    if len(r["seconds"]) != len(r["tokens"]) or not r["seconds"]:
        raise ValueError(f"{r['side']}: {len(r['seconds'])} timed steps but {len(r['tokens'])} token counts")
    rates = [n / s for n, s in zip(r["tokens"], r["seconds"])]
    cpu_rates = [n / max(c, 1e-9) for n, c in zip(r["tokens"], r["cpu_s"])]
    steady = rates[1:] or rates
    return {**r, "first_s": r["seconds"][0], "first_tok_s": rates[0], "steady_tok_s": statistics.median(steady),
            "steady_s": statistics.median(r["seconds"][1:] or r["seconds"]),
            "steady_cpu_s": statistics.median(r["cpu_s"][1:] or r["cpu_s"]),
            "steady_cpu_tok_s": statistics.median(cpu_rates[1:] or cpu_rates),
            "padding": 1 - sum(r["tokens"]) / max(sum(r["padded"]), 1)}


def run_side(side, dtype, argv, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", side, dtype]
    env = {**os.environ, **PEER_ENV, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
    if proc.returncode or line is None:
        return None, f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
    return {**summarise(json.loads(line[len(RESULT_TAG):])), "wall_s": wall}, None


def print_table(results, dtype):
    print(f"\n{dtype}: side | first step s | steady s/step | steady CPU s/step | steady tok/s | first tok/s | "
          f"padding | setup s | peak MB | after load MB | threads | vs minicai (tok/s, peak)")
    for task in ("dpo", "sft"):
        ours = results.get((f"minicai-{task}", dtype))
        for side in (f"minicai-{task}", f"trl-{task}", f"hf-{task}"):
            r = results.get((side, dtype))
            if r is None:
                continue
            ratio = ""
            if ours is not None and side != f"minicai-{task}":
                ratio = (f"minicai {ours['steady_tok_s'] / r['steady_tok_s']:.2f}x the tok/s (CPU time: "
                         f"{ours['steady_cpu_tok_s'] / max(r['steady_cpu_tok_s'], 1e-9):.2f}x) at "
                         f"{ours['peak_mb'] / r['peak_mb']:.2f}x the peak")
            setup = f"{r['setup_s']:.1f}" if r["setup_s"] is not None else "-"
            print(f"  {side:12s} | {r['first_s']:8.2f} | {r['steady_s']:8.2f} | {r['steady_cpu_s']:8.2f} | "
                  f"{r['steady_tok_s']:8.1f} | {r['first_tok_s']:8.1f} | {r['padding']:6.1%} | {setup:>6s} | "
                  f"{r['peak_mb']:7.0f} | {r['after_load_mb']:7.0f} | "
                  f"{r['threads']} | {ratio}", flush=True)


def main(args, argv):
    if args.quick:
        argv = [*argv, "--pairs", "8", "--batch-size", "2", "--steps", "3", "--prompt-tokens", "16",
                "--completion-tokens", "8", "24"]
    skip = missing_peers(args.sides)
    for side, why in skip.items():
        print(f"{side}: skipped ({why})")
    results, failures = {}, {}
    for dtype in args.dtypes:
        for side in [s for s in args.sides if s not in skip]:
            r, err = run_side(side, dtype, argv, args.timeout)
            if err:
                failures[(side, dtype)] = err
                print(f"{side} {dtype}: FAILED: {err}", flush=True)
            else:
                results[(side, dtype)] = r
                print(f"{side} {dtype}: steps (s) {[round(s, 2) for s in r['seconds']]}, tokens {r['tokens']}, "
                      f"wall {r['wall_s']:.0f} s", flush=True)
        print_table(results, dtype)
    if args.json:
        from minicai.io import atomic_write
        atomic_write(args.json, json.dumps({"argv": argv, "results": list(results.values()),
                                            "failures": {f"{s} {d}": e for (s, d), e in failures.items()}}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    parsed = parser.parse_args()
    if parsed.child:
        run_child(parsed)
    else:
        sys.exit(main(parsed, [a for a in sys.argv[1:] if a != "--quick"]))
