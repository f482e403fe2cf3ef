"""Per-token log-probabilities, entropy and KL over the vocabulary, without the [N, V] logits.

RLHF/RLAIF and SFT need, per token n, quantities of the softmax over z_n = (W h_n + b) / T:

    logp_n    = z_{n,t_n} - lse(z_n)                                   (log-probability of the target)
    entropy_n = -sum_j p_nj log p_nj = lse(z_n) - sum_j p_nj z_nj
    kl_n      = sum_j p_nj (log p_nj - log q_nj)                      (KL(policy || reference), exact)

Materialising z costs N x V floats (4096 tokens x 49152 vocab = 805 MB in fp32, several times over
for autograd). Two paths avoid it.

token_logprobs (general: any later use of the per-token outputs, e.g. PPO ratios, entropy bonus, KL
penalty). z is produced one [chunk_N, chunk_V] tile at a time and folded into running per-row
statistics with the online softmax of Milakov & Gimelshein (2018, "Online normalizer calculation for
softmax"): running max m, running sum s = sum_j e^{z_j - m}, and running sum_j e^{z_j - m} z_j
(entropy) and sum_j e^{z_j - m} (z_j - y_j) (KL, y = reference logits), each rescaled by
e^{m_old - m_new} when the max moves. The upstream gradient is unknown until backward, so the
backward recomputes every tile (one extra matmul: 4 against the naive path's 3) and forms dL/dz
tile by tile:

    d logp / dz_j = onehot_j - p_j
    d H    / dz_j = -p_j (log p_j + H)
    d KL   / dz_j =  p_j ((log p_j - log q_j) - KL)          (q held constant)

then grad_hidden += G W / T and grad_weight += G^T h / T per tile (fp32 accumulators), so peak
extra memory is O(chunk_N x chunk_V) plus the gradients themselves (same idea as Cut Cross-Entropy,
Wijmans et al., 2024). kernels/logprobs.py is the Triton version and this function is its PyTorch
twin (same signature, `use_triton` dispatches).

cross_entropy_loss (SFT: the loss is a weighted sum L = -sum_n c_n logp_n with c_n known now, e.g.
c_n = 1/|M| for the mean over non-ignored tokens). Then dL/dz_n = c_n (p_n - onehot_{t_n}) is known
in the forward, as soon as a row block's softmax is: per block of chunk_N rows the whole-vocabulary
logits [chunk_N, V] are formed (one matmul), and grad_hidden (G W) and grad_weight (G^T h) are
accumulated right away; the backward only multiplies the stored gradients by the scalar upstream
gradient. 3 matmuls, like the naive path, and memory = the gradients + one [chunk_N, V] block. This is
the trick of Liger-Kernel's FusedLinearCrossEntropy (Hsu et al., 2024, "Liger Kernel: Efficient Triton
Kernels for LLM Training"); the code here is our own. Caveat: the gradient work happens in the forward
whether or not backward is ever called, so it is a training-only path; under torch.no_grad(), or
when none of hidden / weight / bias requires grad, only the loss is computed.

Deviations / choices:
- All arithmetic is float32 (bf16/fp16 tiles are upcast); outputs are float32, gradients come back
  in the dtype of the tensor they belong to.
- Rows whose target is ignore_index are dropped before any matmul (prompt/padding tokens cost
  nothing) and return 0 for all three outputs, with zero gradient.
- KL is clamped at 0: it is non-negative in exact arithmetic and small negatives are rounding.
- Reference inputs (ref_hidden, ref_weight, ref_bias) are constants: they get no gradient. The
  reference may have its own hidden size; only V must match. Per-token loss weights are constants too.
- Double backward is not supported.

The sampled-token KL estimators k1/k2/k3 (what PPO's reward and metrics use) live in minicai.losses.
"""
import torch

from minicai.backend import use_triton


def check_inputs(hidden, weight, targets, bias, temperature, ignore_index, ref_hidden, ref_weight, ref_bias):
    """Validate and flatten leading dims. Returns (hidden [N,H], targets [N], ref_hidden [N,Hr] or None,
    lead_shape). Shared by this twin and minicai_kernels.logprobs."""
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"hidden must be [..., H] and weight [V, H]; "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., {hidden.shape[-1]}] does not match weight {tuple(weight.shape)}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point; got {hidden.dtype}, {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal "
                         f"hidden.shape[:-1] = {tuple(hidden.shape[:-1])}")
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be [{V}]; got {tuple(bias.shape)}")
    if not (float(temperature) > 0 and float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if ref_bias is not None and ref_weight is None:
        raise ValueError("ref_bias given without ref_hidden/ref_weight")
    lead = tuple(targets.shape)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()
    if ref_hidden is not None:
        if ref_weight.dim() != 2 or ref_weight.shape[0] != V:
            raise ValueError(f"ref_weight must be [{V}, H_ref]; got {tuple(ref_weight.shape)}")
        if tuple(ref_hidden.shape) != lead + (ref_weight.shape[1],):
            raise ValueError(f"ref_hidden must be {lead + (ref_weight.shape[1],)}; got {tuple(ref_hidden.shape)}")
        if ref_bias is not None and tuple(ref_bias.shape) != (V,):
            raise ValueError(f"ref_bias must be [{V}]; got {tuple(ref_bias.shape)}")
        ref_hidden = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, {V}) and is not ignore_index={ignore_index}")
    return hidden, targets, ref_hidden, lead


def _chunks(chunk_size, device):
    if chunk_size is None:  # CPU: 256 x 2048 fp32 tiles (2 MiB) ran within ~12% of naive on 2 quiet threads
        return (4096, 8192) if device.type == "cuda" else (256, 2048)
    cn, cv = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    if int(cn) < 1 or int(cv) < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    return int(cn), int(cv)


def _tile(h, weight, bias, v0, v1, temperature):
    """fp32 logits tile z [n, v1-v0] for fp32 rows h [n, H]; also returns the fp32 weight chunk."""
    w = weight[v0:v1].float()  # [cv, H] (a view when weight is already fp32)
    z = h @ w.T if bias is None else torch.addmm(bias[v0:v1].float(), h, w.T)
    return (z if temperature == 1.0 else z.div_(temperature)), w


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                temperature, ignore_index, with_entropy, cn, cv):
        ctx.set_materialize_grads(False)
        N, V, dev = hidden.shape[0], weight.shape[0], hidden.device
        has_ref = ref_hidden is not None
        rows = (targets != ignore_index).nonzero().squeeze(1)  # [Nv] the tokens that count
        Nv = rows.numel()
        zeros = lambda: torch.zeros(Nv, device=dev)
        lse, ent, kl, lse_q, logp = zeros(), zeros(), zeros(), zeros(), zeros()
        for n0 in range(0, Nv, cn):
            idx = rows[n0:n0 + cn]
            h, t = hidden.index_select(0, idx).float(), targets[idx]  # [n, H], [n]
            rh = ref_hidden.index_select(0, idx).float() if has_ref else None
            n = idx.numel()
            m = torch.full((n,), float("-inf"), device=dev)  # running max of z
            s, sz, zt = torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
            mq, sq, szy = m.clone(), s.clone(), s.clone()
            for v0 in range(0, V, cv):
                v1 = min(v0 + cv, V)
                z, _ = _tile(h, weight, bias, v0, v1, temperature)  # [n, cv]
                m_new = torch.maximum(m, z.amax(1))
                scale = torch.exp(m - m_new)  # rescales the sums kept relative to the old max
                e = (z - m_new[:, None]).exp_()  # [n, cv]
                s = s * scale + e.sum(1)
                if with_entropy:
                    sz = sz * scale + (e * z).sum(1)
                if has_ref:
                    y, _ = _tile(rh, ref_weight, ref_bias, v0, v1, temperature)  # [n, cv]
                    mq_new = torch.maximum(mq, y.amax(1))
                    sq = sq * torch.exp(mq - mq_new) + (y - mq_new[:, None]).exp_().sum(1)
                    mq = mq_new
                    szy = szy * scale + (e * (z - y)).sum(1)  # z - y directly: exact 0 for identical models
                j = t - v0
                hit = (j >= 0) & (j < v1 - v0)
                zt = torch.where(hit, z.gather(1, j.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), zt)
                m = m_new
            sl = slice(n0, n0 + n)
            lse[sl] = m + s.log()
            logp[sl] = zt - lse[sl]
            if with_entropy:
                ent[sl] = lse[sl] - sz / s
            if has_ref:
                lse_q[sl] = mq + sq.log()
                kl[sl] = (szy / s - lse[sl] + lse_q[sl]).clamp_min(0)
        ctx.save_for_backward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias,
                              rows, lse, ent, kl, lse_q)
        ctx.cfg = (temperature, cn, cv)
        out = lambda x: torch.zeros(N, device=dev).index_copy_(0, rows, x)
        return out(logp), (out(ent) if with_entropy else None), (out(kl) if has_ref else None)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_kl):
        hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, rows, lse, ent, kl, lse_q = ctx.saved_tensors
        temperature, cn, cv = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        V, dev = weight.shape[0], hidden.device
        # per-row upstream grads of the kept rows (ignored rows get none), / T because z = logits / T
        g_logp, g_ent, g_kl = [None if g is None else g.float()[rows] / temperature for g in (g_logp, g_ent, g_kl)]
        grad_h = torch.zeros(hidden.shape, device=dev) if need_h else None  # fp32 accumulators
        grad_w = torch.zeros(weight.shape, device=dev) if need_w else None
        grad_b = torch.zeros(V, device=dev) if need_b else None
        if all(g is None for g in (g_logp, g_ent, g_kl)) or not (need_h or need_w or need_b):
            return grad_h, grad_w, grad_b, *[None] * 9
        for n0 in range(0, rows.numel(), cn):
            idx = rows[n0:n0 + cn]
            sl = slice(n0, n0 + idx.numel())
            h, t = hidden.index_select(0, idx).float(), targets[idx]
            rh = ref_hidden.index_select(0, idx).float() if g_kl is not None else None
            gh = torch.zeros_like(h) if need_h else None  # [n, H]
            for v0 in range(0, V, cv):
                v1 = min(v0 + cv, V)
                z, w = _tile(h, weight, bias, v0, v1, temperature)
                logp = z.sub_(lse[sl, None])  # [n, cv], in place: z is not needed again
                # dL/dz = onehot * g_logp + p * ncoef, ncoef = -(sum of the chain-rule factors above);
                # with no entropy/KL term everything below is in place on the tile
                ncoef = 0.0 if g_logp is None else -g_logp[sl, None]
                if g_ent is not None:
                    ncoef = ncoef - g_ent[sl, None] * (logp + ent[sl, None])
                if g_kl is not None:
                    y, _ = _tile(rh, ref_weight, ref_bias, v0, v1, temperature)
                    logq = y.sub_(lse_q[sl, None])
                    ncoef = ncoef + g_kl[sl, None] * (logp - logq).sub_(kl[sl, None])
                g = logp.exp_().mul_(ncoef)  # [n, cv]
                if g_logp is not None:
                    j = t - v0
                    hit = ((j >= 0) & (j < v1 - v0)).nonzero().squeeze(1)
                    g.index_put_((hit, j[hit]), g_logp[sl][hit], accumulate=True)
                if need_h:
                    gh.addmm_(g, w)  # [n, cv] @ [cv, H]
                if need_w:
                    grad_w[v0:v1].addmm_(g.T, h)  # [cv, n] @ [n, H]
                if need_b:
                    grad_b[v0:v1] += g.sum(0)
            if need_h:
                grad_h.index_copy_(0, idx, gh)
        cast = lambda g, like: None if g is None else g.to(like.dtype)
        return cast(grad_h, hidden), cast(grad_w, weight), cast(grad_b, bias), *[None] * 9


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   ref_hidden=None, ref_weight=None, ref_bias=None, chunk_size=None, with_entropy=True):
    """Fused log p(target), entropy and KL(policy || reference) of softmax((hidden @ weight.T + bias) / T).

    hidden [..., H], weight [V, H], targets [...] (integer; ignore_index marks tokens to skip),
    bias [V] or None. ref_hidden [..., H_ref] / ref_weight [V, H_ref] / ref_bias: the reference model's
    final hidden states and unembedding; when given, kl is the exact KL over the whole vocabulary
    (reference logits use the same temperature). chunk_size: (chunk_N, chunk_V) tile (an int means
    both); memory grows with it. with_entropy=False skips the entropy (the SFT path).
    Returns (logprobs [...], entropy [...] or None, kl [...] or None), all float32; ignored tokens are 0.
    Gradients reach hidden, weight and bias only.
    """
    if use_triton(hidden):
        from minicai_kernels.logprobs import token_logprobs as triton_token_logprobs
        return triton_token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                     ref_bias=ref_bias, chunk_size=chunk_size, with_entropy=with_entropy)
    hidden2, targets2, ref_hidden2, lead = check_inputs(hidden, weight, targets, bias, temperature, ignore_index,
                                                        ref_hidden, ref_weight, ref_bias)
    cn, cv = _chunks(chunk_size, hidden.device)
    # detach: the reference is a constant, and autograd must not ask it for gradients
    ref = [None if x is None else x.detach() for x in (ref_hidden2, ref_weight, ref_bias)]
    outs = _TokenLogprobs.apply(hidden2, weight, bias, targets2, *ref, float(temperature), ignore_index,
                                bool(with_entropy), cn, cv)
    return tuple(None if o is None else o.view(lead) for o in outs)


class _FusedCrossEntropy(torch.autograd.Function):
    """loss = -sum_n c_n log p_n(t_n) with the gradients formed in the forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, rows, temperature, cn, need_h, need_w, need_b):
        V, dev = weight.shape[0], hidden.device
        w = weight.float()  # [V, H] (a view when fp32; one fp32 copy for bf16/fp16 weights)
        b = None if bias is None else bias.float()
        grad_h = torch.zeros(hidden.shape, device=dev) if need_h else None  # fp32 accumulators
        grad_w = torch.zeros(w.shape, device=dev) if need_w else None
        grad_b = torch.zeros(V, device=dev) if need_b else None
        loss = torch.zeros((), device=dev)
        inv_t = 1.0 / temperature
        buf = torch.empty(min(cn, rows.numel()), V, device=dev)  # one [n, V] block, reused: no page faults
        for n0 in range(0, rows.numel(), cn):
            idx = rows[n0:n0 + cn]
            h, t, c = hidden.index_select(0, idx).float(), targets[idx], coef[n0:n0 + cn]  # [n, H], [n], [n]
            ar = torch.arange(idx.numel(), device=dev)
            # z = (h W^T + b) / T, a whole-vocabulary row block: the softmax normaliser must be known
            # before p - onehot can be formed
            z = buf[:idx.numel()]  # [n, V]
            if b is None:
                torch.mm(h, w.T, out=z).mul_(inv_t)
            else:
                torch.addmm(b, h, w.T, beta=inv_t, alpha=inv_t, out=z)
            zt = z[ar, t]  # [n] target logits
            m = z.amax(1)  # [n]
            p = z.sub_(m[:, None]).exp_()  # [n, V] in place: e^{z - m}
            s = p.sum(1)
            loss -= (c * (zt - m - s.log())).sum()  # log p(t) = z_t - lse
            if not (need_h or need_w or need_b):
                continue
            # dL/dlogits = c / T * (p - onehot); built in place in the tile
            g = p.mul_((c * inv_t / s)[:, None])
            g[ar, t] -= c * inv_t
            if need_h:
                grad_h.index_copy_(0, idx, g @ w)  # [n, V] @ [V, H]
            if need_w:
                grad_w.addmm_(g.T, h)  # [V, n] @ [n, H]
            if need_b:
                grad_b += g.sum(0)
        # stored in the parameters' dtypes: accumulated in fp32 above, and half the memory for bf16
        ctx.save_for_backward(*[g.to(x.dtype) if g is not None else None
                                for g, x in ((grad_h, hidden), (grad_w, weight), (grad_b, bias))])
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        grads = [None if g is None else (g if bool(g_loss == 1) else g * g_loss.to(g.dtype))
                 for g in ctx.saved_tensors]  # d(a * loss) = a * d loss: only the scalar is new
        return *grads, *[None] * 8


def cross_entropy_loss(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0,
                       reduction="mean", weights=None, chunk_size=None):
    """SFT loss (next-token cross-entropy) without the [N, V] logits, gradients computed in the forward:

        mean:  L = -1/|M| sum_{n in M} w_n log softmax((W h_n + b) / T)_{t_n}     M = non-ignored tokens
        sum:   L = -sum_{n in M} w_n log softmax((W h_n + b) / T)_{t_n}

    hidden [..., H], weight [V, H], targets [...] integer (ignore_index = skip), bias [V] or None.
    weights [...] or None (= 1): per-token weights known now (the "weighted sum" case); they are
    constants (no gradient). chunk_size: rows per chunk (an int), or a (rows, vocab) pair as for
    token_logprobs, whose vocab part only the Triton backend uses; the twin always takes whole
    vocabulary rows. Returns a float32 scalar; 0 (not NaN) with zero gradients when every token is
    ignored. Under the triton backend this reduces token_logprobs from the Triton kernel instead
    (recompute in the backward). When grad mode is on and hidden/weight/bias require grad, their
    gradients are computed here even if backward is never called: a training-only path.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if weights is not None and tuple(weights.shape) != tuple(targets.shape):
        raise ValueError(f"weights shape {tuple(weights.shape)} must equal targets shape {tuple(targets.shape)}")
    keep_count = (targets != ignore_index).sum().clamp_min(1)
    if use_triton(hidden):
        logp, _, _ = token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                    temperature=temperature, chunk_size=chunk_size, with_entropy=False)
        nll = -(logp if weights is None else logp * weights.detach().float()).sum()
        return nll / keep_count if reduction == "mean" else nll
    hidden2, targets2, _, _ = check_inputs(hidden, weight, targets, bias, temperature, ignore_index,
                                           None, None, None)
    if chunk_size is None:
        # rows per chunk: a [n, V] fp32 block of about 32 MiB (170 rows at V = 49152), small next to the
        # gradients themselves; on a quiet 2-core CPU the time stays within a few % of larger blocks
        cn = max(1, min(4096, (8 << 20) // weight.shape[0]))
    else:
        cn = chunk_size if isinstance(chunk_size, int) else chunk_size[0]
        if int(cn) < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    rows = (targets2 != ignore_index).nonzero().squeeze(1)  # [Nv] the tokens that count
    coef = torch.ones(rows.numel(), device=hidden.device) if weights is None \
        else weights.detach().reshape(-1).float()[rows]  # [Nv]
    if reduction == "mean":
        coef = coef / keep_count
    on = torch.is_grad_enabled()
    need = [on and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    return _FusedCrossEntropy.apply(hidden2, weight, bias, targets2, coef, rows, float(temperature), int(cn), *need)
