"""Weights prepacked for CPU decoding: the sampler's fast path, kept out of the transformer's own file.

Decoding a batch of a few rows is bound by reading the weights from memory, and on CPU oneDNN's blocked
layout reads them faster than the row-major layout MKL's sgemm gets (SmolLM2-135M, fp32, 2-core CPU: 1.52x /
1.65x faster greedy decoding at batch 1 / 16; BENCHMARKS.md). The path is torch.ops.mkldnn's (private; the one
inductor's CPU freezing uses), so it is probed once per dtype and skipped where it does not work.

How: inside `prepacked_weights(model)` four kinds of method are shadowed by instance attributes that multiply
by packed copies: each attention's `project` (q, k, v packed as one matrix) and each SwiGLU's `gate_up` (one
oneDNN call instead of three or two: 10-13% less time in these matmuls at 1-16 rows, fp32, 1 thread), the
`forward` of every other plain nn.Linear, and the model's `unembed`. Leaving the block deletes the
attributes, so the model's class methods serve again and a packed copy never outlives a weight update. With
gradients on, the shadows call the plain methods. Results differ from F.linear only in summation order (~1e-6).
"""
import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicai.model import MLP, Attention


# modules whose input projections are packed as one matrix: type -> (the method shadowed, its linears)
FUSED = {Attention: ("project", ("q", "k", "v")), MLP: ("gate_up", ("gate", "up"))}


def packed_linear(x, packed, bias=None):
    """x [..., in] @ W.T + bias with W prepacked by oneDNN."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def pack(weight):
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 16)  # 16: a batch-size hint; serves every size


def can_prepack(weight: torch.Tensor) -> bool:
    """CPU fp32/bf16 weights, with a oneDNN build whose packed matmul works here (checked once per dtype)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    return packed_linear_works(weight.dtype)


@functools.cache
def packed_linear_works(dtype) -> bool:
    """Probe the private ops on a tiny matmul: a build or CPU without them (or without native bf16) falls back
    to F.linear instead of failing mid-generation."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w, x = torch.randn(8, 16).to(dtype), torch.randn(3, 16).to(dtype)
        y = packed_linear(x, pack(w))
        return torch.allclose(y.float(), F.linear(x, w).float(), atol=0.05, rtol=0.05)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def shadow(module, name, packed, bias, split=None):
    """module.<name> := the packed product (split into `split` sizes along the last dim), or the class's own
    method when a gradient is needed."""
    plain = getattr(type(module), name).__get__(module)

    def packed_method(x):
        if torch.is_grad_enabled():
            return plain(x)
        y = packed_linear(x, packed, bias)
        return y if split is None else y.split(split, dim=-1)

    object.__setattr__(module, name, packed_method)


def fused(members):
    """One packed matrix (and bias) for linears that read the same input."""
    bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
    return pack(torch.cat([m.weight.detach() for m in members])), bias, [m.out_features for m in members]


@contextlib.contextmanager
def prepacked_weights(model, enabled: bool = True):
    """Within this block `model` multiplies by prepacked weights (no-grad only; CPU fp32/bf16 only, elsewhere a
    no-op). Costs one extra copy of the weights while active. A LoRA-wrapped linear stays unfused (its frozen
    base is packed on its own)."""
    if not enabled or "unembed" in vars(model) or not can_prepack(model.output_weight):
        yield model
        return
    shadowed, done = [], set()
    try:
        with torch.no_grad():
            for m in model.modules():
                groups = FUSED.get(type(m))
                members = [getattr(m, n, None) for n in groups[1]] if groups else []
                if members and all(type(x) is nn.Linear for x in members):
                    packed, bias, sizes = fused(members)
                    shadow(m, groups[0], packed, bias, sizes)
                    shadowed.append((m, groups[0]))
                    done.update(map(id, members))
            if getattr(model, "lm_head", None) is not None:
                done.add(id(model.lm_head))  # an untied head is the unembedding: packed once, for unembed below
            for m in model.modules():
                if type(m) is nn.Linear and id(m) not in done:
                    shadow(m, "forward", pack(m.weight), None if m.bias is None else m.bias.detach())
                    shadowed.append((m, "forward"))
            shadow(model, "unembed", pack(model.output_weight), None)
            shadowed.append((model, "unembed"))
        yield model
    finally:
        for m, name in shadowed:
            object.__delattr__(m, name)
