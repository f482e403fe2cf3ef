"""LoRA: low-rank adapters on frozen linear layers (Hu et al., 2021, "LoRA", eq. 3).

    h = W0 x + (alpha / r) * B A x,    W0 [out, in] frozen,  A [r, in],  B [out, r]

A starts random and B at zero, so the wrapped model starts exactly equal to the base model (sec. 4.1).
Only A and B train. merge_lora folds the update into plain linear layers, W = W0 + (alpha/r) B A,
so the saved checkpoint is an ordinary model. lora_disabled() switches every adapter off at once: the
frozen base weights are then exactly the original model, which the DPO/PPO stages use as the reference
without keeping a second copy in memory.

Choices: A ~ N(0, 1/in_features) (the paper says "random Gaussian" without a scale; this keeps A x at the
scale of x); optional dropout on the adapter's input only, as in the authors' code; targets are matched
against the last component of a module name ("q" matches blocks.3.attn.q) or, when they contain a dot or
a wildcard, against the full name with fnmatch.
"""
import contextlib
import fnmatch

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update (eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype)
                                   / base.in_features ** 0.5)                                       # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # [out, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        base.requires_grad_(False)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W0 + (alpha/r) B A, computed in float32 and cast back to the base dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling     # [out, in]
        return (self.base.weight.float() + delta).to(self.base.weight.dtype)


def _matches(name, targets) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, t) if ("." in t or "*" in t or "?" in t) else last == t for t in targets)


def _set_module(model, name, module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model, targets=("q", "k", "v", "o"), rank=8, alpha=16.0, dropout=0.0) -> list:
    """Freeze every parameter of `model`, then wrap each nn.Linear whose name matches `targets` in a
    LoRALinear (in place). Returns the wrapped module names; ValueError if none matched."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {list(targets)} match no nn.Linear module (linear layers are named {linear})")
    for n in names:
        _set_module(model, n, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    return names


def lora_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model):
    """Inside the block every adapter is off: the model computes W0 x, i.e. the base model."""
    mods = lora_modules(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def merge_lora(model):
    """Replace every LoRALinear by a plain nn.Linear holding W0 + (alpha/r) B A (and the base bias), in
    place; all parameters become trainable again. Returns the model."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        base = m.base
        with torch.no_grad():
            merged = m.merged_weight()
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(merged)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        _set_module(model, name, lin)
    model.requires_grad_(True)
    return model
