"""minicai.sampling: KV-cache decoding vs full forwards, left padding, truncation, log-probs, seeds, bad input,
and greedy parity with transformers' generate on the default model (the oracle).

References are independent of the code under test: full (cache-free) forwards, prompts decoded one at a time,
a float64 re-implementation of temperature/top-k/top-p/min-p written here, and transformers."""
import json
import math

import pytest
import torch

from minicai.model import KVCache, ModelConfig, Transformer
from minicai.prepack import can_prepack, prepacked_weights
from minicai.sampling import generate, process_logits, sample


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = ModelConfig(arch="gpt2", model_type="gpt2", vocab_size=101, hidden_size=64, n_layers=2, n_heads=4,
                          n_kv_heads=4, head_dim=16, intermediate_size=256, max_position_embeddings=64,
                          attention_bias=True, mlp_bias=True, tie_word_embeddings=True, eos_token_id=-1)
    else:
        cfg = ModelConfig(arch="llama", vocab_size=101, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=16, intermediate_size=128, max_position_embeddings=64, rope_theta=10000.0,
                          eos_token_id=-1)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        model.output_weight.mul_(4.0)
    return model


def full_logits(model, prompt, tokens):
    """Cache-free forward over prompt + tokens -> the logits that predicted each token [len(tokens), V]."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids)[0].double()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


def reference_logprobs(z, temperature, top_k, top_p, min_p):
    """float64, written independently: temperature, then top-k, top-p, min-p, each on the renormalised result."""
    z = z.double()
    if temperature == 0:
        out = torch.full_like(z, -math.inf)
        out[z.argmax()] = 0.0
        return out
    p = torch.softmax(z / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        order = sorted(range(len(p)), key=lambda i: -p[i].item())
        keep[:] = False
        keep[order[:top_k]] = True
    p = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum()
    if top_p < 1:
        order = sorted(range(len(p)), key=lambda i: -p[i].item())
        new, mass = torch.zeros_like(keep), 0.0
        for i in order:
            if mass >= top_p or p[i] == 0:
                break
            new[i] = True
            mass += p[i].item()
        keep &= new
        p = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum()
    if min_p > 0:
        keep &= p >= min_p * p.max()
        p = torch.where(keep, p, 0) / torch.where(keep, p, 0).sum()
    return torch.where(keep, p.log(), -math.inf)


PROMPTS = [[5, 17, 33], [9, 2, 44, 71, 8, 60, 13], [29], [3, 90, 41, 7, 66]]


# ------------------------------------------------------------------------------------------ cache == full forward

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_logits_match_full_forward(arch):
    model = tiny_model(arch)
    prompt, steps = PROMPTS[1], 12
    cache = KVCache(model.config, 1, len(prompt) + steps)
    seq = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), kv_cache=cache)[0, -1]
        for _ in range(steps):
            full = model(torch.tensor([seq]))[0, -1]
            assert (logits - full).abs().max().item() <= 1e-4
            seq.append(int(full.argmax()))
            logits = model(torch.tensor([[seq[-1]]]), kv_cache=cache)[0, -1]
    # generate's greedy tokens are the argmax of a full forward at every step, and raw_logprobs its log-softmax
    g = generate(model, [prompt], max_new_tokens=steps)[0]
    ref = full_logits(model, prompt, g.tokens)
    assert g.tokens == seq[len(prompt):]
    assert g.tokens == ref.argmax(-1).tolist() and g.finish_reason == "length"
    ref_lp = torch.log_softmax(ref, -1)[range(steps), g.tokens]
    assert torch.allclose(torch.tensor(g.raw_logprobs, dtype=torch.float64), ref_lp, atol=1e-4)
    assert g.logprobs == g.raw_logprobs  # greedy: documented choice


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prepacked_weights_match_plain_linear_and_are_dropped_on_exit(arch):
    model = tiny_model(arch, seed=2)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    with torch.no_grad():
        ref = model(ids)                                             # F.linear on the plain weights
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    attns = [b.attn for b in model.blocks]
    with torch.no_grad(), prepacked_weights(model):
        if can_prepack(model.output_weight):  # CPU with oneDNN: the packed path really runs
            # q/k/v (and SwiGLU's gate/up) are packed as one matrix each; every other linear on its own
            fused = {id(lin) for a in attns for lin in (a.q, a.k, a.v)}
            fused |= {id(lin) for b in model.blocks if arch == "llama" for lin in (b.mlp.gate, b.mlp.up)}
            fused |= {id(getattr(model, "lm_head", None))}  # an untied head is packed once, as the unembedding
            assert all("project" in vars(a) for a in attns) and "unembed" in vars(model)
            assert all(("gate_up" in vars(b.mlp)) == (arch == "llama") for b in model.blocks)
            assert all(("forward" in vars(m)) == (id(m) not in fused) for m in linears)
        out = model(ids)
    assert (out - ref).abs().max().item() <= 1e-4  # summation order only (logits here reach ~230)
    shadows = ("project", "gate_up", "forward", "unembed")
    assert not any(n in vars(m) for m in model.modules() for n in shadows)  # dropped on exit
    with prepacked_weights(model):                                   # with grad on, the plain weights serve
        model(ids).square().mean().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears)


def test_prepacked_generation_with_lora_matches_unpacked():
    """A LoRA-wrapped q keeps its attention unfused (its base weight packed alone, the adapter added on top)."""
    from minicai.lora import apply_lora

    model = tiny_model("llama", seed=6)
    apply_lora(model, targets=("q",), rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                                      # a non-zero update
    kw = dict(max_new_tokens=8, stop_token_ids=[], temperature=0.0)
    plain = generate(model, PROMPTS, prepack=False, **kw)
    packed = generate(model, PROMPTS, **kw)
    for a, b in zip(plain, packed):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.raw_logprobs, b.raw_logprobs)) <= 1e-4


def test_without_working_onednn_prepacking_is_a_no_op(monkeypatch):
    import minicai.prepack
    model = tiny_model("llama", seed=4)
    ref = generate(model, [PROMPTS[0]], max_new_tokens=6, prepack=False)[0].tokens
    monkeypatch.setattr(minicai.prepack, "packed_linear_works", lambda dtype: False)
    with prepacked_weights(model):
        assert not any(n in vars(m) for m in model.modules() for n in ("project", "gate_up", "forward", "unembed"))
    assert generate(model, [PROMPTS[0]], max_new_tokens=6)[0].tokens == ref


def test_kv_cache_keep_rows_moves_the_kept_rows_to_the_front():
    cfg = tiny_model("llama").config
    cache = KVCache(cfg, 4, 6)
    cache.k[:] = torch.arange(4.0)[None, :, None, None, None]       # row b holds the value b everywhere
    cache.v[:] = -torch.arange(4.0)[None, :, None, None, None]
    cache.length = 5
    cache.keep_rows(torch.tensor([1, 3]))
    assert cache.k.shape[1] == cache.v.shape[1] == 2
    assert (cache.k[:, 0, :, :5] == 1).all() and (cache.k[:, 1, :, :5] == 3).all()
    assert (cache.v[:, 0, :, :5] == -1).all() and (cache.v[:, 1, :, :5] == -3).all()
    with pytest.raises(ValueError, match="ascending"):
        cache.keep_rows(torch.tensor([1, 0]))


def test_generate_sees_weight_updates_between_calls():
    """Packed copies live for one generate call only, so a training step between calls is never stale."""
    model = tiny_model("llama", seed=3)
    before = generate(model, [PROMPTS[1]], max_new_tokens=8, stop_token_ids=[])[0].tokens
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = generate(model, [PROMPTS[1]], max_new_tokens=8, stop_token_ids=[])[0].tokens
    assert after == full_logits(model, PROMPTS[1], after).argmax(-1).tolist()
    assert after != before  # the update changed the greedy continuation: the new weights were used


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_matches_each_prompt_alone(arch):
    model = tiny_model(arch, seed=1)
    alone = [generate(model, [p], max_new_tokens=10, stop_token_ids=[])[0] for p in PROMPTS]
    # stop on a token one row produces early, so rows finish at different steps and the batch shrinks
    stop = alone[0].tokens[3]
    alone = [generate(model, [p], max_new_tokens=10, stop_token_ids=[stop])[0] for p in PROMPTS]
    batch = generate(model, PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    assert len({len(g.tokens) for g in alone}) > 1  # the rows really finish at different steps
    for a, b in zip(alone, batch):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        assert b.finish_reason == ("stop_token" if b.tokens[-1] == stop else "length")
        assert max(abs(x - y) for x, y in zip(a.raw_logprobs, b.raw_logprobs)) <= 1e-4


def test_streamer_holds_back_partial_characters():
    from minicai.chat import Streamer

    class Tok:
        def decode(self, ids):
            return {(1,): "a", (1, 2): "a\ufffd", (1, 2, 3): "a\u00e9"}[tuple(ids)]

    import io

    buf = io.StringIO()
    s = Streamer(Tok(), stop_ids=[9], out=buf)
    for t in (1, 2, 3, 9):
        s(0, t)
    assert buf.getvalue() == "a\u00e9"


def test_num_samples_order_and_callback():
    model = tiny_model("llama")
    seen = []
    out = generate(model, PROMPTS[:2], max_new_tokens=5, num_samples=2, callback=lambda r, t: seen.append((r, t)))
    assert len(out) == 4
    for i, p in enumerate(PROMPTS[:2]):
        ref = generate(model, [p], max_new_tokens=5)[0].tokens
        assert out[2 * i].tokens == ref and out[2 * i + 1].tokens == ref
    for r in range(4):
        assert [t for rr, t in seen if rr == r] == out[r].tokens


# ------------------------------------------------------------------------------------------ truncation

SETTINGS = [
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=0.6, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.2),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
]


@pytest.mark.parametrize("s", SETTINGS)
def test_process_logits_matches_reference_and_never_samples_outside(s):
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2.5                                  # [B, V]
    logp = process_logits(logits, **s)
    assert logp.dtype == torch.float32
    for b in range(3):
        ref = reference_logprobs(logits[b], **s)
        assert torch.equal(torch.isfinite(logp[b]), torch.isfinite(ref))
        fin = torch.isfinite(ref)
        assert torch.allclose(logp[b][fin].double(), ref[fin], atol=1e-5)
    # many draws: never outside the allowed set, frequencies close to the probabilities
    n = 4000
    for b in range(3):
        draws = sample(logp[b].expand(n, -1).contiguous())                # [n] one draw per copy of row b
        counts = torch.bincount(draws, minlength=40).float()
        assert counts[~torch.isfinite(logp[b])].sum() == 0
        assert (counts / n - logp[b].exp()).abs().max() < 0.04
    # the per-row generator path: reproducible, and also inside the allowed set
    draws = [sample(logp, [torch.Generator().manual_seed(b) for b in range(3)]) for _ in range(2)]
    assert torch.equal(draws[0], draws[1]) and torch.isfinite(logp[range(3), draws[0]]).all()


def test_top_p_keeps_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 (hand-computed sets)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(process_logits(logits, 1.0, 0, p, 0.0))[0].tolist()
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.55) == [True, True, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]
    assert kept(1.0) == [True, True, True, True]
    kept_min_p = lambda m: torch.isfinite(process_logits(logits, 1.0, 0, 1.0, m))[0].tolist()
    assert kept_min_p(0.61) == [True, False, False, False]   # keep p >= 0.305
    assert kept_min_p(0.31) == [True, True, False, False]    # keep p >= 0.155
    assert kept_min_p(0.29) == [True, True, True, False]     # keep p >= 0.145
    assert torch.isfinite(process_logits(logits, 1.0, 2, 1.0, 0.0))[0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("s", SETTINGS[:4])
def test_logprobs_match_full_forward_recomputation(s):
    model = tiny_model("llama", seed=2)
    out = generate(model, PROMPTS, max_new_tokens=8, num_samples=3, seed=7, stop_token_ids=[], **s)
    for i, g in enumerate(out):
        prompt = PROMPTS[i // 3]
        z = full_logits(model, prompt, g.tokens)                         # [T, V] float64
        for t, tok in enumerate(g.tokens):
            ref = reference_logprobs(z[t], **s)
            assert math.isfinite(ref[tok])                                 # sampled inside the allowed set
            assert abs(g.logprobs[t] - ref[tok].item()) <= 1e-4
            assert abs(g.raw_logprobs[t] - torch.log_softmax(z[t], -1)[tok].item()) <= 1e-4


# ------------------------------------------------------------------------------------------ seeds

def test_same_seed_same_output_and_rows_independent_of_batch():
    model = tiny_model("llama", seed=3)
    kw = dict(max_new_tokens=12, temperature=1.0, stop_token_ids=[])
    a = generate(model, PROMPTS, seed=11, **kw)
    b = generate(model, PROMPTS, seed=11, **kw)
    c = generate(model, PROMPTS, seed=12, **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert generate(model, PROMPTS[:1], seed=11, **kw)[0].tokens == a[0].tokens
    torch.manual_seed(5)
    d = generate(model, PROMPTS, **kw)
    torch.manual_seed(5)
    assert [g.tokens for g in generate(model, PROMPTS, **kw)] == [g.tokens for g in d]


# ------------------------------------------------------------------------------------------ stops and text

class LetterTokenizer:
    """A stand-in tokenizer: token i is one letter; EOS is id 0 and decodes to '#'."""
    eos_token_id = 0

    def decode(self, ids):
        return "".join("#" if i == 0 else chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_text():
    model = tiny_model("llama", seed=4)
    tok = LetterTokenizer()
    free = generate(model, [PROMPTS[1]], max_new_tokens=12, stop_token_ids=[], tokenizer=tok)[0]
    assert free.text == tok.decode(free.tokens) and free.finish_reason == "length"
    stop = tok.decode(free.tokens[4:6])
    k = next(k for k in range(1, 13) if stop in tok.decode(free.tokens[:k]))  # first step containing it
    g = generate(model, [PROMPTS[1]], max_new_tokens=12, stop_token_ids=[], stop_strings=[stop], tokenizer=tok)[0]
    assert g.finish_reason == "stop_string" and g.tokens == free.tokens[:k]
    assert g.text == tok.decode(free.tokens[:k]).split(stop)[0]
    # a stop token ends the row, stays in tokens, is left out of text
    s = generate(model, [PROMPTS[1]], max_new_tokens=12, stop_token_ids=[free.tokens[2]], tokenizer=tok)[0]
    first = free.tokens.index(free.tokens[2])
    assert s.finish_reason == "stop_token" and s.tokens == free.tokens[:first + 1]
    assert s.text == tok.decode(free.tokens[:first])


def test_stop_when_stops_each_row_at_its_first_true_prefix():
    model = tiny_model("llama", seed=4)
    tok = LetterTokenizer()
    kw = dict(max_new_tokens=12, stop_token_ids=[], tokenizer=tok, temperature=1.0, seed=3, num_samples=3)
    free = generate(model, [PROMPTS[1]], **kw)
    pred = lambda text: len(text) >= 5  # noqa: E731  (letters: one character per token)
    stopped = generate(model, [PROMPTS[1]], stop_when=pred, **kw)
    for f, g in zip(free, stopped):
        k = next(k for k in range(1, 13) if pred(tok.decode(f.tokens[:k])))
        assert g.tokens == f.tokens[:k] and g.finish_reason == "stop_when" and g.text == tok.decode(f.tokens[:k])
    with pytest.raises(ValueError, match="stop_when"):
        generate(model, [PROMPTS[1]], max_new_tokens=4, stop_when=pred)  # no tokenizer to decode with


def test_default_stop_token_is_tokenizer_eos():
    model = tiny_model("llama", seed=4)
    free = generate(model, [PROMPTS[1]], max_new_tokens=12, stop_token_ids=[])[0]
    tok = LetterTokenizer()
    tok.eos_token_id = free.tokens[3]
    g = generate(model, [PROMPTS[1]], max_new_tokens=12, tokenizer=tok)[0]
    assert g.finish_reason == "stop_token" and g.tokens == free.tokens[:free.tokens.index(free.tokens[3]) + 1]


# ------------------------------------------------------------------------------------------ bad input

BAD = [
    dict(prompts=[]),
    dict(prompts=[[]]),
    dict(prompts=[[1, 2], []]),
    dict(prompts=[[1] * 64]),                     # as long as the context
    dict(prompts=[[1] * 60], max_new_tokens=5),   # prompt + new tokens > context
    dict(max_new_tokens=0),
    dict(max_new_tokens=-3),
    dict(temperature=-0.1),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_k=-1),
    dict(min_p=-0.1),
    dict(min_p=1.1),
    dict(prompts=[[1, 101]]),                     # outside the vocabulary
    dict(prompts=[[-1, 3]]),
    dict(prompts=[[1.0, 3]]),
    dict(prompts=[1, 2, 3]),
    dict(stop_token_ids=[500]),
    dict(stop_strings=["x"]),                     # no tokenizer
    dict(num_samples=0),
]


@pytest.mark.parametrize("kw", BAD, ids=[json.dumps(k)[:40] for k in BAD])
def test_bad_input_raises(kw):
    model = tiny_model("llama")
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError):
        generate(model, args.pop("prompts"), **args)


# ------------------------------------------------------------------------------------------ default model

@pytest.fixture(scope="module")
def default_model():
    from minicai.pretrained import load_pretrained, resolve_path

    try:
        path = resolve_path("default")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model unavailable: {e}")
    model, tok = load_pretrained(path)
    return path, model, tok


CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me three tips for sleeping well."]


@pytest.mark.slow
def test_greedy_matches_transformers_on_default_model(default_model):
    transformers = pytest.importorskip("transformers")
    path, model, tok = default_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    ours = generate(model, prompts, max_new_tokens=64, tokenizer=tok)     # one left-padded batch
    for p, g in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=64, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert g.tokens == ref
        assert g.finish_reason == ("stop_token" if ref[-1] == tok.eos_token_id else "length")


@pytest.mark.slow
def test_cli_generate_resumes(default_model, tmp_path):
    from minicai.cli import main

    path = default_model[0]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "Say hi."}\n{"id": "m", "messages": [{"role": "user", "content": "2+2?"}]}\n')
    args = ["generate", "--model", path, "--prompts", str(src), "--out", str(out), "--max-new-tokens", "3"]
    assert main(args) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in first] == [None, "m"] and all(r["n_tokens"] <= 3 for r in first)
    assert all(r["finish_reason"] in ("stop_token", "length") and isinstance(r["response"], str) for r in first)
    with open(src, "a") as f:
        f.write('{"prompt": "Name a color."}\n')
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[:2] == first and len(rows) == 3 and rows[2]["prompt"] == "Name a color."
    src.write_text('{"text": "no prompt"}\n')
    assert main(args[:6] + [str(tmp_path / "other.jsonl")]) == 2        # bad row: a clear error, exit code 2


# ------------------------------------------------------------------------------------------ bucketing, dropping rows

def test_prefill_groups_minimise_padding_plus_forwards():
    from minicai.sampling import PREFILL_FORWARD_COST as F, prefill_groups

    assert prefill_groups([5, 5, 5]) == [(0, 3)]                      # no padding: one forward
    assert prefill_groups([400, 10, 9]) == [(0, 1), (1, 3)]           # 780 pad tokens >> one more forward
    # hand-computed: [40, 40-d]: one group costs F + 80, two cost 2F + 80 - d; split iff d > F
    assert prefill_groups([40, 40 - F]) == [(0, 2)]
    assert prefill_groups([40 + F + 1, 40]) == [(0, 1), (1, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_batch_with_dropped_rows_matches_each_prompt_alone(dtype, seed, monkeypatch):
    """Mixed prompt lengths (several prefill groups), sampling, rows stopping at different steps (dropped,
    and the cache's leading padding cut when the long prompts finish): every row's tokens and log-probs are
    those of the prompt generated alone with that row's generator."""
    import minicai.sampling as S

    model = tiny_model("llama", seed=5).to(dtype)
    prompts = [list(range(1, 41)), [7], [3, 9, 27], list(range(50, 62)), [11, 12], list(range(60, 99))]
    assert len(S.prefill_groups(sorted(map(len, prompts), reverse=True))) > 1
    kw = dict(max_new_tokens=14, temperature=1.0, top_p=0.9, stop_token_ids=list(range(0, 101, 9)), seed=seed)
    batch = generate(model, prompts, **kw)
    real_generators = S.row_generators
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for i, p in enumerate(prompts):
        monkeypatch.setattr(S, "row_generators", lambda s, n, device: real_generators(s, i + 1, device)[i:])
        alone = generate(model, [p], **kw)[0]
        assert alone.tokens == batch[i].tokens and alone.finish_reason == batch[i].finish_reason
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batch[i].logprobs)) <= tol
        assert max(abs(a - b) for a, b in zip(alone.raw_logprobs, batch[i].raw_logprobs)) <= tol
    assert len({len(g.tokens) for g in batch}) > 1                     # rows really left the batch early


def test_leading_padding_is_cut_when_the_long_prompts_finish(monkeypatch):
    import minicai.sampling as S

    model = tiny_model("llama", seed=5).to(torch.float64)
    long_prompt, short = list(range(1, 41)), [[7], [3, 9, 27]]
    first = generate(model, [long_prompt], max_new_tokens=1)[0].tokens[0]  # greedy: the long row stops at once
    widths, step = [], S.decode_step
    monkeypatch.setattr(S, "decode_step", lambda m, t, p, mask, cache: widths.append(cache.max_len) or step(m, t, p, mask, cache))
    out = generate(model, [long_prompt] + short, max_new_tokens=6, stop_token_ids=[first])
    assert out[0].tokens == [first] and widths and max(widths) < 40   # the 40-token prompt's columns are gone
    for p, g in zip(short, out[1:]):
        assert generate(model, [p], max_new_tokens=6, stop_token_ids=[first])[0].tokens == g.tokens


def test_top_p_on_a_large_vocabulary_sorts_candidates_or_everything():
    """V = 3000 > NUCLEUS_CANDIDATES: a peaked row (nucleus inside the candidates) and a flat one (fallback to
    the full sort) both keep exactly the float64 reference's set."""
    from minicai.sampling import NUCLEUS_CANDIDATES

    torch.manual_seed(3)
    logits = torch.stack([torch.randn(3000) * 6, torch.randn(3000) * 0.1])  # [2, V] peaked, flat
    for rows in (logits[:1], logits):                                   # candidates suffice / fallback needed
        logp = process_logits(rows, 0.8, 0, 0.9, 0.0)
        for b in range(rows.shape[0]):
            ref = reference_logprobs(rows[b], 0.8, 0, 0.9, 0.0)
            assert torch.equal(torch.isfinite(logp[b]), torch.isfinite(ref))
    assert torch.isfinite(process_logits(logits[1:], 0.8, 0, 0.9, 0.0)).sum() > NUCLEUS_CANDIDATES


def test_repeated_prompts_are_prefilled_once_with_each_rows_cache():
    """num_samples copies of a prompt (best-of-n) share one prefill: the model sees each distinct prompt once,
    and every copy's cache and last logits equal that prompt's own prefill."""
    from minicai.sampling import prefill

    model = tiny_model("llama", seed=3)
    long_p, short_p = [5, 9, 2, 7, 1, 3], [4, 8, 6]
    rows = [long_p, long_p, long_p, short_p, short_p]
    seen = []
    hook = model.register_forward_hook(lambda m, args, kw, out: seen.append(args[0].shape[0]), with_kwargs=True)
    cache, logits = prefill(model, rows, 4, "cpu", torch.float32)
    hook.remove()
    assert sum(seen) == 2                                   # one row per distinct prompt went through the model
    L = len(long_p)
    for j, r in enumerate(rows):
        alone, alone_logits = prefill(model, [r], 4, "cpu", torch.float32)
        torch.testing.assert_close(logits[j], alone_logits[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.k[:, j, :, L - len(r):L], alone.k[:, 0, :, :len(r)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, j, :, L - len(r):L], alone.v[:, 0, :, :len(r)], atol=1e-5, rtol=1e-5)
