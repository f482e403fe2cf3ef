"""Benchmark: the stages that generate, against the sampler's own benchmark, in one process on one model.

Three measurements, each generated tokens per second of the whole call (prefill and prepacking included):
1. sampler: fixed-length greedy decoding (EOS off), chat prompts of similar length (tests/bench_generate.py's
   setting), at the rollout's and at the evaluation's batch size;
2. PPO rollout: what train.ppo's rollout runs, temperature sampling with EOS stopping, on a mix of red-team and
   helpful prompts of different lengths, one batch per call;
3. evaluation: minicai.evaluate.generate_cached (its batching, its sort, its cache file) on the same mix.
The ratios 2/1 and 3/1 are what issue #17 targets (>= 0.8). Runs alternate --repeats times; medians reported.

    python tests/bench_rollout.py            # default model, fp32, batch 8 x 64 tokens, evaluation 16 x 96
    python tests/bench_rollout.py --quick    # a smoke run: batch 4 x 8 tokens, evaluation 4 x 8, one repeat
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="default", help="checkpoint directory ('default' = SmolLM2-135M-Instruct)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (all three)")
parser.add_argument("--batch", type=int, default=8, help="PPO rollout batch (train.ppo --batch-size)")
parser.add_argument("--new-tokens", type=int, default=64, help="PPO rollout max new tokens")
parser.add_argument("--temperature", type=float, default=0.7, help="PPO rollout sampling temperature")
parser.add_argument("--eval-batch", type=int, default=16, help="evaluation batch (minicai eval --batch-size)")
parser.add_argument("--eval-prompts", type=int, default=32, help="prompts the evaluation generates for")
parser.add_argument("--eval-new-tokens", type=int, default=96, help="evaluation max new tokens")
parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measurement; medians reported")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (checks the script runs)")

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import minicai
import minicai.sampling
from bench_generate import cpu_isa
from minicai.evaluate import generate_cached
from minicai.io import read_jsonl


def chat_prompts(tok, path, n):
    rows = [r["prompt"] for r in read_jsonl(path) if isinstance(r.get("prompt"), str)]
    return [[{"role": "user", "content": rows[i % len(rows)]}] for i in range(n)]


def mixed_prompts(tok, n):
    """Red-team and helpful prompts interleaved: different lengths in every batch, as in train.ppo."""
    red, helpful = chat_prompts(tok, "data/red_team_prompts.jsonl", n), chat_prompts(tok, "data/helpful_prompts.jsonl", n)
    return [(red if i % 2 else helpful)[i] for i in range(n)]


def counting_generate():
    """minicai.sampling.generate wrapped to count generated tokens (generate_cached returns text only)."""
    real, count = minicai.sampling.generate, [0]

    def wrapped(*a, **kw):
        out = real(*a, **kw)
        count[0] += sum(len(g.tokens) for g in out)
        return out
    return wrapped, count, real


def main(args):
    if args.quick:
        args.batch, args.new_tokens, args.eval_batch, args.eval_prompts, args.eval_new_tokens = 4, 8, 4, 4, 8
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = minicai.load_pretrained(args.model, dtype=getattr(torch, args.dtype))
    print(cpu_isa())
    print(f"model {args.model} {args.dtype}, {torch.get_num_threads()} threads")
    enc = lambda convs: [tok.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    same = enc(chat_prompts(tok, "data/helpful_prompts.jsonl", max(args.batch, args.eval_batch)))
    rollout = enc(mixed_prompts(tok, args.batch))
    evals = mixed_prompts(tok, args.eval_prompts)
    minicai.generate(model, same[:1], max_new_tokens=4)  # warm-up
    wrapped, count, real = counting_generate()

    def sampler(bs, n):
        out = minicai.generate(model, same[:bs], max_new_tokens=n, stop_token_ids=[])
        return sum(len(g.tokens) for g in out)

    def ppo(seed):
        out = minicai.generate(model, rollout, max_new_tokens=args.new_tokens, temperature=args.temperature,
                               stop_token_ids=[tok.eos_token_id], seed=seed, tokenizer=tok)
        return sum(len(g.tokens) for g in out)

    def evaluation(seed):
        count[0] = 0
        with tempfile.TemporaryDirectory() as d:
            minicai.sampling.generate = wrapped  # generate_cached imports it at call time
            try:
                generate_cached(model, tok, f"bench-{seed}", evals, os.path.join(d, "cache.jsonl"),
                                max_new_tokens=args.eval_new_tokens, temperature=0.0, seed=seed,
                                batch_size=args.eval_batch, progress=False)
            finally:
                minicai.sampling.generate = real
        return count[0]

    runs = {"sampler@rollout": lambda i: sampler(args.batch, args.new_tokens), "ppo rollout": ppo,
            "sampler@eval": lambda i: sampler(args.eval_batch, args.eval_new_tokens), "evaluation": evaluation}
    rates = {name: [] for name in runs}
    for i in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            n = fn(i)
            rates[name].append(n / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"rollout batch {args.batch} x {args.new_tokens} (prompts {min(map(len, rollout))}-{max(map(len, rollout))} tokens, "
          f"T={args.temperature}, EOS stops); evaluation {args.eval_prompts} prompts, batch {args.eval_batch} x {args.eval_new_tokens}")
    for name, r in rates.items():
        print(f"{name:16s} {med[name]:8.1f} tok/s   runs {[round(x, 1) for x in r]}")
    print(f"ratio ppo rollout / sampler at batch {args.batch}: {med['ppo rollout'] / med['sampler@rollout']:.2f} (target 0.8)")
    print(f"ratio evaluation / sampler at batch {args.eval_batch}: {med['evaluation'] / med['sampler@eval']:.2f} (target 0.8)")


if __name__ == "__main__":
    main(parser.parse_args())
