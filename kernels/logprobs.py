"""Triton kernels: fused per-token log-prob, entropy and KL over the vocabulary (twin: minicai/logprobs.py).

Same signature and outputs as minicai.logprobs.token_logprobs; the math is written out there.

Algorithm. Online softmax (Milakov & Gimelshein, 2018, "Online normalizer calculation for softmax"):
- Forward, grid = cdiv(N, BLOCK_N) programs, one per block of token rows. Each walks the vocabulary in
  BLOCK_V columns; the logits tile z = (h W^T + b) / T [BLOCK_N, BLOCK_V] is built by tl.dot over H in
  BLOCK_H slices and never leaves the chip. Per row it keeps the running max m, s = sum e^{z-m},
  sum e^{z-m} z (entropy) and, when a reference is given, the reference's own max / sum-exp and
  sum e^{z-m} (z - y) (KL) from the reference tile y computed in the same loop. It stores logp, entropy,
  KL and, for the backward, lse (and the reference lse): O(N) floats.
- Backward, grid = (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)): each program recomputes its logits tile (and
  reference tile for KL), forms dL/dz = onehot g_logp - p (g_logp + g_ent (log p + H) - g_kl (log p -
  log q - KL)), divides by T, and pushes it through both matmuls: grad_hidden[rows] += G W[cols] and
  grad_weight[cols] += G^T h[rows], sliced over H in BLOCK_H columns and added with fp32 tl.atomic_add.
  Why atomics for both, not "accumulate grad_hidden over V inside a row-block program": a row block's
  grad_hidden accumulator is [BLOCK_N, H] (H = 2048 -> 512 KiB fp32 at BLOCK_N = 64), far beyond
  registers, so it would live in global memory anyway; the 2-D grid gives N/BLOCK_N x V/BLOCK_V
  independent programs (~250k for the benchmark shape), which fills the GPU with no inter-program
  ordering. The cost is N V H (1/BLOCK_N + 1/BLOCK_V) fp32 atomic adds; tiles whose gradient is exactly
  zero (all-ignored rows) skip them. This is the layout of Cut Cross-Entropy (Wijmans et al., 2024,
  "Cut Your Losses in Large-Vocabulary Language Models"); Liger-Kernel's fused linear cross-entropy
  instead materialises logits per token chunk and uses cuBLAS.

Memory: O(N) floats of statistics plus the fp32 gradient accumulators ([N, H], [V, H], [V]); no
[N, V] tensor is ever allocated (the naive path holds several).

Block sizes. tl.dot needs every dimension >= 16. GPU: BLOCK_N = 64, BLOCK_V = 128, BLOCK_H = 64 keeps a
fp32 logits tile at 32 KiB (plus the reference tile for KL) with room for double-buffered loads and
gives tensor-core shaped dots. Interpreter (TRITON_INTERPRET=1, numpy): 16 x 32 x 16, because every
program and loop step is a Python-level numpy call and small tiles keep the tests fast on tiny shapes.
chunk_size = (BLOCK_N, BLOCK_V) overrides them (powers of two >= 16).

Limitations.
- Not tuned on hardware (no autotune: it would benchmark under the interpreter too). The backward does
  the recompute matmul plus two matmuls through atomics; no gradient filtering (CCE skips tiles whose
  |G| is below bf16 resolution; that would make results approximate, so it is left out).
- Dot operands stay in the input dtype (bf16/fp16 -> tensor cores; fp32 -> input_precision="ieee",
  never TF32) with fp32 accumulation; in the backward G is rounded to the input dtype before its
  matmuls (as the naive bf16 path rounds its logits gradient). The twin keeps everything in fp32.
- hidden and weight of different dtypes are both promoted to the common dtype (a copy).
- fp32 gradient buffers of the full [V, H] (and [N, H]) size are allocated, then cast to the
  parameter dtype: one extra V x H copy for bf16 weights. Atomic order makes gradients
  non-deterministic in the last bits. No double backward.
"""
import os

import torch
import triton
import triton.language as tl

from minicai.logprobs import check_inputs


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, s_hn, s_hk, s_wv, s_wk, temperature,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """z = (h[rows] @ w[cols].T + b[cols]) / T as a fp32 [BLOCK_N, BLOCK_V] tile (0 where out of range)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < K
        h = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
        w = tl.load(w_ptr + cols[None, :] * s_wv + ks[:, None] * s_wk,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_V]
        acc = tl.dot(h, w, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc / temperature


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, t_ptr,
                logp_ptr, ent_ptr, kl_ptr, lse_ptr, lseq_ptr,
                N, V, K, KR, temperature, ignore_index,
                s_hn, s_hk, s_wv, s_wk, s_rhn, s_rhk, s_rwv, s_rwk,
                HAS_BIAS: tl.constexpr, HAS_REF: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                WITH_ENTROPY: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    rows = rows.to(tl.int64)  # V x H and N x H offsets can pass 2^31
    neg_inf = float("-inf")
    m = tl.full((BLOCK_N,), neg_inf, tl.float32)   # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)           # sum e^{z - m}
    sz = tl.zeros((BLOCK_N,), tl.float32)          # sum e^{z - m} z
    zt = tl.zeros((BLOCK_N,), tl.float32)          # z at the target
    mq = tl.full((BLOCK_N,), neg_inf, tl.float32)  # reference: running max, sum e^{y - mq}
    sq = tl.zeros((BLOCK_N,), tl.float32)
    szy = tl.zeros((BLOCK_N,), tl.float32)         # sum e^{z - m} (z - y)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols = cols.to(tl.int64)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, s_hn, s_hk, s_wv, s_wk,
                         temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H)
        z_m = tl.where(col_ok[None, :], z, neg_inf)  # padding columns must not count
        m_new = tl.maximum(m, tl.max(z_m, axis=1))
        scale = tl.exp(m - m_new)  # rescales sums kept relative to the old max
        e = tl.exp(z_m - m_new[:, None])  # [BLOCK_N, BLOCK_V], 0 on padding
        s = s * scale + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            sz = sz * scale + tl.sum(e * z, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        if HAS_REF:
            y = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_ok, col_ok, KR, s_rhn, s_rhk, s_rwv, s_rwk,
                             temperature, HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_H)
            y_m = tl.where(col_ok[None, :], y, neg_inf)
            mq_new = tl.maximum(mq, tl.max(y_m, axis=1))
            sq = sq * tl.exp(mq - mq_new) + tl.sum(tl.exp(y_m - mq_new[:, None]), axis=1)
            mq = mq_new
            szy = szy * scale + tl.sum(e * (z - y), axis=1)  # z - y directly: exactly 0 for identical models
        m = m_new
    lse = m + tl.log(s)
    valid = row_ok & (tgt != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, zt - lse, 0.0), mask=row_ok)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, tl.where(valid, lse - sz / s, 0.0), mask=row_ok)
    if HAS_REF:
        lse_q = mq + tl.log(sq)
        tl.store(lseq_ptr + rows, lse_q, mask=row_ok)
        kl = tl.maximum(szy / s - lse + lse_q, 0.0)  # >= 0 in exact arithmetic
        tl.store(kl_ptr + rows, tl.where(valid, kl, 0.0), mask=row_ok)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, t_ptr,
                lse_ptr, ent_ptr, kl_ptr, lseq_ptr, glogp_ptr, gent_ptr, gkl_ptr,
                gh_ptr, gw_ptr, gb_ptr,
                N, V, K, KR, temperature, ignore_index,
                s_hn, s_hk, s_wv, s_wk, s_rhn, s_rhk, s_rwv, s_rwk,
                HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr,
                G_LOGP: tl.constexpr, G_ENT: tl.constexpr, G_KL: tl.constexpr,
                NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < V
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, K, s_hn, s_hk, s_wv, s_wk,
                     temperature, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H)
    logp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]  # [BLOCK_N, BLOCK_V]
    p = tl.exp(logp)
    # dL/dz = onehot * g_logp - p * coef (chain rules in minicai/logprobs.py)
    coef = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if G_LOGP:
        g_logp = tl.load(glogp_ptr + rows, mask=row_ok, other=0.0)
        coef += g_logp[:, None]
        g = tl.where(cols[None, :] == tgt[:, None], g_logp[:, None], 0.0)
    if G_ENT:
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        coef += g_ent[:, None] * (logp + ent[:, None])
    if G_KL:
        g_kl = tl.load(gkl_ptr + rows, mask=row_ok, other=0.0)
        kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
        y = _logits_tile(rh_ptr, rw_ptr, rb_ptr, rows, cols, row_ok, col_ok, KR, s_rhn, s_rhk, s_rwv, s_rwk,
                         temperature, HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_H)
        logq = y - tl.load(lseq_ptr + rows, mask=row_ok, other=0.0)[:, None]
        coef -= g_kl[:, None] * ((logp - logq) - kl[:, None])
    g = tl.where(valid[:, None] & col_ok[None, :], (g - p * coef) / temperature, 0.0)  # d/d(h W^T + b)
    if tl.max(tl.max(tl.abs(g), axis=1), axis=0) > 0:  # all-ignored tiles add nothing
        if NEED_B:
            tl.atomic_add(gb_ptr + cols, tl.sum(g, axis=0), mask=col_ok)
        gc = g.to(w_ptr.dtype.element_ty)  # dot operands in the input dtype, fp32 accumulation
        for k0 in range(0, K, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < K
            if NEED_H:
                w = tl.load(w_ptr + cols[:, None] * s_wv + ks[None, :] * s_wk,
                            mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
                tl.atomic_add(gh_ptr + rows[:, None] * K + ks[None, :], tl.dot(gc, w, input_precision="ieee"),
                              mask=row_ok[:, None] & k_ok[None, :])
            if NEED_W:
                h = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk,
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
                tl.atomic_add(gw_ptr + cols[:, None] * K + ks[None, :],
                              tl.dot(tl.trans(gc), h, input_precision="ieee"),
                              mask=col_ok[:, None] & k_ok[None, :])


def _config(device, chunk_size):
    if device.type == "cuda":
        cfg = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8)
    else:  # the interpreter: every program is Python; small tiles for tiny test shapes
        cfg = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)
    if chunk_size is not None:
        bn, bv = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
        for name, b in (("BLOCK_N", bn), ("BLOCK_V", bv)):
            if b < 16 or b & (b - 1):
                raise ValueError(f"chunk_size: {name} = {b} must be a power of two >= 16 for the Triton kernel")
            cfg[name] = int(b)
    return cfg


def _same_dtype(h, w):
    dt = torch.promote_types(h.dtype, w.dtype)  # tl.dot wants equal operand dtypes
    return h.to(dt), w.to(dt)


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                temperature, ignore_index, with_entropy, cfg):
        ctx.set_materialize_grads(False)
        h, w = _same_dtype(hidden, weight)
        has_ref = ref_hidden is not None
        rh, rw = _same_dtype(ref_hidden, ref_weight) if has_ref else (h, w)  # dummies when no reference
        N, K = h.shape
        V, KR = w.shape[0], rh.shape[1]
        new = lambda: torch.empty(N, device=h.device, dtype=torch.float32)
        logp, ent, kl, lse, lse_q = new(), new(), new(), new(), new()
        b = bias if bias is not None else lse  # dummy pointer, never read
        rb = ref_bias if ref_bias is not None else lse
        if N > 0:
            _fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
                h, w, b, rh, rw, rb, targets, logp, ent, kl, lse, lse_q,
                N, V, K, KR, temperature, ignore_index,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                rh.stride(0), rh.stride(1), rw.stride(0), rw.stride(1),
                HAS_BIAS=bias is not None, HAS_REF=has_ref, HAS_REF_BIAS=ref_bias is not None,
                WITH_ENTROPY=with_entropy, **cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ent, kl, lse_q)
        ctx.cfg = (temperature, ignore_index, cfg)
        return logp, (ent if with_entropy else None), (kl if has_ref else None)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, lse, ent, kl, lse_q = ctx.saved_tensors
        temperature, ignore_index, cfg = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h, w = _same_dtype(hidden, weight)
        rh, rw = _same_dtype(ref_hidden, ref_weight) if g_kl is not None else (h, w)
        N, K = h.shape
        V, KR = w.shape[0], rh.shape[1]
        grad_h = torch.zeros(N, K, device=h.device, dtype=torch.float32) if need_h else None  # atomics: fp32
        grad_w = torch.zeros(V, K, device=h.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(V, device=h.device, dtype=torch.float32) if need_b else None
        grads = [g for g in (g_logp, g_ent, g_kl) if g is not None]
        if N > 0 and grads and (need_h or need_w or need_b):
            f32 = lambda g: lse if g is None else g.float().contiguous()
            _bwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
                h, w, bias if bias is not None else lse, rh, rw, ref_bias if ref_bias is not None else lse,
                targets, lse, ent, kl, lse_q, f32(g_logp), f32(g_ent), f32(g_kl),
                grad_h if need_h else lse, grad_w if need_w else lse, grad_b if need_b else lse,
                N, V, K, KR, temperature, ignore_index,
                h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                rh.stride(0), rh.stride(1), rw.stride(0), rw.stride(1),
                HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None,
                G_LOGP=g_logp is not None, G_ENT=g_ent is not None, G_KL=g_kl is not None,
                NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, **cfg)
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), *[None] * 8


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   ref_hidden=None, ref_weight=None, ref_bias=None, chunk_size=None, with_entropy=True):
    """Triton version of minicai.logprobs.token_logprobs (same arguments and returns; chunk_size here
    is the (BLOCK_N, BLOCK_V) tile, powers of two >= 16)."""
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"hidden is on {hidden.device}: the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    hidden2, targets2, ref_hidden2, lead = check_inputs(hidden, weight, targets, bias, temperature, ignore_index,
                                                        ref_hidden, ref_weight, ref_bias)
    cfg = _config(hidden.device, chunk_size)
    ref = [None if x is None else x.detach() for x in (ref_hidden2, ref_weight, ref_bias)]
    outs = _TritonTokenLogprobs.apply(hidden2, weight, bias, targets2.contiguous(), *ref, float(temperature),
                                      int(ignore_index), bool(with_entropy), cfg)
    return tuple(None if o is None else o.view(lead) for o in outs)
