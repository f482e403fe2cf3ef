"""Fused scaled-dot-product attention in Triton, forward and backward (FlashAttention-2).

Algorithm: FlashAttention-2 (Dao, 2023), itself FlashAttention (Dao et al., 2022) with better work
partitioning. For one block of BLOCK_M query rows the forward streams over key/value blocks of BLOCK_N
rows and keeps an *online softmax*: running row maximum m, running normaliser l and an unnormalised
output accumulator, rescaled by exp(m_old - m_new) whenever the maximum grows (FA2 Algorithm 1). The
T x T score matrix never exists in memory; only O [B,Hq,Tq,D] and the row logsumexp L [B,Hq,Tq] (fp32)
are written. The backward *recomputes* P = exp(S - L) block by block instead of storing it (FA2
Algorithm 2):
    1. preprocess:  delta_i = rowsum(dO_i * O_i)                 (= rowsum(P_i * dP_i))
    2. dK/dV kernel, one program per key block:  dV += P^T dO,  dS = P * (dO V^T - delta),  dK += dS^T Q
       looping over every query block and, for GQA, over every query head of the group.
    3. dQ kernel, one program per query block:   dQ += dS K
Step 2/3 are separate kernels rather than one kernel with atomic adds into dQ: no atomics, so the
backward is deterministic (run-to-run bit identical), at the cost of computing Q K^T and dO V^T twice.

Conventions and details
- Layout [B, H, T, D], made contiguous on entry. Scores are kept in base-2 units (S * scale * log2 e)
  so the kernels use exp2; the saved logsumexp is therefore log2-based (an internal detail).
- GQA/MQA: query head h reads kv head h // (Hq // Hkv) by index arithmetic; k/v are never repeated.
  The dK/dV program of a kv head loops over the Hq // Hkv query heads of its group and sums in registers.
- Causal masking is bottom-right aligned: query i sits at key position Tk - Tq + i (KV-cache decoding).
  Key blocks entirely above the diagonal are never visited; blocks entirely below it run without any
  mask arithmetic; only blocks that straddle the diagonal or the end of the sequence pay for the mask.
- key_padding_mask [B, Tk] (True = real token) is applied per key, so it may have holes. On the host we
  also compute each row's first and one-past-last real key; blocks outside that range are skipped, so
  left-padded rows cost only their real length (plus one partial block).
- Rows with no visible key (left-pad queries under causal + padding, or Tq > Tk under causal) return 0;
  their logsumexp is stored as +inf so that P = exp2(S - inf) = 0 in the backward: zero gradients, no NaN.
- Accumulation is fp32 for every input dtype; P and dS are cast to the input dtype before their matmuls
  (as in FA2). fp32 inputs use 3xTF32 dots ("tf32x3": tensor cores with fp32-level accuracy, ~1e-6)
  rather than plain TF32 (~1e-3) or IEEE FMA dots (which took minutes to compile and spilled heavily).

Block sizes (chosen by compiling every config for sm_90 and reading shared memory / register spills)
- GPU, fp16/bf16: triton.autotune over three configs per kernel, keyed on (Tq, Tk) rounded up to powers
  of two, D, causal and padding, plus the dtypes (autotune adds those). Rounding keeps decoding, whose
  Tk grows by one each step, from re-tuning every token. (BLOCK_M, BLOCK_N, warps), 3 stages:
    forward : (128, 64, 8), (128, 32, 4), (64, 64, 4). 128 query rows per program amortise each K/V
              load over many rows; 32-64 keys per step keep the [BM, BN] fp32 score tile in registers.
              (128, 64) with 4 warps was dropped: it spills at D = 128.
    dK/dV   : (32, 128, 8), (32, 64, 8), (64, 64, 8). Many keys per program (dK, dV accumulate in
              registers), few query rows per step; 8 warps because two [BN, D] fp32 accumulators plus
              K and V do not fit 4 warps' registers at D = 128 (every 4-warp config spilled there).
    dQ      : the transpose, (128, 32, 8), (128, 64, 8), (64, 32, 4).
  Configs larger than the rounded lengths are pruned. Few configs on purpose: each shape bucket
  benchmarks all of them once, and each compiles once per dtype / D / causal / padding (~1-5 s each).
- Tq <= 16 (decoding): one config (16, 64, 4 warps, 2 stages); BLOCK_M = 16 is tl.dot's minimum.
- fp32: one small config per kernel, no tuning: forward (32, 32), dK/dV (16, 32), dQ (32, 32), 8 warps.
- MINICAI_ATTN_AUTOTUNE=0 skips tuning: forward (64, 64), dK/dV (32, 64, 8 warps), dQ (64, 32), 2 stages
  (bench_attention.py --check uses this to compile less).
- Under TRITON_INTERPRET=1 (CPU tests) a single 16 x 16 config is used: autotuning under the interpreter is
  slow, and 16-row blocks make the tiny test shapes cross several blocks and partial blocks.

Limitations
- Head dim D must be a power of two in [16, 128] (tl.dot needs >= 16, tl.arange a power of two; 256 is
  left out because the configs were not sized for its register and shared-memory footprint).
- q, k, v must share one dtype: float16, bfloat16 or float32. No dropout, no attention bias, no sliding
  window, no arbitrary [Tq, Tk] masks: only causal and/or per-key padding.
- Decoding (Tq = 1) launches B * Hq programs of one useful query row each and does not split the key
  axis (no split-K / "flash-decoding"), so single-sequence decoding under-fills a large GPU; nor are the
  query heads of a GQA group packed into one tile.
- fp32 is correct but slow (small tiles, register spills); it exists for testing, use bf16/fp16.
- The first call for each dtype / D / causal / padding combination compiles (seconds) and each new
  shape bucket autotunes (a few hundred ms).
- No double backward (the backward is not itself differentiable). No torch.compile integration.
- More than 2^31 elements per (batch, head) slice is not supported (int32 row offsets).
- Tested here on the CPU interpreter (fp32, fp16); GPU numbers come from bench_attention.py.
"""
import math
import os

import torch
import triton
import triton.language as tl

from minicai.attention import check_attention_inputs

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE = os.environ.get("MINICAI_ATTN_AUTOTUNE", "1") != "0"
_LOG2E = 1.4426950408889634


def _cfg(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


_KEY = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_PAD"]
_DECODE = (16, 64, 4, 2)  # Tq <= 16: BLOCK_M = 16 is the smallest tile tl.dot accepts


def _tuning(pairs, fixed, fp32):
    """triton.autotune arguments for one kernel; (BLOCK_M, BLOCK_N, warps, stages) tuples.

    pairs: the configs tuned over for fp16/bf16; fixed: the one used with MINICAI_ATTN_AUTOTUNE=0;
    fp32: the one used for float32 inputs (3xTF32 dots need many registers: small tiles, no tuning).
    """
    if _INTERPRET:
        return dict(configs=[_cfg(16, 16, 4, 1)], key=_KEY)

    def prune(configs, nargs, **kwargs):
        a = {**nargs, **kwargs}
        if a["Q"].dtype == torch.float32:
            return [_cfg(*fp32)]
        if a["TQ_KEY"] == 16:
            return [_cfg(*_DECODE)]
        if not _AUTOTUNE:
            return [_cfg(*fixed)]
        fit = [c for c in configs if c.kwargs["BLOCK_M"] <= a["TQ_KEY"] and c.kwargs["BLOCK_N"] <= a["TK_KEY"]]
        return fit or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]

    # at least two configs, or the autotuner would skip prune() and its dtype / decoding rules
    configs = [_cfg(*c) for c in pairs] if _AUTOTUNE else [_cfg(*fixed), _cfg(*_DECODE)]
    return dict(configs=configs, key=_KEY, prune_configs_by={"early_config_prune": prune})


_FWD = _tuning([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)], fixed=(64, 64, 4, 2), fp32=(32, 32, 8, 2))
_DKDV = _tuning([(32, 128, 8, 3), (32, 64, 8, 3), (64, 64, 8, 3)], fixed=(32, 64, 8, 2), fp32=(16, 32, 8, 2))
_DQ = _tuning([(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)], fixed=(64, 32, 4, 2), fp32=(32, 32, 8, 2))
# lengths change every decoding step: do not compile variants for Tq/Tk % 16 == 0 or == 1
_NO_SPEC = ["Tq", "Tk", "TQ_KEY", "TK_KEY"]


# ----------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, pad_ptr, offs_m, lo, hi, Tq, Tk, qk_scale,
               HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, MASKED: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of one query block over key blocks [lo, hi)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)                      # [BN] key positions
        in_k = cols < Tk
        k = tl.load(k_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], log2 units
        if HAS_PAD:
            real = tl.load(pad_ptr + cols, mask=in_k, other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        if MASKED:  # block straddles the diagonal or the end of the keys
            ok = in_k[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with every key masked so far has m_new = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])                        # [BM, BN]
        alpha = tl.math.exp2(m_i - m_use)                           # rescale of the old statistics
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_k[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(**_FWD)
@triton.jit(do_not_specialize=_NO_SPEC)
def _fwd_kernel(Q, K, V, O, LSE, PAD, KV_LO, KV_HI, Hq, GROUP, Tq, Tk, qk_scale, TQ_KEY, TK_KEY,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first for a shorter tail
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)                                           # b * Hq + h
    b = bh // Hq
    bkv = b * (Hq // GROUP) + (bh % Hq) // GROUP                    # kv head = q head // group
    q_ptr = Q + bh.to(tl.int64) * Tq * HEAD_DIM
    k_ptr = K + bkv.to(tl.int64) * Tk * HEAD_DIM
    v_ptr = V + bkv.to(tl.int64) * Tk * HEAD_DIM
    pad_ptr = PAD + b.to(tl.int64) * Tk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                # [BM] query rows
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Tq
    q = tl.load(q_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q[:, None], other=0.0)

    # key range to visit: [lo, hi); blocks in [lo, mid) need no causal / end-of-keys mask
    lo = 0
    hi = Tk
    if HAS_PAD:
        lo = tl.load(KV_LO + b) // BLOCK_N * BLOCK_N
        hi = tl.load(KV_HI + b)
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(Tk - Tq + (pid_m + 1) * BLOCK_M, 0))  # last row's last key + 1
        mid = tl.maximum(Tk - Tq + pid_m * BLOCK_M + 1, 0)                  # keys every row can see
    else:
        mid = Tk
    mid = tl.maximum(tl.minimum(mid, hi) // BLOCK_N * BLOCK_N, lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, pad_ptr, offs_m, lo, mid, Tq, Tk, qk_scale,
                               HEAD_DIM, CAUSAL, HAS_PAD, False, DOT_PREC, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, pad_ptr, offs_m, mid, hi, Tq, Tk, qk_scale,
                               HEAD_DIM, CAUSAL, HAS_PAD, True, DOT_PREC, BLOCK_N)

    empty = l_i == 0.0                                              # no visible key: output 0, lse +inf
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + bh.to(tl.int64) * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=in_q[:, None])
    tl.store(LSE + bh.to(tl.int64) * Tq + offs_m, lse, mask=in_q)


# ---------------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the softmax-backward row term (FA2 Algorithm 2, line 4)."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Tq
    ptrs = bh.to(tl.int64) * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=in_q[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=in_q[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=in_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, lo, hi, Tq, Tk, qk_scale,
                HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate one key block's dK, dV over query blocks [lo, hi) of one query head (transposed tiles)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)                      # [BM] query rows
        in_q = rows < Tq
        q = tl.load(q_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q[:, None], other=0.0)
        do = tl.load(do_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q[:, None], other=0.0)
        # rows past Tq read lse = +inf, so their P is 0: no row mask needed below
        lse = tl.load(lse_ptr + rows, mask=in_q, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=in_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM] = S^T
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:  # causal diagonal (bottom-right aligned)
            p_t = tl.where(offs_n[:, None] <= rows[None, :] + (Tk - Tq), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)    # [BN, BM] = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(**_DKDV)
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PAD, KV_LO, KV_HI, Hq, GROUP, Tq, Tk, qk_scale, scale,
                     TQ_KEY, TK_KEY, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)                                          # b * Hkv + kv head
    Hkv = Hq // GROUP
    b = bkv // Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)                        # [BN] key positions
    offs_d = tl.arange(0, HEAD_DIM)
    in_k = offs_n < Tk
    kv_off = bkv.to(tl.int64) * Tk * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    k = tl.load(K + kv_off, mask=in_k[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=in_k[:, None], other=0.0)

    # query rows that can see this key block: [lo, end); rows >= mid see all of it (no mask)
    end = Tq
    if HAS_PAD:  # a key block with no real key gets zero gradients without visiting any query
        skip = (start_n + BLOCK_N <= tl.load(KV_LO + b)) | (start_n >= tl.load(KV_HI + b))
        end = tl.where(skip, 0, Tq)
    end_blocks = (end + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if CAUSAL:  # query i sees key j iff j <= i + Tk - Tq
        lo = tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        mid = (tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        mid = tl.minimum(mid, end_blocks)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(GROUP):  # GQA: every query head of this kv head's group adds to the same dK, dV
        bh = b * Hq + (bkv % Hkv) * GROUP + g
        q_ptr = Q + bh.to(tl.int64) * Tq * HEAD_DIM
        do_ptr = DO + bh.to(tl.int64) * Tq * HEAD_DIM
        lse_ptr = LSE + bh.to(tl.int64) * Tq
        delta_ptr = DELTA + bh.to(tl.int64) * Tq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, lo, mid, Tq, Tk, qk_scale,
                             HEAD_DIM, True, DOT_PREC, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, offs_n, mid, end, Tq, Tk, qk_scale,
                             HEAD_DIM, False, DOT_PREC, BLOCK_M)
    dk = dk * scale                                                 # S = scale * Q K^T
    if HAS_PAD:
        # P was not masked for padding keys inside the loop: a key's P row only reaches that key's own
        # dK, dV row, so zeroing the row here is exact (and where() also drops any inf it produced)
        real = tl.load(PAD + b.to(tl.int64) * Tk + offs_n, mask=in_k, other=0) != 0
        dk = tl.where(real[:, None], dk, 0.0)
        dv = tl.where(real[:, None], dv, 0.0)
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=in_k[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=in_k[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, offs_m, lo, hi, Tq, Tk, qk_scale,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, MASKED: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        in_k = cols < Tk
        k = tl.load(k_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_k[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=in_k[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        p = tl.math.exp2(s - lse[:, None])
        if HAS_PAD:
            real = tl.load(pad_ptr + cols, mask=in_k, other=0) != 0
            p = tl.where(real[None, :], p, 0.0)
        if MASKED:
            ok = in_k[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)      # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.autotune(**_DQ)
@triton.jit(do_not_specialize=_NO_SPEC)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PAD, KV_LO, KV_HI, Hq, GROUP, Tq, Tk, qk_scale, scale,
                   TQ_KEY, TK_KEY, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                   DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // Hq
    bkv = b * (Hq // GROUP) + (bh % Hq) // GROUP
    k_ptr = K + bkv.to(tl.int64) * Tk * HEAD_DIM
    v_ptr = V + bkv.to(tl.int64) * Tk * HEAD_DIM
    pad_ptr = PAD + b.to(tl.int64) * Tk

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_q = offs_m < Tq
    q_off = bh.to(tl.int64) * Tq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_off, mask=in_q[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=in_q[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Tq + offs_m, mask=in_q, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Tq + offs_m, mask=in_q, other=0.0)

    # same key ranges as the forward
    lo = 0
    hi = Tk
    if HAS_PAD:
        lo = tl.load(KV_LO + b) // BLOCK_N * BLOCK_N
        hi = tl.load(KV_HI + b)
    if CAUSAL:
        hi = tl.minimum(hi, tl.maximum(Tk - Tq + (pid_m + 1) * BLOCK_M, 0))
        mid = tl.maximum(Tk - Tq + pid_m * BLOCK_M + 1, 0)
    else:
        mid = Tk
    mid = tl.maximum(tl.minimum(mid, hi) // BLOCK_N * BLOCK_N, lo)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, offs_m, lo, mid, Tq, Tk, qk_scale,
                   HEAD_DIM, CAUSAL, HAS_PAD, False, DOT_PREC, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, pad_ptr, offs_m, mid, hi, Tq, Tk, qk_scale,
                   HEAD_DIM, CAUSAL, HAS_PAD, True, DOT_PREC, BLOCK_N)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=in_q[:, None])


# ------------------------------------------------------------------------------------------------- glue

def _grid_m(Tq, BH):
    return lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), BH)


def _common(q, k, causal, has_pad):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    return dict(Hq=Hq, GROUP=Hq // Hkv, Tq=Tq, Tk=Tk,
                TQ_KEY=max(16, triton.next_power_of_2(Tq)), TK_KEY=max(16, triton.next_power_of_2(Tk)),
                HEAD_DIM=D, CAUSAL=causal, HAS_PAD=has_pad,
                DOT_PREC="tf32x3" if q.dtype == torch.float32 else "tf32")


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        if key_padding_mask is not None:
            real = key_padding_mask.contiguous()                                  # [B, Tk] bool
            pos = torch.arange(Tk, device=q.device)
            kv_lo = torch.where(real, pos, Tk).amin(1).to(torch.int32)           # first real key (Tk: none)
            kv_hi = torch.where(real, pos + 1, 0).amax(1).to(torch.int32)        # one past the last real key
            pad = real.view(torch.uint8)
        else:
            pad = kv_lo = kv_hi = q.new_zeros(1, dtype=torch.int32)              # never read
        o = torch.empty_like(q)
        lse = torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)    # log2-based
        meta = _common(q, k, causal, key_padding_mask is not None)
        _fwd_kernel[_grid_m(Tq, B * Hq)](q, k, v, o, lse, pad, kv_lo, kv_hi, qk_scale=scale * _LOG2E, **meta)
        ctx.save_for_backward(q, k, v, o, lse, pad, kv_lo, kv_hi)
        ctx.causal, ctx.has_pad, ctx.scale = causal, key_padding_mask is not None, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pad, kv_lo, kv_hi = ctx.saved_tensors
        do = do.contiguous()
        B, Hq, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        delta = torch.empty_like(lse)
        _bwd_delta_kernel[(triton.cdiv(Tq, 64), B * Hq)](o, do, delta, Tq, HEAD_DIM=D, BLOCK_M=64)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = _common(q, k, ctx.causal, ctx.has_pad)
        args = dict(qk_scale=ctx.scale * _LOG2E, scale=ctx.scale, **meta)
        _bwd_dkdv_kernel[lambda m: (triton.cdiv(Tk, m["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, pad, kv_lo, kv_hi, **args)
        _bwd_dq_kernel[_grid_m(Tq, B * Hq)](q, k, v, do, lse, delta, dq, pad, kv_lo, kv_hi, **args)
        return dq, dk, dv, None, None, None


def attention(q, k, v, *, causal=True, key_padding_mask=None, scale=None):
    """Fused attention; same contract as minicai.attention.attention (the PyTorch twin).

    q [B, Hq, Tq, D], k and v [B, Hkv, Tk, D] with Hq % Hkv == 0; key_padding_mask [B, Tk] bool, True = real
    token; causal is bottom-right aligned; scale defaults to 1/sqrt(D). Returns [B, Hq, Tq, D] in q's dtype.
    """
    check_attention_inputs(q, k, v, key_padding_mask)
    D = q.shape[-1]
    if D < 16 or D > 128 or D & (D - 1):
        raise ValueError(f"attention (triton): head dim {D} must be a power of two in [16, 128]")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention (triton): dtype {q.dtype} not supported (float16, bfloat16, float32)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if q.shape[2] == 0 or k.shape[2] == 0:  # nothing to attend: zeros, like the twin
        return q * 0.0 + 0.0 * (k.sum() + v.sum())
    return _FlashAttention.apply(q, k, v, bool(causal), key_padding_mask, scale)
