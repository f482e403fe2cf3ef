"""Plumbing shared by every trainer (SFT, reward model, DPO, PPO): plain functions, no Trainer class.

One skeleton, in the order a trainer calls it; each script keeps only its own math (its loss on a micro-batch,
ending in clip_and_step: clip, DivergenceGuard, AdamW) and its metrics: start_run (fresh vs --resume),
resume_state, train_loop (schedule, step, log row + progress, periodic and final save), finish_log (truncate +
plot). Their flags: add_train_flags / add_speed_flags, one spelling each; typed configs: script_args.

- AdamW (Loshchilov & Hutter, 2019, decoupled weight decay) with two parameter groups: matrices decay,
  vectors (biases, norm gains) do not, the usual GPT-2/nanoGPT split.
- Learning rate: linear warmup to lr over `warmup` steps, then a half cosine down to lr * min_ratio at
  `total` steps (Loshchilov & Hutter, 2017, SGDR, without restarts).
- DivergenceGuard: stops a run (DivergenceError, naming the step and the measure) on a NaN/inf loss or
  gradient norm, a gradient norm of exactly 0 (a saturated or dead model learns nothing more), a loss at or
  above the uniform-prediction loss (ln V for a language model, ln 2 for a pairwise loss) on UNIFORM_PATIENCE
  steps in a row once a smoothed loss (EMA, 0.9) has been clearly below it (under half of it: a fine-tune
  starting near uniform from a random model is not diverging; in a row, because one batch of 4 pairs with a
  confidently wrong one is over ln 2 by chance: the cpu-full reward model stopped so at step 30 of 36), or a
  loss over --max-loss-jump x the EMA (floored at a tenth of the uniform or the first loss, so a run that has
  fit its data to ~0 may still see a harder batch). Checkpoints go through it: a saved state is staged and
  promoted into state/ only when a later step's loss and gradients, the first measures of the saved weights,
  pass without a suspect loss; so a stopped run leaves the last good state, never the diverged one.
- start_run: after every input was validated, decide fresh vs --resume; a fresh run over an earlier one
  refuses unless --overwrite, which moves the old state and logs to RUN_DIR.previous (one generation kept).
- Training-state checkpoints that resume bit-for-bit: trainable weights, AdamW moments, the step, every
  RNG state and the data-order position, in one directory written atomically. Nothing is pickled: tensors
  (weights, AdamW moments, torch RNG states, which are uint8 tensors) go to safetensors, scalars and the
  Python/NumPy RNG states to JSON. Resuming restores all of them, so the loss curve continues exactly as
  an uninterrupted run would (same data order, same updates), provided checkpoints are taken at optimizer
  step boundaries (the trainers only save there).
- JSONL training log (minicai.io.append_jsonl) and a PNG loss plot (matplotlib, Agg backend).
- autocast: bf16 autocast of the forward over fp32 master weights (mixed precision, Micikevicius et al.
  2018, in bfloat16, so without loss scaling); the trainers run the loss math under autocast("off").
- Length bucketing (micro_batches' `lengths`): each window of a few micro-batches of the seeded epoch order
  is sorted by length, longest first (the "group by length" of HF's Trainer, idea only), so a micro-batch
  pads little; the order stays a function of seed and position, so resuming stays exact.

Layout of a state directory:
    weights.safetensors     trainable parameters by name (frozen ones are rebuilt from the base model)
    optimizer.safetensors   "{i}.{key}" for tensor entries of optimizer.state_dict()["state"][i]
    rng.safetensors         "torch" CPU generator state, "cuda.{d}" per CUDA device
    state.json              step, data position, param groups, non-tensor optimizer state, param names,
                            Python and NumPy RNG states, anything the trainer adds in `extra`
"""
import argparse
import hashlib
import io
import json
import math
import os
import random
import resource
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from minicai.checkpoint import clean_stale, cpu_has_native_bf16, promote_dir, stage_dir, verify_file
from minicai.io import append_jsonl, atomic_write, check_output_path, read_jsonl_tolerant

__all__ = ["make_optimizer", "lr_at", "set_lr", "check_finite", "save_resume_state", "load_resume_state", "DivergenceGuard",
           "DivergenceError", "start_run", "check_flags", "append_jsonl", "truncate_log", "plot_losses",
           "trainable_named_parameters", "autocast", "sort_in_windows", "micro_batches", "script_args",
           "resume_state", "clip_and_step", "train_loop", "finish_log", "script_main", "script_parser",
           "add_train_flags", "add_speed_flags", "peak_memory_mb", "reset_peak_memory", "digest"]


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
    # fused: one kernel over all parameters (the per-parameter loop cost ~5x as much CPU time per step on the
    # 135M model, tests/bench_train.py); still elementwise, so deterministic
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


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
    """lr on every parameter group, times the group's "lr_mult" where it has one (PPO's value head)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


class DivergenceError(FloatingPointError):
    """The run diverged; the message names the step and the measure."""


def check_finite(step, **values) -> None:
    """Raise FloatingPointError naming the step and the quantity when any value is NaN or inf
    (a diverged run must stop before it overwrites a good checkpoint)."""
    for name, v in values.items():
        v = float(v)
        if not math.isfinite(v):
            raise DivergenceError(f"step {step}: {name} is {v}; stopping (lower the learning rate, check the "
                                     f"data, or resume from the last saved state)")


UNIFORM_PATIENCE = 3  # steps in a row at or above the uniform loss that count as a collapse


class DivergenceGuard:
    """check(step, loss, grad_norm) after each backward (see the module docstring), and save(...) instead of
    save_resume_state: the staged state is promoted when the next check passes, or by `with guard:` on any exit
    other than a divergence (an interrupt or a crash says nothing against the saved weights)."""

    def __init__(self, state_dir, uniform_loss=None, max_jump=10.0, ema=0.9):
        self.state_dir, self.uniform, self.max_jump, self.beta = state_dir, uniform_loss, max_jump, ema
        self.avg = self.first = None
        self.armed, self.pending, self.at_uniform = False, None, 0  # at_uniform: suspect steps in a row

    def check(self, step, loss, grad_norm) -> None:
        loss, grad_norm = float(loss), float(grad_norm)
        check_finite(step, loss=loss, grad_norm=grad_norm)
        hint = "; stopping (lower the learning rate or check the data; the last good state is kept)"
        if grad_norm == 0:
            raise DivergenceError(f"step {step}: gradient norm is exactly 0 (loss {loss:.4g}): the model no longer "
                                  f"learns (saturated or collapsed){hint}")
        self.at_uniform = self.at_uniform + 1 if self.armed and loss >= self.uniform else 0
        if self.at_uniform >= UNIFORM_PATIENCE:
            raise DivergenceError(f"step {step}: loss {loss:.4f} is at or above the uniform-prediction loss "
                                  f"{self.uniform:.4f} for {self.at_uniform} steps in a row after the run had been "
                                  f"well below it (smoothed {self.avg:.4f}){hint}")
        self.first = loss if self.first is None else self.first
        floor = 0.1 * (self.uniform if self.uniform is not None else self.first)
        if self.max_jump and self.avg is not None and loss > self.max_jump * max(self.avg, floor):
            raise DivergenceError(f"step {step}: loss {loss:.4g} jumped over --max-loss-jump {self.max_jump:g} x "
                                  f"its recent average {self.avg:.4g}{hint}")
        self.avg = loss if self.avg is None else self.beta * self.avg + (1 - self.beta) * loss
        self.armed = self.armed or (self.uniform is not None and self.avg < 0.5 * self.uniform)
        if not self.at_uniform:  # a suspect step keeps the staged state staged until a clean one
            self.promote()

    def save(self, model, optimizer, step, data_position=None, extra=None, final=False) -> None:
        self.discard()
        extra = {**(extra or {}), "guard": {"avg": self.avg, "first": self.first, "armed": self.armed}}
        self.pending = save_resume_state(self.state_dir, model, optimizer, step, data_position, extra, promote=False)
        if final:
            self.promote()

    def restore(self, meta) -> None:
        g = meta.get("extra", {}).get("guard") or {}
        self.avg, self.first, self.armed = g.get("avg"), g.get("first"), bool(g.get("armed"))

    def promote(self) -> None:
        if self.pending:
            promote_dir(self.pending, self.state_dir)
            self.pending = None

    def discard(self) -> None:
        if self.pending:
            shutil.rmtree(self.pending, ignore_errors=True)
            self.pending = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        self.discard() if isinstance(exc, DivergenceError) else self.promote()
        return False


# ----------------------------------------------------------------------------- run folders and flags

def check_flags(args, **kinds) -> None:
    """Range checks by kind: check_flags(args, pos="lr beta", ge1="batch_size", ...); None values pass."""
    rules = {"pos": (lambda v: v > 0, "> 0"), "nonneg": (lambda v: v >= 0, ">= 0"), "ge1": (lambda v: v >= 1, ">= 1"),
             "unit": (lambda v: 0 <= v <= 1, "in [0, 1]"), "unit_open": (lambda v: 0 <= v < 1, "in [0, 1)"),
             "half": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]")}
    for kind, names in kinds.items():
        ok, desc = rules[kind]
        for name in names.split():
            v = getattr(args, name)
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be {desc}, got {v}")


def start_run(run_dir, args, logs=(), outputs=(), run_flag="--run-dir") -> bool:
    """Call once every input has been read and validated. Returns True when resuming RUN_DIR/state (--resume
    and a saved state there; the settings must match RUN_DIR/args.json where the trainer writes one).
    Otherwise the run is fresh: an earlier run's state or logs there, or an existing non-empty output, make it
    refuse unless --overwrite, which moves the state and logs to RUN_DIR.previous. Stale *.partial-* folders
    of killed saves are removed."""
    for path in (run_dir, *outputs):
        check_output_path(path, "dir", run_flag if path == run_dir else "--out")
    state_dir = os.path.join(run_dir, "state")
    clean_stale(state_dir)
    resume = getattr(args, "resume", False)
    if resume and os.path.exists(os.path.join(state_dir, "state.json")):
        check_resume_args(run_dir, args)
        return True
    logs = [p for p in (os.path.join(run_dir, n) for n in logs) if os.path.exists(p)]
    earlier = [p for p in (state_dir, *outputs) if os.path.isdir(p) and os.listdir(p)] + ([] if resume else logs)
    if earlier and not getattr(args, "overwrite", False):
        raise ValueError(f"{earlier[0]}: exists from an earlier run; pass --resume to continue it or --overwrite "
                         f"to start over (the old state and logs are then moved to {run_dir.rstrip('/')}.previous)")
    if resume:  # --resume with no saved state: what the logs hold are steps never saved
        for p in logs:
            os.remove(p)
    moved = [p for p in earlier if p not in outputs]
    if moved:
        aside = run_dir.rstrip("/") + ".previous"
        shutil.rmtree(aside, ignore_errors=True)
        os.makedirs(aside)
        for p in moved:
            os.replace(p, os.path.join(aside, os.path.basename(p)))
        print(f"minicai: --overwrite: moved the earlier run's {', '.join(map(os.path.basename, moved))} to {aside}")
    return False


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


def save_resume_state(state_dir, model, optimizer, step, data_position=None, extra=None, promote=True):
    """Write everything needed to continue training after optimizer step `step` (atomically: a reader
    sees the previous complete state or this one, never a mix). promote=False: return the staged folder
    for checkpoint.promote_dir (DivergenceGuard promotes it once the saved weights passed a check)."""
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
        if os.environ.get("MINICAI_TEST_KILL_IN_SAVE") == str(step):  # tests: a kill -9 in the middle of a save
            os.kill(os.getpid(), 9)
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        save_file({k: v.contiguous() for k, v in rng_tensors.items()}, os.path.join(tmp, "rng.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        for name in os.listdir(tmp):  # safetensors creates files 0600
            os.chmod(os.path.join(tmp, name), 0o644)

    tmp = stage_dir(state_dir, write)
    if not promote:
        return tmp
    promote_dir(tmp, state_dir)


def _load_tensors(path) -> dict:
    verify_file(path)
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types, naming no file
        raise ValueError(f"{path}: unreadable safetensors file ({e}); resume from an earlier copy or start over") from None


def load_resume_state(state_dir, model, optimizer) -> dict:
    """Restore weights, optimizer and RNG states saved by save_resume_state into `model` / `optimizer` (built
    the same way as when saving). Returns the state.json dict (step, data_position, extra)."""
    path = os.path.join(state_dir, "state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not a training-state directory)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable state ({e})") from None
    named = trainable_named_parameters(model)
    names = [n for n, _ in named]
    if names != meta["param_names"]:
        diff = sorted(set(names) ^ set(meta["param_names"]))[:5]
        raise ValueError(f"{state_dir}: trainable parameters differ from the saved run (e.g. {diff}); "
                         f"resume with the same model and LoRA settings")
    weights = _load_tensors(os.path.join(state_dir, "weights.safetensors"))
    with torch.no_grad():
        for n, p in named:
            if weights[n].shape != p.shape:
                raise ValueError(f"{state_dir}: {n} has shape {tuple(weights[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(weights[n])
    tensors = _load_tensors(os.path.join(state_dir, "optimizer.safetensors"))
    state = {}
    for key, v in list(tensors.items()) + list(meta["optimizer_scalars"].items()):
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _set_rng_state(_load_tensors(os.path.join(state_dir, "rng.safetensors")), meta["rng"])
    return meta


# ----------------------------------------------------------------------------- the step loop

def resume_state(state_dir, model, optimizer, guard, logs=(), same=None, name="train") -> tuple:
    """Continue a run from state_dir: weights, optimizer, RNG and guard states, each log cut back to the saved
    step. same: {key: value} the saved state's extra must hold (the same data). Returns (step, data position,
    extra)."""
    meta = load_resume_state(state_dir, model, optimizer)
    guard.restore(meta)
    step, extra = meta["step"], meta["extra"]
    diff = {k: v for k, v in (same or {}).items() if extra.get(k) != v}
    if diff:
        raise ValueError(f"{state_dir}: the saved run had {', '.join(f'{k}={extra.get(k)}' for k in diff)}, the data "
                         f"now gives {', '.join(f'{k}={v}' for k, v in diff.items())}: --resume needs the same data")
    for path in logs:
        truncate_log(path, step)
    print(f"{name}: resumed from {state_dir} at step {step}")
    return step, meta["data_position"], extra


def digest(data) -> str:
    """A short hash of JSON-able data (a trainer's examples as tokenised): resume_state's `same` check for
    trainers whose data is not summed up by a count."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clip_and_step(optimizer, step, loss, grad_clip=0.0, guard=None) -> float:
    """The end of every optimizer step, after the backward: clip the global gradient norm to grad_clip (0 =
    off), let the DivergenceGuard check the loss and the norm as step + 1 before the update, update, zero the
    gradients. Returns the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if guard is not None:
        guard.check(step + 1, loss, norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def train_loop(step_fn, model, optimizer, guard, *, start, end, schedule, log_path, save_every, position=None,
               extra=None, show=None, quiet=False) -> tuple:
    """Optimizer steps start..end of every trainer. Each step: the learning rate lr_at(step, **schedule) (set_lr),
    row, position = step_fn(step, lr) (the script's own math, ending in clip_and_step; position = the data
    position after the step, or None), the row appended to log_path and shown (show(row): the progress bar's
    postfix dict, or a line to print), the training state saved every save_every steps (staged until the next
    step passes: DivergenceGuard). After the last: the state saved and promoted (--resume after the end is a
    no-op). extra: the state's extra, a dict or a callable giving it. Returns (step, position)."""
    state = extra if callable(extra) else (lambda: extra)
    bar = tqdm(total=end, initial=start, unit="step", disable=quiet, dynamic_ncols=True)
    step = start
    with guard:
        while step < end:
            lr = lr_at(step, **schedule)
            set_lr(optimizer, lr)
            row, position = step_fn(step, lr)
            step += 1
            append_jsonl(log_path, row)
            shown = show(row) if show else {}
            if isinstance(shown, str):
                bar.write(shown)
                sys.stdout.flush()  # a log file sees each step as it ends
            else:
                bar.set_postfix(shown)
            bar.update(1)
            if save_every and step % save_every == 0 and step < end:
                guard.save(model, optimizer, step, position, state())
    bar.close()
    guard.save(model, optimizer, step, position, state(), final=True)
    return step, position


def finish_log(log_path, step, png_path, keys=("loss",), title=None, last=None) -> list:
    """The run's log rows up to `step` (rows of steps never saved are dropped), `last` merged into the final
    row, and their plot. Returns the rows."""
    rows = truncate_log(log_path, step)
    if rows and last:
        rows[-1].update(last)
        atomic_write(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if rows:
        plot_losses(rows, png_path, keys, title)
    return rows


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default."""


def script_parser(doc) -> argparse.ArgumentParser:
    """A trainer's parser: its module docstring's first paragraph as the description, the rest as the epilog."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=HelpFormatter)


def script_main(main, name) -> None:
    """`python -m train.<script>`: main(); bad input or a diverged run is one line on stderr, exit status 2."""
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)


# flags that may differ on --resume without changing the run
RESUMABLE_CHANGES = {"resume", "save_every", "quiet", "out", "run_dir", "device", "overwrite", "max_loss_jump"}


def script_args(parser, **fields) -> argparse.Namespace:
    """The Namespace parser.parse_args would return, from Python values (a typed config, no argv strings): the
    parser's defaults, then `fields` by dest. An unknown field, a missing required flag, a value of the wrong
    type or outside an action's choices is a ValueError naming it."""
    actions = {}
    for a in parser._actions:  # argparse has no public list; the first action of a dest owns its default
        if a.dest != "help":
            actions.setdefault(a.dest, a)
    unknown = sorted(set(fields) - set(actions))
    missing = [a.option_strings[0] for d, a in actions.items() if a.required and d not in fields]
    if unknown or missing:
        raise ValueError("; ".join(([f"unknown field(s) {unknown}: no such flag"] if unknown else [])
                                   + ([f"missing required {', '.join(missing)}"] if missing else [])))
    args = argparse.Namespace()
    for dest, a in actions.items():
        if dest in fields:
            _check_field(a, fields[dest])
        setattr(args, dest, fields[dest] if dest in fields else
                a.type(a.default) if isinstance(a.default, str) and callable(a.type) else a.default)
    return args


def _check_field(action, value) -> None:
    """A Python value for one action: a list for nargs + / *, each item of the action's type and in its choices."""
    flag, many = action.option_strings[0], action.nargs in ("+", "*")
    if value is None and action.default is None:
        return
    if many and not isinstance(value, (list, tuple)):
        raise ValueError(f"{flag} takes a list, got {value!r}")
    if action.nargs == "+" and not value:
        raise ValueError(f"{flag} needs at least one value")
    kind = {int: (int,), float: (int, float), None: (str,)}.get(action.type, (object,)) if action.nargs != 0 else (bool,)
    for v in value if many else [value]:
        if isinstance(v, bool) != (kind == (bool,)) or not isinstance(v, kind):
            raise ValueError(f"{flag}={v!r}: expected {' or '.join(k.__name__ for k in kind)}")
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{flag}={v!r}: expected one of {list(action.choices)}")


def add_train_flags(parser, *, min_lr_ratio=0.1, save_every=50, loss_jump=True) -> None:
    """The flags every trainer takes, spelt one way across the scripts (old spellings stay as aliases)."""
    a = parser.add_argument
    a("--min-lr-ratio", "--lr-min-ratio", type=float, default=min_lr_ratio,
      help="cosine decay to lr x this at the last step (1 = constant)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (matrices only)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--gradient-checkpointing", "--grad-checkpoint", action="store_true", help="recompute blocks in backward (less memory)")
    a("--save-every", type=int, default=save_every, help="save the training state every N steps (0 = only at the end)")
    a("--resume", action="store_true", help="continue from the run's saved training state if there is one")
    a("--seed", type=int, default=0, help="seed of the data split and order, initialisation and sampling")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    a("--dtype", default="float32", help="dtype of the models' weights (the trained ones are the masters)")
    a("--quiet", action="store_true", help="no progress bar")
    a("--overwrite", action="store_true",
      help="start afresh over an earlier run in the same folder (its state and logs move to RUN_DIR.previous)")
    if loss_jump:  # PPO's loss has no scale to jump from
        a("--max-loss-jump", type=float, default=10.0, help="stop when a step's loss exceeds this x its recent average (0 = off)")


def add_speed_flags(parser, bucket=True) -> None:
    """--autocast (--no-autocast = --autocast off) and --bucket-window."""
    parser.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                        help="bf16 autocast of the forward over fp32 master weights, loss math in fp32: auto = on for "
                             "CUDA and for CPUs with native bf16 (AVX512-BF16/AMX), else off")
    parser.add_argument("--no-autocast", dest="autocast", action="store_const", const="off", help="--autocast off")
    if bucket:
        parser.add_argument("--bucket-window", type=int, default=8,
                            help="sort each window of this many batches of the shuffled order by length, so batches "
                                 "pad little (1 = plain shuffled order)")


def reset_peak_memory(device) -> None:
    """Start a new peak for peak_memory_mb, so each stage reports its own: CUDA's allocator statistics, or on
    Linux the resident high-water mark ("5" to /proc/self/clear_refs). Where that file cannot be written the
    CPU peak stays the process's peak so far."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, the peak resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def micro_batches(n, batch_size, seed, position, lengths=None, window=1):
    """Endless micro-batches of example indices: epoch e is torch.randperm(n) under seed (seed, e), cut into
    batches (with `lengths`, sorted in windows of `window` micro-batches first: sort_in_windows). Yields
    (indices, position after this batch); position = {"epoch", "batch"} resumes exactly."""
    epoch, b = position["epoch"], position["batch"]
    per_epoch = math.ceil(n / batch_size)
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        if lengths is not None:
            order = sort_in_windows(order, lengths, window * batch_size)
        while b < per_epoch:
            idx = order[b * batch_size:(b + 1) * batch_size]
            b += 1
            nxt = {"epoch": epoch, "batch": b} if b < per_epoch else {"epoch": epoch + 1, "batch": 0}
            yield idx, nxt
        epoch, b = epoch + 1, 0


def sort_in_windows(order, lengths, window) -> list:
    """`order` with each run of `window` consecutive indices sorted by lengths[i], longest first (stable:
    ties keep their order), so batches cut from it hold examples of similar length."""
    return [i for w0 in range(0, len(order), window)
            for i in sorted(order[w0:w0 + window], key=lambda i: -lengths[i])]


def autocast(mode, device):
    """Context for the model's forward: bf16 autocast ("bf16"), none ("off"), or "auto" = bf16 on CUDA with
    bf16 and on CPUs with native bf16 (AVX512-BF16/AMX), else off. The weights stay as they are (fp32
    masters); autocast("off") also switches off an enclosing autocast, for the loss math."""
    if mode not in ("auto", "bf16", "off"):
        raise ValueError(f"--autocast must be auto, bf16 or off, got {mode!r}")
    device = torch.device(device)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
    on = mode == "bf16" or (mode == "auto" and native)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


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
