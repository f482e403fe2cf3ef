"""The SFT/DPO speed paths (issue #17): right-padded mask-free forwards, length bucketing, bf16 autocast.

Oracles: each sequence alone, unpadded, with full logits in float64 (per-example losses and gradients by
autograd); the bucketed order is checked against its definition (a permutation of the plain order's windows,
sorted); autocast against the dtypes and autocast state of every vocabulary-wide product, recorded by a
TorchFunctionMode spy. The model is a tiny random Llama in float64 (the fused log-prob path computes in fp32,
hence tolerances of ~1e-5)."""
from functools import partial

import pytest
import torch
from torch.overrides import TorchFunctionMode

from minicai import training
from minicai.model import ModelConfig, Transformer
from minicai.sft_data import IGNORE
from train import dpo, sft

V = 61


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread in this module


def tiny_model(dtype=torch.float64):
    cfg = ModelConfig(vocab_size=V, hidden_size=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                      intermediate_size=32, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.to(dtype).train()


def examples(lengths, prompt_len=3):
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        ids = torch.randint(3, V, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt_len + ids[prompt_len:]})
    return out


def alone_logprob_sums(model, exs):
    """Per example, alone and unpadded: sum of float64 log p(label) over its labelled tokens."""
    sums = []
    for e in exs:
        ids = torch.tensor([e["input_ids"]])
        logp = model(ids).double().log_softmax(-1)[0, :-1]                  # [n-1, V] full logits
        t = torch.tensor(e["labels"][1:])
        keep = t != IGNORE
        sums.append(logp[keep].gather(1, t[keep, None]).sum())
    return torch.stack(sums)


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a, b):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- padding-free paths

def test_sft_bucketed_micro_batches_give_the_unpadded_loss_and_gradients():
    model = tiny_model()
    exs = examples([5, 17, 9, 30, 12, 6])
    n_tokens = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in exs)
    ref_loss = -alone_logprob_sums(model, exs).sum() / n_tokens
    ref_grads = grads(model, ref_loss)
    plain = [[0, 3], [1, 4], [2, 5]]                                          # long rows padded to 30
    bucketed = [[3, 1], [4, 2], [5, 0]]                                       # sort_in_windows' grouping
    assert training.sort_in_windows([0, 3, 1, 4, 2, 5], [len(e["input_ids"]) for e in exs], 6) == [3, 1, 4, 2, 5, 0]
    for groups in (plain, bucketed):
        losses = [sft.batch_loss(model, sft.collate([exs[i] for i in g], pad_id=0), n_tokens) for g in groups]
        loss = torch.stack(losses).sum()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        assert_grads_close(grads(model, loss), ref_grads)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_one_forward_for_chosen_and_rejected_matches_each_sequence_alone(loss_type):
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(3, V, (n,), generator=g).tolist()
    pairs = [{"prompt": rand(p), "chosen": rand(c), "rejected": rand(r), "soft_label": 1.0}
             for p, c, r in [(4, 3, 11), (9, 7, 2), (2, 5, 5)]]
    args = dpo.parser.parse_args(["--data", "-", "--loss", loss_type, "--device", "cpu", "--autocast", "off"])
    c, r, c_tok, c_mask = dpo.pair_logprobs(model, pairs, 0, args)
    seqs = [{"input_ids": p["prompt"] + p[k], "labels": [IGNORE] * len(p["prompt"]) + p[k]}
            for k in ("chosen", "rejected") for p in pairs]
    ref = alone_logprob_sums(model, seqs)
    if loss_type == "ipo":                                                    # IPO: mean over completion tokens
        ref = ref / torch.tensor([len(p[k]) for k in ("chosen", "rejected") for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(torch.cat([c, r]).double(), ref, rtol=1e-5, atol=1e-5)
    assert c_mask.sum(1).tolist() == [len(p["chosen"]) for p in pairs]
    torch.testing.assert_close(c_tok.sum(1).double(), alone_logprob_sums(model, seqs[:3]), rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5, -0.25, 0.75], dtype=torch.float64)
    assert_grads_close(grads(model, (torch.cat([c, r]).double() * weights).sum()), grads(model, (ref * weights).sum()))


def test_dpo_gradient_checkpointing_same_gradients():
    model = tiny_model()
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11, 12, 13], "soft_label": 1.0}]
    args = dpo.parser.parse_args(["--data", "-", "--device", "cpu", "--autocast", "off"])
    loss = lambda: sum(x.sum() for x in dpo.pair_logprobs(model, pairs, 0, args)[:2])
    plain = grads(model, loss())
    model.gradient_checkpointing = True
    assert_grads_close(grads(model, loss()), plain)


# ----------------------------------------------------------------------------- bucketing and resume

def test_bucketed_order_is_sorted_windows_of_the_plain_order_and_resumes_exactly():
    lengths = [3, 40, 7, 7, 22, 9, 31, 5, 18, 2, 27]
    take = lambda gen, k: [next(gen) for _ in range(k)]
    start = {"epoch": 0, "batch": 0}
    plain = take(training.micro_batches(11, 2, 5, start), 6)
    bucketed = take(training.micro_batches(11, 2, 5, start, lengths=lengths, window=2), 18)
    order = [i for idx, _ in plain for i in idx]
    flat = [i for idx, _ in bucketed[:6] for i in idx]
    for w0 in range(0, 11, 4):                                                # windows of 2 batches x 2
        assert sorted(flat[w0:w0 + 4]) == sorted(order[w0:w0 + 4])
        assert [lengths[i] for i in flat[w0:w0 + 4]] == sorted((lengths[i] for i in order[w0:w0 + 4]), reverse=True)
    for k in (1, 5, 6, 11):                                                   # resume mid-epoch and at its end
        assert take(training.micro_batches(11, 2, 5, bucketed[k - 1][1], lengths=lengths, window=2), 18 - k) \
            == bucketed[k:]
    lengths12 = lengths + [12]                                                # sorted neighbours: least padding
    whole_epoch = take(training.micro_batches(12, 2, 5, start, lengths=lengths12, window=6), 6)
    plain12 = take(training.micro_batches(12, 2, 5, start), 6)
    pad = lambda batches: sum(max(lengths12[i] for i in b) - min(lengths12[i] for i in b) for b, _ in batches)
    assert pad(whole_epoch) < pad(plain12)
    rows = [dpo.batch_rows(11, 2, 5, s, 6, lengths, 2) for s in range(12)]   # DPO: a function of seed + step
    assert rows == [dpo.batch_rows(11, 2, 5, s, 6, lengths, 2) for s in range(12)]
    assert sorted(i for r in rows[:6] for i in r) == list(range(11))


# ----------------------------------------------------------------------------- autocast

class VocabProducts(TorchFunctionMode):
    """Records (output dtype, autocast on?) of every op whose output ends in the vocabulary dimension, and
    the dtypes of the other matmul-like outputs."""

    def __init__(self):
        super().__init__()
        self.vocab, self.other = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and out.is_floating_point() and name in ("mm", "addmm", "matmul", "__matmul__", "linear"):
            rec = (out.dtype, torch.is_autocast_enabled("cpu"))
            (self.vocab if out.shape[-1] == V else self.other).append(rec)
        return out


def test_autocast_runs_the_forward_in_bf16_and_the_loss_math_in_fp32():
    model = tiny_model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    bf16 = partial(training.autocast, "bf16", "cpu")
    with VocabProducts() as spy:
        out = sft.sft_step(model, opt, [examples([8, 12])], 0, autocast=bf16)
        loss = sft.batch_loss(model, sft.collate(examples([8, 12]), 0), 10, bf16)
    assert loss.dtype == torch.float32 and out["loss"] > 0
    assert spy.vocab and all(rec == (torch.float32, False) for rec in spy.vocab)   # logits: fp32, autocast off
    assert (torch.bfloat16, True) in spy.other                                      # the body ran in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())               # fp32 master weights

    args = dpo.parser.parse_args(["--data", "-", "--device", "cpu", "--autocast", "bf16"])
    pairs = [{"prompt": [5, 6, 7], "chosen": [8, 9], "rejected": [10, 11, 12, 13], "soft_label": 1.0}]
    with VocabProducts() as spy:
        c, r, _, _ = dpo.pair_logprobs(model, pairs, 0, args)
        (c - r).sum().backward()                                                    # recomputes the tiles
    assert c.dtype == r.dtype == torch.float32
    assert spy.vocab and all(rec == (torch.float32, False) for rec in spy.vocab)
    assert (torch.bfloat16, True) in spy.other


@pytest.mark.parametrize("native,mode,on", [(True, "auto", True), (False, "auto", False), (False, "bf16", True),
                                            (True, "off", False)])
def test_autocast_auto_follows_native_bf16(monkeypatch, native, mode, on):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native)
    with torch.autocast("cpu", dtype=torch.bfloat16):                             # "off" also ends an outer one
        with training.autocast(mode, "cpu"):
            assert torch.is_autocast_enabled("cpu") == on
    with pytest.raises(ValueError, match="--autocast"):
        training.autocast("fp8", "cpu")
