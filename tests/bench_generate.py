"""Benchmark: greedy decoding throughput of minicai.generate vs transformers' generate on the same weights.

Both decode exactly --new-tokens tokens per row (EOS stopping off on both sides), from the same left-padded
chat prompts, in the same dtype, in the same process, and report generated tokens per second (prefill
included: the time of the whole call) and the ratio. Runs alternate ours / transformers --repeats times and
the medians are reported, so a load spike from other processes on a shared machine hits both sides alike.
transformers is the baseline being measured, imported only inside `main`; minicai never imports it.

    python tests/bench_generate.py                     # CPU, fp32, batch 1 and 16, 128 new tokens
    python tests/bench_generate.py --device cuda --dtype bfloat16 --batch-sizes 1 16 64
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python tests/bench_generate.py
        # emulates an AVX2-only CPU on an AVX-512 one, for both sides (oneDNN, ATen kernels, MKL's sgemm)

The first line printed names the CPU and the instruction sets it ran with (cpuinfo flags and those variables).
"""
import argparse

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--model", default="default", help="checkpoint directory ('default' = SmolLM2-135M-Instruct)")
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
parser.add_argument("--repeats", type=int, default=3, help="timed runs per side, alternating ours/transformers; medians reported")
parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
parser.add_argument("--no-prepack", action="store_true", help="minicai: plain weights on CPU (generate(prepack=False))")
parser.add_argument("--skip-hf", action="store_true", help="time minicai only")
parser.add_argument("--prompts", default="data/helpful_prompts.jsonl", help="JSONL; rows with a 'prompt' string are used")

import statistics
import time

import torch

import minicai
from minicai.pretrained import resolve_path
from minicai.io import read_jsonl


ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def cpu_isa() -> str:
    """The CPU model, its vector extensions (/proc/cpuinfo flags), torch's kernel capability and the variables
    that cap the instruction sets, in one line."""
    import os

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    env = [f"{v}={os.environ[v]}" for v in ISA_VARS if v in os.environ]
    return (f"cpu {info.get('model name', 'unknown')} ({' '.join(isa) or 'no avx2'}); torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}; {' '.join(env) or 'no ISA caps set'}")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_generate(hf_model, prompts, new_tokens, pad_id, device):
    """transformers' greedy generate on left-padded prompts; returns the new tokens of each row."""
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (L - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                pad_token_id=pad_id)
    return out[:, L:].tolist()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tok = minicai.load_pretrained(args.model, dtype=dtype, device=args.device)
    rows = [r for r in read_jsonl(args.prompts) if isinstance(r.get("prompt"), str)]
    if not rows:
        raise ValueError(f"{args.prompts}: no row with a 'prompt' string")
    n = max(args.batch_sizes)
    prompts = [tok.apply_chat_template([{"role": "user", "content": rows[i % len(rows)]["prompt"]}]) for i in range(n)]
    print(cpu_isa())
    print(f"model {args.model} on {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"{args.new_tokens} new tokens per row, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens")

    def ours(batch, new_tokens):
        return [g.tokens for g in minicai.generate(model, batch, max_new_tokens=new_tokens, stop_token_ids=[],
                                                   prepack=not args.no_prepack)]

    hf_model = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM  # the baseline under test, not a minicai dependency

        hf_model = AutoModelForCausalLM.from_pretrained(resolve_path(args.model), dtype=dtype).to(args.device).eval()
        hf_model.generation_config.eos_token_id = None  # decode all new tokens, like stop_token_ids=[] for ours
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    ours([prompts[0]], 4)  # warm-up (allocator, thread pools)
    if hf_model is not None:
        hf_generate(hf_model, [prompts[0]], 4, pad, args.device)
    for bs in args.batch_sizes:
        batch = prompts[:bs]
        total = bs * args.new_tokens
        t_ours, t_hf, same = [], [], None
        for _ in range(args.repeats):
            ours_tokens, t = timed(lambda: ours(batch, args.new_tokens), args.device)
            t_ours.append(t)
            if hf_model is not None:
                hf_tokens, t = timed(lambda: hf_generate(hf_model, batch, args.new_tokens, pad, args.device), args.device)
                t_hf.append(t)
                same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
        to = statistics.median(t_ours)
        line = f"batch {bs:3d}: minicai {total / to:8.1f} tok/s (median {to:6.2f} s of {len(t_ours)})"
        if t_hf:
            th = statistics.median(t_hf)
            line += (f" | transformers {total / th:8.1f} tok/s (median {th:6.2f} s) | speedup {th / to:5.2f}x"
                     f" | identical rows {same}/{bs}")
        print(line, flush=True)
        print(f"           runs (s): minicai {[round(t, 2) for t in t_ours]}"
              + (f" transformers {[round(t, 2) for t in t_hf]}" if t_hf else ""), flush=True)


if __name__ == "__main__":
    main(parser.parse_args())
