"""Plumbing shared by every trainer (SFT, reward model, DPO, PPO): plain functions, no Trainer class.

- AdamW (Loshchilov & Hutter, 2019, decoupled weight decay) with two parameter groups: matrices decay,
  vectors (biases, norm gains) do not, the usual GPT-2/nanoGPT split.
- Learning rate: linear warmup to lr over `warmup` steps, then a half cosine down to lr * min_ratio at
  `total` steps (Loshchilov & Hutter, 2017, SGDR, without restarts).
- check_finite: a NaN/inf loss or gradient norm stops training with the step that produced it.
- Training-state checkpoints that resume bit-for-bit: trainable weights, AdamW moments, the step, every
  RNG state and the data-order position, in one directory written atomically. Nothing is pickled: tensors
  (weights, AdamW moments, torch RNG states, which are uint8 tensors) go to safetensors, scalars and the
  Python/NumPy RNG states to JSON. Resuming restores all of them, so the loss curve continues exactly as
  an uninterrupted run would (same data order, same updates), provided checkpoints are taken at optimizer
  step boundaries (the trainers only save there).
- JSONL training log (minicai.io.append_jsonl) and a PNG loss plot (matplotlib, Agg backend).

Layout of a state directory:
    weights.safetensors     trainable parameters by name (frozen ones are rebuilt from the base model)
    optimizer.safetensors   "{i}.{key}" for tensor entries of optimizer.state_dict()["state"][i]
    rng.safetensors         "torch" CPU generator state, "cuda.{d}" per CUDA device
    state.json              step, data position, param groups, non-tensor optimizer state, param names,
                            Python and NumPy RNG states, anything the trainer adds in `extra`
"""
import io
import json
import math
import os
import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from minicai.checkpoint import atomic_dir
from minicai.io import append_jsonl, atomic_write, read_jsonl_tolerant

__all__ = ["make_optimizer", "lr_at", "set_lr", "check_finite", "save_state", "load_state",
           "append_jsonl", "truncate_log", "plot_losses", "trainable_named_parameters"]


# ----------------------------------------------------------------------------- optimisation

def trainable_named_parameters(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
    """AdamW over the trainable parameters: weight decay on matrices (dim >= 2) only; biases and norm
    gains are not decayed. Parameter order is model.named_parameters() order (the checkpoint relies on it)."""
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop is the reference algorithm and is deterministic on CPU
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, foreach=False)


def lr_at(step, *, lr, warmup, total, min_ratio=0.1) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr over the first
    `warmup` steps, then cosine decay to lr * min_ratio at step `total` (held there afterwards)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if total <= warmup:
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_finite(step, **values) -> None:
    """Raise FloatingPointError naming the step and the quantity when any value is NaN or inf
    (a diverged run must stop before it overwrites a good checkpoint)."""
    for name, v in values.items():
        v = float(v)
        if not math.isfinite(v):
            raise FloatingPointError(f"step {step}: {name} is {v}; stopping (lower the learning rate, check the "
                                     f"data, or resume from the last saved state)")


# ----------------------------------------------------------------------------- training state

def _rng_state() -> tuple:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{d}"] = s
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    scalars = {"python": [version, list(mt), gauss],
               "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, scalars


def _set_rng_state(tensors, scalars) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    version, mt, gauss = scalars["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(state_dir, model, optimizer, step, data_position=None, extra=None) -> None:
    """Write everything needed to continue training after optimizer step `step` (atomically: a reader
    sees the previous complete state or this one, never a mix)."""
    named = trainable_named_parameters(model)
    weights = {n: p.detach().contiguous().cpu() for n, p in named}
    osd = optimizer.state_dict()
    opt_tensors, opt_scalars = {}, {}
    for i, entry in osd["state"].items():
        for key, v in entry.items():
            if torch.is_tensor(v):
                opt_tensors[f"{i}.{key}"] = v.detach().contiguous().cpu()
            else:
                opt_scalars[f"{i}.{key}"] = v
    rng_tensors, rng_scalars = _rng_state()
    meta = {"step": int(step), "data_position": data_position, "param_names": [n for n, _ in named],
            "param_groups": osd["param_groups"], "optimizer_scalars": opt_scalars, "rng": rng_scalars,
            "extra": extra or {}}

    def write(tmp):
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        for name in os.listdir(tmp):  # safetensors creates files 0600
            os.chmod(os.path.join(tmp, name), 0o644)

    atomic_dir(state_dir, write)


def load_state(state_dir, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states saved by save_state into `model` / `optimizer` (built
    the same way as when saving). Returns the state.json dict (step, data_position, extra)."""
    path = os.path.join(state_dir, "state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not a training-state directory)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    named = trainable_named_parameters(model)
    names = [n for n, _ in named]
    if names != meta["param_names"]:
        diff = sorted(set(names) ^ set(meta["param_names"]))[:5]
        raise ValueError(f"{state_dir}: trainable parameters differ from the saved run (e.g. {diff}); "
                         f"resume with the same model and LoRA settings")
    weights = load_file(os.path.join(state_dir, "weights.safetensors"))
    with torch.no_grad():
        for n, p in named:
            if weights[n].shape != p.shape:
                raise ValueError(f"{state_dir}: {n} has shape {tuple(weights[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(weights[n])
    tensors = load_file(os.path.join(state_dir, "optimizer.safetensors"))
    state = {}
    for key, v in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _set_rng_state(load_file(os.path.join(state_dir, "rng.safetensors")), meta["rng"])
    return meta


# ----------------------------------------------------------------------------- logging

def truncate_log(log_path, step) -> list:
    """Drop log rows written after `step` (by a run that died before its next checkpoint), so a resumed
    run's log has each step once. Returns the kept rows."""
    rows = [r for r in read_jsonl_tolerant(log_path) if r.get("step", 0) <= step]
    if os.path.exists(log_path):
        atomic_write(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def plot_losses(rows, png_path, keys=("loss",), title=None) -> None:
    """Line plot of `keys` against step from log rows (dicts with "step"), written atomically as PNG."""
    import matplotlib
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 60 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(keys[0] if len(keys) == 1 else "value")
    if len(keys) > 1:
        ax.legend()
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(png_path, buf.getvalue())


# flags that may differ on --resume without changing the run
RESUMABLE_CHANGES = {"resume", "save_every", "quiet", "out", "run_dir", "device"}


def micro_batches(n, batch_size, seed, position):
    """Endless micro-batches of example indices: epoch e is torch.randperm(n) under seed (seed, e), cut into
    batches. Yields (indices, position after this batch); position = {"epoch", "batch"} resumes exactly."""
    epoch, b = position["epoch"], position["batch"]
    per_epoch = math.ceil(n / batch_size)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        while b < per_epoch:
            idx = order[b * batch_size:(b + 1) * batch_size]
            b += 1
            nxt = {"epoch": epoch, "batch": b} if b < per_epoch else {"epoch": epoch + 1, "batch": 0}
            yield idx, nxt
        epoch, b = epoch + 1, 0


def check_resume_args(run_dir, args) -> None:
    path = os.path.join(run_dir, "args.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    now = vars(args)
    diff = [k for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"{path}: --resume with different settings would not continue the same run: "
                         + ", ".join(f"{k}={saved.get(k)!r} -> {now.get(k)!r}" for k in diff))
