"""Benchmark and GPU correctness check of the Triton attention kernel (kernels/attention.py).

    python kernels/bench_attention.py            # TFLOP/s table + padded-rows case (CUDA only)
    python kernels/bench_attention.py --check    # bf16/fp16/fp32 forward + grads vs a float64 reference

Table: causal attention, bf16 (--dtype), D in {64, 128} with H = width // D heads, T from 512 to 8192
and batch B = tokens // T (about 16k tokens per batch), for our kernel, torch SDPA restricted to its FlashAttention
backend, and naive attention (materialised T x T scores; skipped where it would not fit in memory), all
timed in the same run with triton.testing.do_bench (median).

FLOP convention (as FlashAttention's papers): a non-causal forward is 2 matmuls of 2*B*H*T*T*D FLOPs; a
causal forward counts half of that, 2*2*B*H*T*T*D/2; forward+backward counts 3.5x the forward (the
backward does 5 matmuls of the same size versus the forward's 2: 2.5x). The FLOPs are the same for every
implementation, so TFLOP/s compare like with like, even though naive attention computes the full T x T.

Padded-rows case: a [B, T] batch where every other row is left-padded to keep only a fraction of its
tokens, against the same [B, T] batch with no padding; our kernel skips key blocks that are all padding.
"""
import argparse
import importlib.util
import math
import os
import sys

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--check", action="store_true", help="correctness check on the GPU instead of the benchmark")
p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
p.add_argument("--tokens", type=int, default=16384, help="batch * T per measurement")
p.add_argument("--width", type=int, default=2048, help="model width: heads = width // D")
p.add_argument("--no-naive", action="store_true", help="skip naive attention")
p.add_argument("--mem-frac", type=float, default=0.5, help="skip naive above this fraction of GPU memory")
p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
p.add_argument("--pad-T", type=int, default=2048, help="padded-rows case: sequence length")
p.add_argument("--pad-D", type=int, default=128, help="padded-rows case: head dim")
p.add_argument("--pad-frac", type=float, default=0.5, help="padded rows keep this fraction of their tokens")
p.add_argument("--warmup", type=int, default=10, help="do_bench warmup, ms")
p.add_argument("--rep", type=int, default=50, help="do_bench measurement time, ms")
p.add_argument("--tune", action="store_true", help="--check with autotuning (default: fixed configs, fewer compiles)")
args = p.parse_args()
if args.check and not args.tune:
    os.environ.setdefault("MINICAI_ATTN_AUTOTUNE", "0")  # read when the kernel module is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if importlib.util.find_spec("triton") is None:
    print("triton is not installed: nothing to benchmark")
    sys.exit(0)
interpret = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not (args.check and interpret):
    print("no CUDA device: this benchmark needs a GPU (only --check runs on CPU, under TRITON_INTERPRET=1)")
    sys.exit(0)

try:
    from minicai_kernels.attention import attention  # installed package (pip install -e .)
except ImportError:  # plain checkout: put the repo root on the path and load kernels/attention.py by file
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    path = os.path.join(root, "kernels", "attention.py")
    spec = importlib.util.spec_from_file_location("minicai_kernels.attention", path)
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    attention = mod.attention
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]


def naive_attention(q, k, v):
    """Causal attention that materialises the scores [B, H, T, T]; softmax in the input dtype."""
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def ours(q, k, v):
    return attention(q, k, v, causal=True)


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def ms(fn):
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep)


def fwd_bwd(fn, q, k, v, do):
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def tflops(flop, t_ms):
    return f"{flop / (t_ms * 1e-3) / 1e12:7.1f}" if t_ms is not None else "      -"


def timed(fn):
    """ms, or None when the implementation runs out of memory or is unavailable."""
    try:
        return ms(fn)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception as e:  # e.g. SDPA flash backend not available for this GPU/dtype: report, go on
        print(f"  ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})")
        return None


def fmt_ms(t):
    return f"{t:8.3f}" if t is not None else "       -"


def benchmark():
    dt = DTYPE
    total_mem = torch.cuda.get_device_properties(0).total_memory
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"causal, {args.dtype}, TFLOP/s (fwd = 2*2*B*H*T*T*D/2 FLOPs, fwd+bwd = 3.5 x fwd)")
    print(f"{'D':>4} {'T':>5} {'B':>3} {'H':>3} | {'fwd ours':>8} {'flash':>7} {'naive':>7} |"
          f" {'f+b ours':>8} {'flash':>7} {'naive':>7} | max|ours-flash| (out, grads)")
    for D in args.dims:
        H = args.width // D
        for T in args.seqlens:
            B = max(1, args.tokens // T)
            q, k, v, do = (torch.randn(B, H, T, D, device=DEVICE, dtype=dt, requires_grad=i < 3) for i in range(4))
            flop = 2 * 2 * B * H * T * T * D / 2
            # sanity check of the tuned configs at this shape: max |ours - flash| over out, dq, dk, dv
            try:
                res = [(o, *torch.autograd.grad(o, (q, k, v), do)) for o in (ours(q, k, v), sdpa_flash(q, k, v))]
                diff = f"{max((a.float() - b.float()).abs().max().item() for a, b in zip(*res)):.1e}"
                del res
            except Exception as e:
                diff = f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
            row = [timed(lambda: ours(q, k, v)), timed(lambda: sdpa_flash(q, k, v))]
            # naive keeps ~3 bf16 [B,H,T,T] tensors in the forward, ~2x that with the backward
            scores = B * H * T * T * 2
            row.append(timed(lambda: naive_attention(q, k, v))
                       if not args.no_naive and 3 * scores < args.mem_frac * total_mem else None)
            row += [timed(fwd_bwd(ours, q, k, v, do)),
                    timed(fwd_bwd(sdpa_flash, q, k, v, do))]
            row.append(timed(fwd_bwd(naive_attention, q, k, v, do))
                       if not args.no_naive and 6 * scores < args.mem_frac * total_mem else None)
            flops = [flop] * 3 + [3.5 * flop] * 3
            cells = [tflops(f, t) for f, t in zip(flops, row)]
            print(f"{D:>4} {T:>5} {B:>3} {H:>3} | {cells[0]:>8} {cells[1]} {cells[2]} | "
                  f"{cells[3]:>8} {cells[4]} {cells[5]} | {diff}")
            del q, k, v, do
            torch.cuda.empty_cache()


def benchmark_padding():
    D, T, dt = args.pad_D, args.pad_T, DTYPE
    H, B = args.width // D, max(2, args.tokens // T)
    q, k, v, do = (torch.randn(B, H, T, D, device=DEVICE, dtype=dt, requires_grad=i < 3) for i in range(4))
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    n_pad = int(T * (1 - args.pad_frac))
    mask[1::2, :n_pad] = False  # every other row left-padded
    real = int(mask.sum())
    print(f"\npadded rows: D={D} T={T} B={B} H={H}, causal {args.dtype}; rows 1,3,.. keep the last {T - n_pad} tokens "
          f"({real} real of {B * T} token slots)")
    print(f"{'':24} {'fwd ms':>8} {'f+b ms':>8}")
    ours_pad = lambda a, b, c: attention(a, b, c, causal=True, key_padding_mask=mask)  # noqa: E731
    results = {}
    for name, fn in (("ours, no padding", ours), ("ours, padded rows", ours_pad)):
        results[name] = (timed(lambda: fn(q, k, v)), timed(fwd_bwd(fn, q, k, v, do)))
        print(f"{name:24} {fmt_ms(results[name][0])} {fmt_ms(results[name][1])}")
    # torch's reference point: SDPA with an explicit boolean mask (flash cannot take one)
    keep = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()[None, None] & mask[:, None, None, :]
    keep = keep | ~keep.any(-1, keepdim=True)  # no all-False rows
    sdpa_pad = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=keep)  # noqa: E731
    t = (timed(lambda: sdpa_pad(q, k, v)), timed(fwd_bwd(sdpa_pad, q, k, v, do)))
    print(f"{'torch SDPA, bool mask':24} {fmt_ms(t[0])} {fmt_ms(t[1])}")
    a, b = results["ours, no padding"], results["ours, padded rows"]
    if None in a + b:
        return
    print(f"slowdown of padded vs unpadded (ours): fwd {b[0] / a[0]:.2f}x, fwd+bwd {b[1] / a[1]:.2f}x "
          f"(< 1: padding blocks are skipped; real tokens are {real / (B * T):.0%} of the slots)")


def reference_attention(q, k, v, causal, key_padding_mask):
    """float64 attention with k/v heads repeated for GQA; rows with no visible key give exact zeros."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep.tril(Tk - Tq)
    keep = keep[None, None] if key_padding_mask is None else keep & key_padding_mask[:, None, None, :]
    empty = ~keep.any(-1, keepdim=True)
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~keep, float("-inf")).masked_fill(empty, 0)
    return torch.softmax(s, -1).masked_fill(empty, 0.0) @ v


def check():
    """Our kernel vs float64 attention on the same (rounded) inputs; torch's own error shown for scale."""
    dtypes = [torch.float16, torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float16, torch.float32]
    # (B, Hq, Hkv, Tq, Tk, D, causal, left pads per row)
    cases = [(2, 4, 4, 257, 257, 64, True, None), (2, 4, 2, 300, 300, 128, False, None),
             (2, 8, 1, 1, 333, 64, True, None), (2, 4, 2, 5, 200, 128, True, [0, 150]),
             (3, 4, 2, 190, 190, 64, True, [0, 60, 190]), (1, 2, 2, 100, 40, 64, True, None)]
    if DEVICE == "cpu":  # interpreter dry run: tiny shapes
        cases = [(2, 4, 2, 20, 20, 32, True, [0, 5]), (1, 2, 1, 3, 17, 16, True, None)]
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
    failed = 0
    for dt in dtypes:
        for B, Hq, Hkv, Tq, Tk, D, causal, pads in cases:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            q = torch.randn(B, Hq, Tq, D, device=DEVICE, generator=g).to(dt).requires_grad_()
            k, v = (torch.randn(B, Hkv, Tk, D, device=DEVICE, generator=g).to(dt).requires_grad_() for _ in "kv")
            do = torch.randn(B, Hq, Tq, D, device=DEVICE, generator=g).to(dt)
            mask = None
            if pads is not None:
                mask = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
                for b, n in enumerate(pads):
                    mask[b, :n] = False
            ref = reference_attention(q, k, v, causal, mask)
            ref_g = torch.autograd.grad(ref, (q, k, v), do.double())
            out = attention(q, k, v, causal=causal, key_padding_mask=mask)
            got_g = torch.autograd.grad(out, (q, k, v), do)
            errs = []
            for got, want in zip((out, *got_g), (ref, *ref_g)):
                err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
                errs.append(err if math.isfinite(err) else float("inf"))
            ok = max(errs) <= tol[dt]
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(dt):15} B={B} Hq={Hq} Hkv={Hkv} Tq={Tq} Tk={Tk} D={D} "
                  f"causal={causal} pads={pads}: rel err out/dq/dk/dv " + " ".join(f"{e:.1e}" for e in errs))
    print("check passed" if not failed else f"check FAILED in {failed} case(s)")
    return failed


if __name__ == "__main__":
    if args.check:
        sys.exit(1 if check() else 0)
    benchmark()
    benchmark_padding()
