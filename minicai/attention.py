"""Scaled dot-product attention with causal + key-padding masks, GQA/MQA and KV-cache decoding.

    attention(Q, K, V) = softmax(scale * Q K^T + mask) V            (Vaswani et al., 2017, eq. 1)

This is the PyTorch twin of the fused Triton kernel in kernels/attention.py (FlashAttention-2) and the
function the model calls for every layer. With the triton backend selected (minicai.backend) and a tensor
the kernel can run on, it dispatches to the kernel; otherwise it calls
torch.nn.functional.scaled_dot_product_attention, which picks a fused CPU/GPU implementation.

Conventions
- q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D], Hq a multiple of Hkv (GQA; Hkv = 1 is MQA). k/v heads are
  shared by index (SDPA's enable_gqa), never repeated in memory.
- causal is bottom-right aligned: query i sits at key position Tk - Tq + i, so with a KV cache (Tq < Tk)
  the new queries see the whole cache.
- key_padding_mask [B, Tk] bool, True = real token (left padding in batched generation).
- Deviation from plain SDPA: a query row with no visible key (a left-pad query under causal + padding)
  returns zeros instead of NaN, and passes zero gradient.
"""
import math

import torch
import torch.nn.functional as F

from minicai.backend import use_triton


def check_attention_inputs(q, k, v, key_padding_mask=None) -> None:
    """Raise ValueError naming the offending tensor when shapes/dtypes do not fit the attention contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor [B, H, T, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head dim")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"attention: q heads ({Hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be bool [B, Tk] = {(B, k.shape[2])}, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def decode_attention(q, k, v, key_padding_mask, scale):
    """One query per row (Tq = 1) sees every key but padding: two batched matmuls in the input dtype with the
    softmax in float32 (the precision of transformers' eager attention). Why: torch's fused CPU SDPA kernel
    is 4-6x slower than this in bfloat16 at one query (as fast in float32, where SDPA is kept).
    k and v are made contiguous first: CPU bf16 matmuls copy strided cache views less efficiently."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    k, v = k.contiguous(), v.contiguous()
    qg = q.reshape(B, Hkv, Hq // Hkv, D)                                     # [B, Hkv, G, D] G query heads per k/v head
    scores = (qg @ k.transpose(-1, -2)).float() * scale                      # [B, Hkv, G, Tk]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)                    # a row with no real key -> zeros
    return (probs.to(v.dtype) @ v).reshape(B, Hq, 1, D)


def left_pad_lengths(key_padding_mask):
    """[B] number of leading pads when every row is left padded (False... then True...), else None."""
    n_pad = (~key_padding_mask).sum(-1)                                      # [B]
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    return n_pad.tolist() if bool((key_padding_mask == (positions[None] >= n_pad[:, None])).all()) else None


def per_row_causal(q, k, v, pads, scale, gqa):
    """Square causal attention over left-padded rows, one SDPA call per row on its real tokens with
    is_causal (which skips the masked half); pad queries see no key and get zeros."""
    rows = []
    for b, p in enumerate(pads):
        o = F.scaled_dot_product_attention(q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], is_causal=True,
                                           scale=scale, enable_gqa=gqa)
        rows.append(F.pad(o, (0, 0, p, 0)))                                  # zeros for the p pad queries
    return torch.cat(rows)


def attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None):
    """softmax(scale * q k^T + mask) v -> [B, Hq, Tq, D]; rows with no visible key are zeros."""
    if use_triton(q):  # the one backend switch; lazy so minicai runs without triton installed
        from minicai_kernels.attention import attention as triton_attention
        return triton_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    check_attention_inputs(q, k, v, key_padding_mask)
    Tq, Tk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]

    if Tq == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):  # CPU decoding, low precision
        return decode_attention(q, k, v, key_padding_mask, scale)
    if key_padding_mask is None and (not causal or (Tq == 1 and Tk >= 1)):  # one decode query sees all keys
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if Tq == 1 and key_padding_mask is not None:  # one decode query sees every real key: the padding mask is all
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :], scale=scale,
                                             enable_gqa=gqa)
        return out.masked_fill(~key_padding_mask.any(-1)[:, None, None, None], 0.0)  # no real key: zeros
    if key_padding_mask is None and Tq == Tk:  # square causal: top-left == bottom-right alignment
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if causal and Tq == Tk >= 128 and key_padding_mask is not None:  # a long left-padded prefill
        pads = left_pad_lengths(key_padding_mask)
        if pads is not None:  # a masked call cannot skip the upper triangle: 2x slower at T = 1600 (bf16, CPU)
            return per_row_causal(q, k, v, pads, scale, gqa)

    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)          # [Tq, Tk]
    if causal:
        allowed = allowed.tril(Tk - Tq)                                      # key j <= Tk - Tq + i
    allowed = allowed[None, None]                                            # [1, 1, Tq, Tk]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]               # [B, 1, Tq, Tk]
    # SDPA gives NaN for an all-False row: let such rows attend everywhere, then zero their output
    empty = ~allowed.any(-1, keepdim=True)                                   # [B|1, 1, Tq, 1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)
