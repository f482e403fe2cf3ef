"""Benchmark: fused token log-probs (ours) vs the naive path, forward + backward, peak extra memory and time.

    python kernels/bench_logprobs.py                   # CPU: the PyTorch twin, N=4096 H=576 V=49152 fp32
    python kernels/bench_logprobs.py --device cuda     # GPU: the Triton kernel, N=16384 H=2048 V=128256 bf16

naive: logits = hidden @ W.T (upcast to fp32), log_softmax, gather; loss = mean log-prob; backward to hidden
and W. ours: token_logprobs(..., with_entropy=False), same loss. Add --entropy to also compute (and
backprop) the entropy on both sides.

Peak extra memory, measured honestly per device:
- CPU: each variant runs in a fresh subprocess (no allocator or page-cache state shared). After the inputs
  exist, the kernel's peak-RSS counter is reset (write "5" to /proc/self/clear_refs) and the number reported is
  VmHWM after one forward+backward minus VmRSS before it: every byte the run touched, including the
  gradients of hidden and W (which both variants must produce; their size is printed). Falls back to
  getrusage ru_maxrss deltas where clear_refs is unavailable. Times: mean of --iters further runs.
- GPU: torch.cuda.max_memory_allocated() after the run minus memory_allocated() before, in one process,
  for naive, torch.compile(naive), the Triton kernel and the twin. Times: CUDA-synchronised wall clock.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
p.add_argument("--n", type=int, default=None, help="tokens (default 4096 cpu / 16384 cuda)")
p.add_argument("--h", type=int, default=None, help="hidden size (default 576 cpu / 2048 cuda)")
p.add_argument("--v", type=int, default=None, help="vocabulary (default 49152 cpu / 128256 cuda)")
p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default float32 cpu / bfloat16 cuda)")
p.add_argument("--iters", type=int, default=2, help="timed iterations after the first (memory) run")
p.add_argument("--chunk", type=int, nargs=2, default=None, metavar=("CN", "CV"), help="chunk_size for ours")
p.add_argument("--entropy", action="store_true", help="also compute and backprop the entropy")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
p.add_argument("--variants", default=None, help="comma list (cpu: naive,ours; cuda: naive,compiled,triton,twin)")
p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one CPU variant
args = p.parse_args()

import torch  # noqa: E402 (after argparse so --help is instant)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minicai.logprobs import token_logprobs  # noqa: E402

device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
gpu = device == "cuda"
N = args.n or (16384 if gpu else 4096)
H = args.h or (2048 if gpu else 576)
V = args.v or (128256 if gpu else 49152)
dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
if args.threads:
    torch.set_num_threads(args.threads)


def make_inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, targets


def naive(hidden, weight, targets):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V] fp32
    loss = -logp_all.gather(1, targets[:, None]).mean()
    if args.entropy:
        loss = loss - (logp_all.exp() * logp_all).sum(-1).mean()
    return loss


def ours(hidden, weight, targets, fn=token_logprobs):
    logp, ent, _ = fn(hidden, weight, targets, chunk_size=tuple(args.chunk) if args.chunk else None,
                      with_entropy=args.entropy)
    return -logp.mean() + (ent.mean() if args.entropy else 0)


def step(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.item()


def check(loss, hidden, weight):
    return f"loss {loss:.6f} |gW| {weight.grad.float().norm():.5f} |gh| {hidden.grad.float().norm():.5f}"


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(name):
    """One CPU variant in this fresh process; prints a JSON line."""
    fn = naive if name == "naive" else ours
    hidden, weight, targets = make_inputs()
    try:  # reset the peak-RSS counter so the number is this run's peak, not import-time noise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, how = _status_kb("VmRSS"), "VmHWM"
    except OSError:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    t0 = time.perf_counter()
    loss = step(fn, hidden, weight, targets)
    first = time.perf_counter() - t0
    after = _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step(fn, hidden, weight, targets)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(name=name, peak_mib=(after - before) / 1024, how=how, first_s=first,
                          time_s=sum(times) / len(times) if times else first, check=check(loss, hidden, weight))))


def table(rows):
    base = rows[0]
    print(f"{'variant':<12} {'peak extra MiB':>15} {'x naive':>8} {'time s':>8} {'x naive':>8}   check")
    for r in rows:
        print(f"{r['name']:<12} {r['peak_mib']:>15.1f} {r['peak_mib'] / base['peak_mib']:>8.3f} "
              f"{r['time_s']:>8.3f} {r['time_s'] / base['time_s']:>8.3f}   {r['check']}")


if args.child:
    run_child(args.child)
elif not gpu:
    print(f"CPU, N={N} H={H} V={V} {dtype}, threads={args.threads or torch.get_num_threads()}, "
          f"entropy={args.entropy}, chunk={args.chunk or 'default'}; one fresh process per variant")
    print(f"[N,V] fp32 logits: {N * V * 4 / 2**20:.0f} MiB; grads of hidden+W (in both peaks): "
          f"{(N + V) * H * dtype.itemsize / 2**20:.0f} MiB")
    rows = []
    for name in (args.variants or "naive,ours").split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--device", "cpu", "--n", str(N),
               "--h", str(H), "--v", str(V), "--dtype", str(dtype).split(".")[1], "--iters", str(args.iters)]
        cmd += (["--chunk", *map(str, args.chunk)] if args.chunk else []) + (["--entropy"] if args.entropy else [])
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {name}: done ({rows[-1]['how']}, first run {rows[-1]['first_s']:.2f} s)", flush=True)
    table(rows)
else:
    from minicai_kernels.logprobs import token_logprobs as triton_token_logprobs

    variants = {"naive": naive, "compiled": torch.compile(naive),
                "triton": lambda h, w, t: ours(h, w, t, fn=triton_token_logprobs), "twin": ours}
    print(f"{torch.cuda.get_device_name()}, N={N} H={H} V={V} {dtype}, entropy={args.entropy}")
    hidden, weight, targets = make_inputs()
    rows = []
    for name in (args.variants or "naive,compiled,triton,twin").split(","):
        fn = variants[name]
        step(fn, hidden, weight, targets)  # warm-up / compile
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step(fn, hidden, weight, targets)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        t0 = time.perf_counter()
        for _ in range(max(1, args.iters)):
            step(fn, hidden, weight, targets)
        torch.cuda.synchronize()
        rows.append(dict(name=name, peak_mib=peak, time_s=(time.perf_counter() - t0) / max(1, args.iters),
                         check=check(loss, hidden, weight)))
        print(f"  {name}: done", flush=True)
    table(rows)
