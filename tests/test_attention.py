"""Attention: the Triton kernel (under the CPU interpreter) and its PyTorch twin vs a float64 naive reference.

The reference builds the full score matrix with explicit masks, repeats k/v heads for GQA and maps
rows with no visible key to zeros; it shares no code with minicai.attention or kernels/attention.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any triton import: kernels run on the CPU interpreter

import math

import pytest
import torch

import minicai.attention as A
from minicai import backend


def naive_attention(q, k, v, causal, key_padding_mask=None, scale=None):
    """float64 softmax(scale q k^T + mask) v; rows with every key masked give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)                                     # [B, H, Tq, Tk]
    ok = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:  # query i sits at key position Tk - Tq + i
        ok = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    ok = ok[None, None]
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[:, None, None, :]
    empty = ~ok.any(-1, keepdim=True)                  # rows with no visible key
    s = s.masked_fill(~ok, float("-inf")).masked_fill(empty, 0.0)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = (p / p.sum(-1, keepdim=True)).masked_fill(empty, 0.0)
    return p @ v


def left_pad_mask(B, Tk, pads):
    m = torch.ones(B, Tk, dtype=torch.bool)
    for b, n in enumerate(pads):
        m[b, :n] = False
    return m


def check(fn, B, Hq, Hkv, Tq, Tk, D, causal, mask=None, scale=None, dtype=torch.float32, tol=1e-4):
    """Compare output and dq/dk/dv of `fn` with the float64 reference; errors relative to the max."""
    q = torch.randn(B, Hq, Tq, D).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Tk, D).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Tk, D).to(dtype).requires_grad_()
    do = torch.randn(B, Hq, Tq, D).to(dtype)
    ref = naive_attention(q, k, v, causal, mask, scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do.double())
    out = fn(q, k, v, causal=causal, key_padding_mask=mask, scale=scale)
    assert out.shape == (B, Hq, Tq, D) and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), do)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), f"{name}: max abs err {err:.2e}"
    return out, grads


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    previous = backend.get_backend()
    backend.set_backend("triton")
    yield
    backend.set_backend(previous)


@pytest.fixture(params=["twin", "triton"])
def impl(request):
    """Run a test once on the PyTorch twin and once on the Triton kernel (interpreter)."""
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    return request.param


# ------------------------------------------------------------------------------- both implementations

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [1, 17, 63])
def test_square(impl, causal, heads, T):
    check(A.attention, 2, *heads, T, T, 16 if T < 63 else 32, causal)


@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_decode_with_kv_cache(impl, Tq, heads):
    """Tq < Tk: the queries are the last Tq positions, causal is bottom-right aligned."""
    check(A.attention, 2, *heads, Tq, 20, 16, causal=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq", [3, 33])
def test_left_padding(impl, causal, Tq):
    Tk = 33
    check(A.attention, 3, 4, 2, Tq, Tk, 16, causal, mask=left_pad_mask(3, Tk, [0, 5, 20]))


def test_padding_with_holes(impl):
    """The mask is applied per key, not only as a contiguous range."""
    mask = torch.rand(2, 40) > 0.4
    mask[:, -1] = True
    check(A.attention, 2, 2, 1, 40, 40, 16, causal=False, mask=mask)


def test_fully_masked_rows_give_zeros(impl):
    """Left-pad queries under causal + padding see no key: zero output, finite (zero) gradients."""
    mask = left_pad_mask(3, 21, [0, 18, 21])  # row 2 is padding only
    out, (dq, dk, dv) = check(A.attention, 3, 2, 2, 21, 21, 16, causal=True, mask=mask)
    assert out[1, :, :18].abs().max() == 0 and out[2].abs().max() == 0
    assert dq[1, :, :18].abs().max() == 0 and dq[2].abs().max() == 0
    assert dk[2].abs().max() == 0 and dv[2].abs().max() == 0
    assert dk[1, :, :18].abs().max() == 0 and dv[1, :, :18].abs().max() == 0  # padding keys get no gradient


def test_more_queries_than_keys(impl):
    """Causal with Tq > Tk: the first Tq - Tk queries sit before key 0 and return zeros."""
    out, _ = check(A.attention, 1, 2, 2, 20, 7, 16, causal=True)
    assert out[:, :, :13].abs().max() == 0


def test_head_dim_64_and_scale(impl):
    check(A.attention, 1, 2, 1, 40, 40, 64, causal=True, scale=0.3, mask=left_pad_mask(1, 40, [9]))


def test_fp16(impl):
    check(A.attention, 2, 4, 2, 17, 17, 32, causal=True, mask=left_pad_mask(2, 17, [0, 4]),
          dtype=torch.float16, tol=1e-2)


def test_bad_input(impl):
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple"):
        A.attention(q, k, k)
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        A.attention(q, q, q[:, :, :2])


# ------------------------------------------------------------------------------------------ twin only

def test_twin_fast_paths_match_masked_path():
    """The is_causal / no-mask shortcuts agree with the explicit-mask path (an all-True padding mask)."""
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    full = torch.ones(2, 9, dtype=torch.bool)
    for qq in (q, q[:, :, -1:]):  # square causal and single-query decode
        fast = A.attention(qq, k, v, causal=True)
        masked = A.attention(qq, k, v, causal=True, key_padding_mask=full)
        torch.testing.assert_close(fast, masked)


def test_twin_long_left_padded_prefill_takes_the_per_row_path(monkeypatch):
    """Square causal with left padding and T >= 128 runs one causal SDPA per row; a fully padded row -> zeros."""
    real, calls = A.per_row_causal, []
    monkeypatch.setattr(A, "per_row_causal", lambda *a: calls.append(1) or real(*a))
    out, (dq, dk, _) = check(A.attention, 3, 4, 2, 130, 130, 16, causal=True, mask=left_pad_mask(3, 130, [0, 9, 130]))
    assert calls and out[2].abs().max() == 0 and dq[2].abs().max() == 0 and dk[1, :, :9].abs().max() == 0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_twin_cpu_decode_path_with_padding_and_an_empty_row(dtype, tol):
    """One low-precision query per row on CPU takes decode_attention: left padding, GQA, a row with no real
    key -> zeros."""
    mask = left_pad_mask(3, 25, [0, 7, 25])
    out, (dq, _, _) = check(A.attention, 3, 6, 2, 1, 25, 64, causal=True, mask=mask, dtype=dtype, tol=tol)
    assert out[2].abs().max() == 0 and dq[2].abs().max() == 0


# ---------------------------------------------------------------------------------------- triton only

def test_backend_dispatch_runs_the_kernel(triton_backend, monkeypatch):
    import minicai_kernels.attention as K
    calls = []
    real = K._FlashAttention.apply
    monkeypatch.setattr(K._FlashAttention, "apply", lambda *a: calls.append(1) or real(*a))
    A.attention(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    assert calls == [1]


def test_triton_rejects_unsupported_head_dim(triton_backend):
    x = torch.randn(1, 1, 4, 24)
    with pytest.raises(ValueError, match="head dim"):
        A.attention(x, x, x)


def test_triton_backward_is_deterministic(triton_backend):
    q, k, v = (torch.randn(1, 4, 33, 16, requires_grad=True) for _ in range(3))
    k1, v1 = k[:, :1].detach().requires_grad_(), v[:, :1].detach().requires_grad_()
    runs = [torch.autograd.grad(A.attention(q, k1, v1).square().sum(), (q, k1, v1)) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_larger_shape(triton_backend):
    """Several full blocks in both directions at D=128 with GQA and padding."""
    check(A.attention, 2, 4, 2, 50, 70, 128, causal=True, mask=left_pad_mask(2, 70, [0, 37]))
