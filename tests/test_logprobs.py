import os

os.environ["TRITON_INTERPRET"] = "1"  # Triton kernels run on the CPU interpreter; must precede any triton import

import math

import pytest
import torch

from minicai import backend
from minicai.logprobs import cross_entropy_loss, token_logprobs
from minicai.losses import kl_k1, kl_k2, kl_k3


def naive(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
          ref_hidden=None, ref_weight=None, ref_bias=None):
    """float64 reference: full logits -> log_softmax -> gather / entropy / KL."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logq_all = None
    if ref_hidden is not None:
        y = ref_hidden.double() @ ref_weight.double().T
        if ref_bias is not None:
            y = y + ref_bias.double()
        logq_all = torch.log_softmax(y / temperature, -1)
    logp_all = torch.log_softmax(z / temperature, -1)
    keep = targets != ignore_index
    logp = logp_all.gather(-1, targets.clamp(0, weight.shape[0] - 1)[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    zero = torch.zeros_like(logp)
    kl = None if logq_all is None else torch.where(keep, (logp_all.exp() * (logp_all - logq_all)).sum(-1), zero)
    return torch.where(keep, logp, zero), torch.where(keep, ent, zero), kl


def _triton_fn():
    pytest.importorskip("triton")
    from minicai_kernels.logprobs import token_logprobs as fn
    return fn


# twin: odd shapes and a chunk that divides neither N nor V; interpreter: smaller (it is slow)
IMPLS = {"twin": dict(N=37, V=1271, H=24, chunk=(16, 300)), "triton": dict(N=13, V=211, H=32, chunk=(16, 64))}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    fn = token_logprobs if request.param == "twin" else _triton_fn()
    return fn, IMPLS[request.param]


def _inputs(N, V, H, ref=True, scale=0.3):
    g = lambda *s: torch.randn(*s, dtype=torch.float64)
    d = dict(hidden=g(N, H), weight=g(V, H) * scale, bias=g(V))
    if ref:
        d.update(ref_hidden=g(N, H + 3), ref_weight=g(V, H + 3) * scale, ref_bias=g(V))  # own hidden size
    return d


def _close(a, b, scale=1.0):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=2e-5 * scale)


def test_values_and_gradients(impl):
    fn, s = impl
    d = _inputs(s["N"], s["V"], s["H"])
    targets = torch.randint(0, s["V"], (s["N"],))
    targets[[0, 5, s["N"] - 1]] = -100
    targets[1] = s["V"] - 1  # the last (tail) column
    ours = {k: v.float().requires_grad_() for k, v in d.items()}
    ref = {k: v.clone().requires_grad_(k in ("hidden", "weight", "bias")) for k, v in d.items()}
    out = fn(ours["hidden"], ours["weight"], targets, bias=ours["bias"], temperature=0.7,
             ref_hidden=ours["ref_hidden"], ref_weight=ours["ref_weight"], ref_bias=ours["ref_bias"],
             chunk_size=s["chunk"])
    exp = naive(ref["hidden"], ref["weight"], targets, ref["bias"], 0.7,
                ref_hidden=ref["ref_hidden"], ref_weight=ref["ref_weight"], ref_bias=ref["ref_bias"])
    for o, e in zip(out, exp):
        assert o.dtype == torch.float32 and o.shape == (s["N"],)
        _close(o, e)
    assert (out[0][[0, 5, s["N"] - 1]] == 0).all() and (out[1][[0, 5]] == 0).all() and (out[2][[0, 5]] == 0).all()
    up = [torch.randn(s["N"], dtype=torch.float64) for _ in range(3)]  # arbitrary upstream gradients
    sum((o.double() * u).sum() for o, u in zip(out, up)).backward()
    sum((e * u).sum() for e, u in zip(exp, up)).backward()
    for k in ("hidden", "weight", "bias"):
        _close(ours[k].grad, ref[k].grad, scale=ref[k].grad.abs().max().item())
    assert (ours["hidden"].grad[[0, 5, s["N"] - 1]] == 0).all()  # ignored tokens: no gradient
    assert all(ours[k].grad is None for k in ("ref_hidden", "ref_weight", "ref_bias"))  # reference is constant


def test_logprob_only_path(impl):
    fn, s = impl
    d = _inputs(s["N"], s["V"], s["H"], ref=False)
    targets = torch.randint(0, s["V"], (s["N"],))
    h, w = d["hidden"].float().requires_grad_(), d["weight"].float().requires_grad_()
    logp, ent, kl = fn(h, w, targets, chunk_size=s["chunk"], with_entropy=False)
    assert ent is None and kl is None
    hd, wd = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    exp = naive(hd, wd, targets)[0]
    _close(logp, exp)
    logp.sum().backward()
    exp.sum().backward()
    _close(h.grad, hd.grad, hd.grad.abs().max().item())
    _close(w.grad, wd.grad, wd.grad.abs().max().item())


def test_kl_self_is_zero_and_kl_never_negative(impl):
    fn, s = impl
    d = _inputs(s["N"], s["V"], s["H"], ref=False, scale=1.0)  # peaked softmax
    h, w = d["hidden"].float().requires_grad_(), d["weight"].float()
    targets = torch.randint(0, s["V"], (s["N"],))
    _, _, kl = fn(h, w, targets, ref_hidden=h, ref_weight=w, chunk_size=s["chunk"])
    assert kl.abs().max() <= 1e-6
    kl.sum().backward()
    assert h.grad.abs().max() <= 1e-5  # KL(p || p) is a minimum: zero gradient
    rh, rw = torch.randn_like(h), w + 0.01 * torch.randn_like(w)  # a far and a nearby reference
    assert fn(h, w, targets, ref_hidden=rh, ref_weight=w, chunk_size=s["chunk"])[2].min() >= -1e-6
    assert fn(h, w, targets, ref_hidden=h, ref_weight=rw, chunk_size=s["chunk"])[2].min() >= -1e-6


def test_uniform_distribution(impl):
    fn, s = impl
    N, V, H = s["N"], s["V"], s["H"]
    logp, ent, _ = fn(torch.randn(N, H), torch.zeros(V, H), torch.randint(0, V, (N,)), chunk_size=s["chunk"])
    torch.testing.assert_close(ent, torch.full((N,), math.log(V)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logp, torch.full((N,), -math.log(V)), rtol=1e-6, atol=1e-5)


def test_leading_dims_and_errors(impl):
    fn, s = impl
    V, H = s["V"], s["H"]
    h, w = torch.randn(2, 3, H), torch.randn(V, H) * 0.3
    t = torch.randint(0, V, (2, 3))
    logp, ent, _ = fn(h, w, t)
    assert logp.shape == (2, 3) and ent.shape == (2, 3)
    _close(logp, naive(h.reshape(6, H), w, t.reshape(6))[0].view(2, 3))
    with pytest.raises(ValueError, match="targets"):
        fn(h, w, torch.full((2, 3), V))  # out of range and not ignore_index
    with pytest.raises(ValueError, match="targets shape"):
        fn(h, w, t.reshape(6))
    with pytest.raises(ValueError, match="weight"):
        fn(h, torch.randn(V, H + 1), t)
    with pytest.raises(ValueError, match="temperature"):
        fn(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="ref_hidden"):
        fn(h, w, t, ref_hidden=h)


def test_twin_bf16_inputs():
    N, V, H = 9, 300, 16
    h = torch.randn(N, H).bfloat16().requires_grad_()
    w = (torch.randn(V, H) * 0.3).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,))
    logp, ent, _ = token_logprobs(h, w, t, chunk_size=(4, 64))
    assert logp.dtype == ent.dtype == torch.float32
    exp = naive(h.detach(), w.detach(), t)  # float64 of the same bf16 values: only fp32 rounding differs
    _close(logp, exp[0])
    _close(ent, exp[1])
    logp.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def naive_ce(hidden, weight, targets, bias=None, temperature=1.0, reduction="mean", weights=None, ignore_index=-100):
    """float64 reference for cross_entropy_loss: full logits, log_softmax, weighted masked sum."""
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logp = torch.log_softmax(z / temperature, -1)
    keep = targets != ignore_index
    lp = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    w = keep.double() * (1.0 if weights is None else weights.double())
    nll = -(w * lp).sum()
    return nll / keep.sum().clamp_min(1) if reduction == "mean" else nll


def _ce_case(N, V, H, upstream, **kw):
    d = _inputs(N, V, H, ref=False)
    t = torch.randint(0, V, (N,))
    t[[0, 3, N - 1]] = -100
    t[1] = V - 1
    h, w, b = (d[k].float().requires_grad_() for k in ("hidden", "weight", "bias"))
    hd, wd, bd = (d[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    loss = cross_entropy_loss(h, w, t, bias=b, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    exp = naive_ce(hd, wd, t, bd, **ref_kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _close(loss, exp, scale=abs(exp.item()))
    (loss * upstream).backward()  # the stored gradients must be scaled by the upstream gradient
    (exp * upstream).backward()
    for a, e in ((h, hd), (w, wd), (b, bd)):
        _close(a.grad, e.grad, e.grad.abs().max().item())
    assert (h.grad[[0, 3, N - 1]] == 0).all()  # ignored tokens: no gradient


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cross_entropy_loss(reduction, temperature):
    # odd N and V; 8-row chunks divide neither N nor the kept rows
    _ce_case(37, 1271, 24, upstream=1.0, reduction=reduction, temperature=temperature, chunk_size=8)
    _ce_case(37, 1271, 24, upstream=-2.5, reduction=reduction, temperature=temperature, chunk_size=(16, 300))


def test_cross_entropy_loss_weights_and_default_chunks():
    N, V = 29, 503
    w_tok = torch.rand(N, dtype=torch.float64)
    _ce_case(N, V, 16, upstream=0.3, reduction="sum", weights=w_tok)  # chunk_size=None: one block
    _ce_case(N, V, 16, upstream=1.0, reduction="mean", weights=w_tok.float(), chunk_size=5)


def test_cross_entropy_loss_all_ignored_and_no_grad():
    N, V, H = 11, 97, 8
    h, w, b = torch.randn(N, H).requires_grad_(), torch.randn(V, H).requires_grad_(), torch.randn(V).requires_grad_()
    for reduction in ("mean", "sum"):
        h.grad = w.grad = b.grad = None
        loss = cross_entropy_loss(h, w, torch.full((N,), -100), bias=b, reduction=reduction)
        assert loss.item() == 0.0  # 0, not NaN
        loss.backward()
        assert all(x.grad is not None and (x.grad == 0).all() for x in (h, w, b))
    t = torch.randint(0, V, (N,))
    exp = naive_ce(h.detach(), w.detach(), t, b.detach())
    with torch.no_grad():  # loss only: no gradient work, no graph
        loss = cross_entropy_loss(h, w, t, bias=b)
    assert loss.grad_fn is None
    _close(loss, exp)
    loss = cross_entropy_loss(h.detach(), w.detach(), t, bias=b.detach())  # nothing requires grad
    assert loss.grad_fn is None
    _close(loss, exp)
    hh = h.detach().requires_grad_()  # only hidden requires grad: only its gradient
    cross_entropy_loss(hh, w.detach(), t).backward()
    hd = h.detach().double().requires_grad_()
    naive_ce(hd, w.detach(), t).backward()
    _close(hh.grad, hd.grad, hd.grad.abs().max().item())


def test_cross_entropy_loss_leading_dims_bf16_and_errors():
    B, T, V, H = 2, 5, 300, 16
    h = torch.randn(B, T, H).bfloat16().requires_grad_()
    w = (torch.randn(V, H) * 0.3).bfloat16().requires_grad_()
    t = torch.randint(0, V, (B, T))
    t[0, :2] = -100
    loss = cross_entropy_loss(h, w, t, chunk_size=3)
    hd, wd = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exp = naive_ce(hd, wd, t)  # float64 of the same bf16 values
    _close(loss, exp)
    loss.backward()
    exp.backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16 and h.grad.shape == (B, T, H)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=2e-2, atol=2e-2 * hd.grad.abs().max().item())
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_loss(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="weights shape"):
        cross_entropy_loss(h, w, t, weights=torch.ones(B * T))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_loss(h, w, torch.full((B, T), V))


def test_cross_entropy_loss_triton_backend():
    pytest.importorskip("triton")
    N, V, H = 13, 211, 32
    d = _inputs(N, V, H, ref=False)
    t = torch.randint(0, V, (N,))
    t[2] = -100
    h, w = d["hidden"].float().requires_grad_(), d["weight"].float().requires_grad_()
    before = backend.get_backend()
    backend.set_backend("triton")
    try:
        loss = cross_entropy_loss(h, w, t, temperature=0.7, reduction="sum", chunk_size=(16, 64))
    finally:
        backend.set_backend(before)
    hd, wd = d["hidden"].clone().requires_grad_(), d["weight"].clone().requires_grad_()
    exp = naive_ce(hd, wd, t, temperature=0.7, reduction="sum")
    _close(loss, exp, scale=abs(exp.item()))
    loss.backward()
    exp.backward()
    _close(w.grad, wd.grad, wd.grad.abs().max().item())


def test_kl_estimators_hand_values():
    logp, ref_logp = torch.tensor([math.log(0.5), math.log(0.2)]), torch.tensor([math.log(0.25), math.log(0.4)])
    # token 1: p=.5, q=.25 -> log p/q = log 2, r = 0.5; token 2: p=.2, q=.4 -> log p/q = -log 2, r = 2
    l2 = math.log(2)
    torch.testing.assert_close(kl_k1(logp, ref_logp), torch.tensor([l2, -l2]))
    torch.testing.assert_close(kl_k2(logp, ref_logp), torch.tensor([0.5 * l2 ** 2, 0.5 * l2 ** 2]))
    torch.testing.assert_close(kl_k3(logp, ref_logp), torch.tensor([0.5 - 1 + l2, 2 - 1 - l2]))


def test_kl_estimators_expectation_and_sign():
    p = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(50, dtype=torch.float64), 0)
    kl = (p * (p.log() - q.log())).sum()
    # k1 and k3 are unbiased: their exact expectation under x ~ p is KL(p || q); k2 is not
    torch.testing.assert_close((p * kl_k1(p.log(), q.log())).sum(), kl)
    torch.testing.assert_close((p * kl_k3(p.log(), q.log())).sum(), kl)
    a, b = torch.randn(10000) * 3, torch.randn(10000) * 3
    assert kl_k3(a, b).min() >= 0 and kl_k2(a, b).min() >= 0


def test_backend_dispatch(monkeypatch):
    pytest.importorskip("triton")
    import minicai_kernels.logprobs as K
    calls = []
    real = K.token_logprobs
    monkeypatch.setattr(K, "token_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, w, t = torch.randn(5, 16), torch.randn(40, 16), torch.randint(0, 40, (5,))
    before = backend.get_backend()
    backend.set_backend("triton")
    try:
        logp = token_logprobs(h, w, t)[0]
    finally:
        backend.set_backend(before)
    assert calls == [1]
    _close(logp, naive(h, w, t)[0])
