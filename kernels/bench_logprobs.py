"""Benchmark: fused log-probs (ours) vs the naive path, forward + backward, peak extra memory and time.

    python kernels/bench_logprobs.py --threads 2       # CPU: the PyTorch twin, N=4096 H=576 V=49152 fp32
    python kernels/bench_logprobs.py --device cuda     # GPU: N=16384 H=2048 V=128256 bf16

Two paths, each against its own naive baseline (logits = hidden @ W.T upcast to fp32, log_softmax, gather;
backward to hidden and W):
- sft: the SFT loss, mean cross-entropy. naive: F.cross_entropy on the full logits. ours: cross_entropy_loss
  (gradients formed in the forward, 3 matmuls).
- tok: the general per-token path, loss = sum_n u_n logp_n with a fixed random upstream gradient u (what
  PPO/GRPO losses look like to this function). naive: log_softmax + gather. ours: token_logprobs(...,
  with_entropy=False) (backward recomputes the logits: 4 matmuls). --entropy adds sum_n u'_n entropy_n on
  both sides.

Peak extra memory, measured honestly per device:
- CPU: each variant runs in a fresh subprocess (no allocator or page-cache state shared). After the inputs
  exist, the kernel's peak-RSS counter is reset (write "5" to /proc/self/clear_refs) and the number reported is
  VmHWM after one forward+backward minus VmRSS before it: every byte the run touched, including the
  gradients of hidden and W (which both variants must produce; their size is printed). Falls back to
  getrusage ru_maxrss deltas where clear_refs is unavailable. Times: best of --iters further runs, wall
  clock and process CPU time (on a loaded shared machine the CPU time of a --threads 1 run is the steadier
  number; with more threads it also counts OpenMP spin-waiting).
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
p.add_argument("--paths", default="sft,tok", help="comma list of sft (cross-entropy loss) and tok (per-token)")
p.add_argument("--chunk", type=int, nargs=2, default=None, metavar=("CN", "CV"), help="chunk_size for ours")
p.add_argument("--entropy", action="store_true", help="also compute and backprop the entropy")
p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
p.add_argument("--variants", default=None, help="comma list (cpu: naive,ours; cuda: naive,compiled,triton,twin)")
p.add_argument("--path", default="sft", help=argparse.SUPPRESS)  # internal: the child's path
p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one CPU variant
args = p.parse_args()

import torch  # noqa: E402 (after argparse so --help is instant)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minicai import backend  # noqa: E402
from minicai.logprobs import cross_entropy_loss, token_logprobs  # noqa: E402

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
    upstream = torch.randn(2, N, generator=g).to(device)  # fixed random dL/dlogp, dL/dentropy (tok path)
    return hidden, weight, targets, upstream


def naive_sft(hidden, weight, targets, u):
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)  # [N, V] fp32 logits


def ours_sft(hidden, weight, targets, u):
    chunk = tuple(args.chunk) if args.chunk else None
    return cross_entropy_loss(hidden, weight, targets, chunk_size=chunk)


def naive_tok(hidden, weight, targets, u):
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)  # [N, V] fp32
    loss = (u[0] * logp_all.gather(1, targets[:, None])[:, 0]).sum()
    if args.entropy:
        loss = loss - (u[1] * (logp_all.exp() * logp_all).sum(-1)).sum()
    return loss


def ours_tok(hidden, weight, targets, u, fn=token_logprobs):
    logp, ent, _ = fn(hidden, weight, targets, chunk_size=tuple(args.chunk) if args.chunk else None,
                      with_entropy=args.entropy)
    return (u[0] * logp).sum() + ((u[1] * ent).sum() if args.entropy else 0)


def triton_sft(hidden, weight, targets, u):  # cross_entropy_loss under the triton backend: the kernel
    before = backend.get_backend()
    backend.set_backend("triton")
    try:
        return ours_sft(hidden, weight, targets, u)
    finally:
        backend.set_backend(before)


def step(fn, hidden, weight, targets, u):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, targets, u)
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
    fns = {"sft": {"naive": naive_sft, "ours": ours_sft}, "tok": {"naive": naive_tok, "ours": ours_tok}}
    fn = fns[args.path][name]
    hidden, weight, targets, u = make_inputs()
    try:  # reset the peak-RSS counter so the number is this run's peak, not import-time noise
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before, how = _status_kb("VmRSS"), "VmHWM"
    except OSError:
        before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    t0 = time.perf_counter()
    loss = step(fn, hidden, weight, targets, u)
    first = time.perf_counter() - t0
    after = _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpus = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step(fn, hidden, weight, targets, u)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    print(json.dumps(dict(name=name, peak_mib=(after - before) / 1024, how=how, first_s=first,
                          time_s=min(times) if times else first, cpu_s=min(cpus) if cpus else float("nan"),
                          check=check(loss, hidden, weight))))


def table(path, rows):
    base = rows[0]
    print(f"\n[{path}] {'variant':<10} {'peak extra MiB':>15} {'x naive':>8} {'time s':>8} {'x naive':>8}"
          f" {'cpu s':>8} {'x naive':>8}   check")
    for r in rows:
        cpu = r.get("cpu_s", float("nan"))
        print(f"[{path}] {r['name']:<10} {r['peak_mib']:>15.1f} {r['peak_mib'] / base['peak_mib']:>8.3f} "
              f"{r['time_s']:>8.3f} {r['time_s'] / base['time_s']:>8.3f} {cpu:>8.3f} "
              f"{cpu / base.get('cpu_s', float('nan')):>8.3f}   {r['check']}")


paths = args.paths.split(",")
if args.child:
    run_child(args.child)
elif not gpu:
    print(f"CPU, N={N} H={H} V={V} {dtype}, threads={args.threads or torch.get_num_threads()}, "
          f"entropy={args.entropy}, chunk={args.chunk or 'default'}; one fresh process per variant; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"[N,V] fp32 logits: {N * V * 4 / 2**20:.0f} MiB; grads of hidden+W (in both peaks): "
          f"{(N + V) * H * dtype.itemsize / 2**20:.0f} MiB")
    for path in paths:
        rows = []
        for name in (args.variants or "naive,ours").split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--path", path, "--device", "cpu",
                   "--n", str(N), "--h", str(H), "--v", str(V), "--dtype", str(dtype).split(".")[1],
                   "--iters", str(args.iters)]
            cmd += (["--chunk", *map(str, args.chunk)] if args.chunk else []) + (["--entropy"] if args.entropy else [])
            cmd += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {path} {name}: done ({rows[-1]['how']}, first run {rows[-1]['first_s']:.2f} s, "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)
        table(path, rows)
else:
    from minicai_kernels.logprobs import token_logprobs as triton_token_logprobs

    variants = {"sft": {"naive": naive_sft, "compiled": torch.compile(naive_sft), "triton": triton_sft,
                        "twin": ours_sft},
                "tok": {"naive": naive_tok, "compiled": torch.compile(naive_tok),
                        "triton": lambda h, w, t, u: ours_tok(h, w, t, u, fn=triton_token_logprobs),
                        "twin": ours_tok}}
    print(f"{torch.cuda.get_device_name()}, N={N} H={H} V={V} {dtype}, entropy={args.entropy}")
    hidden, weight, targets, u = make_inputs()
    for path in paths:
        rows = []
        for name in (args.variants or "naive,compiled,triton,twin").split(","):
            fn = variants[path][name]
            step(fn, hidden, weight, targets, u)  # warm-up / compile
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            loss = step(fn, hidden, weight, targets, u)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            t0 = time.perf_counter()
            for _ in range(max(1, args.iters)):
                step(fn, hidden, weight, targets, u)
            torch.cuda.synchronize()
            rows.append(dict(name=name, peak_mib=peak, time_s=(time.perf_counter() - t0) / max(1, args.iters),
                             check=check(loss, hidden, weight)))
            print(f"  {path} {name}: done", flush=True)
        table(path, rows)
