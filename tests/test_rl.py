"""RL stage plumbing (minicai.rl, train/ppo.py, train/dpo.py) on tiny random models, CPU.

References are independent of the code under test: float64 log-softmax over full logits of each row run
alone (no padding), hand values (log 2 for DPO at step 0), hand-built masks and rewards.
"""
import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from minicai.losses import gae_advantages, kl_penalized_rewards
from minicai.model import ModelConfig, Transformer
from minicai.rl import ValueHead, collate, response_logprobs, score_sequences, select_rows
from minicai.sampling import generate
from minicai.tokenizer import load_tokenizer

def tiny(arch="llama", vocab=97, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, model_type=arch, vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=64,
                      max_position_embeddings=256, tie_word_embeddings=arch == "gpt2",
                      attention_bias=arch == "gpt2", mlp_bias=arch == "gpt2", eos_token_id=2, pad_token_id=2, **kw)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # larger than default init: peaky distributions, so mistakes show
            elif arch == "gpt2":
                p.normal_(0, 0.05)  # non-trivial biases and norm parameters
    return model.eval()


def naive_logprobs(model, prompt, response, temperature=1.0):
    """float64 log-softmax of the full logits of [prompt + response] run alone (no padding, no mask)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids)[0].double() / temperature                         # [T, V]
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]                 # [R, V] predicts response
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0], logp


@pytest.fixture(scope="module")
def tok(tiny_chat_model_dir):
    return load_tokenizer(tiny_chat_model_dir)  # conftest's byte-level ChatML tokenizer (eos == pad == 2)


# ----------------------------------------------------------------------------- log-probs and padding

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logprobs_independent_of_padding(arch):
    model = tiny(arch)
    g = torch.Generator().manual_seed(1)
    lens = [(3, 5), (9, 2), (6, 7), (1, 1)]
    prompts = [torch.randint(3, 97, (p,), generator=g).tolist() for p, _ in lens]
    responses = [torch.randint(3, 97, (r,), generator=g).tolist() for _, r in lens]
    T = 0.7
    with torch.no_grad():
        batched = response_logprobs(model, collate(prompts, responses, pad_id=2), temperature=T, with_entropy=True)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ref, full = naive_logprobs(model, p, r, temperature=T)
        with torch.no_grad():
            alone = response_logprobs(model, collate([p], [r], pad_id=2), temperature=T, with_entropy=True)
        assert torch.allclose(batched["logprobs"][i, :len(r)].double(), ref, atol=1e-5)
        assert torch.allclose(alone["logprobs"][0].double(), ref, atol=1e-5)
        assert (batched["logprobs"][i, :len(r)] - alone["logprobs"][0]).abs().max() <= 1e-5
        ent = -(full.exp() * full).sum(-1)
        assert torch.allclose(batched["entropy"][i, :len(r)].double(), ent, atol=1e-4)
        assert (batched["logprobs"][i, len(r):] == 0).all()  # padding reads 0


def test_collate_layout_and_select_rows():
    b = collate([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], pad_id=0)
    assert b["prompt_width"] == 3
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b["position_ids"][0, :5].tolist() == [0, 1, 2, 3, 4] and b["position_ids"][1, 2:].tolist() == [0, 1, 2, 3]
    assert b["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    sub = select_rows(b, [0])  # all-padding columns of that row cut off
    assert sub["input_ids"].tolist() == [[5, 6, 7, 9, 2]] and sub["response_mask"].tolist() == [[True, True]]
    assert sub["prompt_width"] == 3
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        collate([[1], []], [[2], [3]], pad_id=0)


def test_value_head_reads_state_before_each_token():
    model = tiny()
    head = ValueHead(32)
    with torch.no_grad():
        head.proj.weight.normal_()
        out = response_logprobs(model, collate([[4, 5, 6], [7]], [[8, 9], [10]], pad_id=2), value_head=head)
        h = model(torch.tensor([[4, 5, 6, 8, 9]]), return_hidden=True)[0]        # alone, unpadded
    assert torch.allclose(out["values"][0], (h[2:4] @ head.proj.weight[0] + head.proj.bias).float(), atol=1e-5)
    assert out["values"][1, 1] == 0  # padding


# ----------------------------------------------------------------------------- EOS, KL

def test_eos_carries_the_score_and_the_loss(tok, tmp_path):
    from train import dpo

    eos = tok.eos_token_id
    # a DPO completion ends with EOS (a loss-carrying target), nothing after it
    msgs = [{"role": "user", "content": "Hi"}]
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."}) + "\n")
    ids = dpo.load_pairs(data, tok)[0][0]["chosen"]
    assert ids[-1] == eos and ids.count(eos) == 1 and tok.decode(ids[:-1]) == "Hello there."
    b = collate([tok.apply_chat_template(msgs)] * 2, [ids, ids[:2]], pad_id=eos)
    m = b["response_mask"]
    assert m[0].sum() == len(ids) and b["input_ids"][0, b["prompt_width"] + len(ids) - 1] == eos  # EOS is a real token
    lp = torch.zeros(m.shape)
    rewards = kl_penalized_rewards(torch.tensor([1.5, -0.5]), lp, lp, m, kl_coef=0.1)
    assert rewards[0, len(ids) - 1] == 1.5 and rewards[0, :len(ids) - 1].abs().sum() == 0  # the score sits on EOS
    assert rewards[1, 1] == -0.5 and rewards[1, 2:].abs().sum() == 0
    # the reward model reads the last column of a left-padded prompt+response: the EOS
    seen = {}

    def rm(input_ids, attention_mask):
        seen["last"] = input_ids[:, -1].tolist()
        seen["mask"] = attention_mask[:, -1].tolist()
        return torch.zeros(input_ids.shape[0])
    score_sequences(rm, [[5, 6], [7]], [[9, eos], [8, 8, eos]], pad_id=0)
    assert seen == {"last": [eos, eos], "mask": [1, 1]}


def test_kl_to_itself_is_zero_and_k3_nonnegative_on_rollouts():
    policy = tiny(seed=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    gens = generate(policy, prompts, max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=[2])
    rows = [p for p in prompts]
    batch = collate(rows, [g.tokens for g in gens], pad_id=2)
    m = batch["response_mask"]
    with torch.no_grad():
        same = response_logprobs(policy, batch, ref_model=copy.deepcopy(policy))
    assert (same["kl"][m] == 0).all() and torch.equal(same["logprobs"], same["ref_logprobs"])
    # a different reference: the per-token k3 estimate on the sampled tokens is >= 0, k1 is not always
    ref = tiny(seed=1)
    with torch.no_grad():
        out = response_logprobs(policy, batch, ref_model=ref)
    d = out["ref_logprobs"].double() - out["logprobs"].double()
    k3 = torch.expm1(d) - d
    assert (k3[m] >= 0).all() and (out["kl"][m] >= 0).all()
    r = kl_penalized_rewards(torch.zeros(3), out["logprobs"], out["ref_logprobs"], m, kl_coef=1.0, estimator="k3")
    assert (r[m] <= 0).all()  # k3 penalty never rewards the policy
    # exact KL(pi || ref) against float64 over the vocabulary
    for i, (p, g) in enumerate(zip(rows, gens)):
        _, lp = naive_logprobs(policy, p, g.tokens)
        _, lq = naive_logprobs(ref, p, g.tokens)
        assert torch.allclose(out["kl"][i, :len(g.tokens)].double(), (lp.exp() * (lp - lq)).sum(-1), atol=1e-5)


def test_gae_with_zero_values_is_reward_to_go():
    # with gamma = lam = 1 and V = 0, A_t = sum of rewards from t on (hand value)
    r = torch.tensor([[0.0, -0.1, 2.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0]]).bool()
    adv, ret = gae_advantages(r, torch.zeros(1, 4), m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[1.9, 1.9, 2.0, 0.0]]))


# ----------------------------------------------------------------------------- scripts on a tiny model

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_chat_model_dir):
    """conftest's tiny chat model (vocab 265) and a prompt file."""
    d = tmp_path_factory.mktemp("rl")
    os.symlink(tiny_chat_model_dir, d / "model")
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hi", "Why?", "Cats", "Go"]))
    return d


def stub_reward(input_ids, attention_mask):
    """Deterministic stand-in for the reward model: share of even token ids."""
    return ((input_ids % 2 == 0) & attention_mask.bool()).float().sum(1) / attention_mask.sum(1)


def ppo_args(d, out, *extra):
    return ["--model", str(d / "model"), "--prompts", str(d / "prompts.jsonl"), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--minibatch-size", "1", "--ppo-epochs", "1", "--max-new-tokens", "3",
            "--lr", "1e-2", "--device", "cpu", "--sample-every", "0", "--save-every", "1", "--seed", "5", *extra]


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


TIMING = ("rollout_tok_s", "update_tok_s", "rollout_s", "update_s", "peak_mem_mb", "tok_s")


def same_logs(a, b):
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return strip(a) == strip(b)


@pytest.fixture(scope="module")
def ppo_runs(tiny_dir):
    from train import ppo

    gaps = []
    real = ppo.ppo_policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, **kw):  # max |log ratio| of every minibatch
        gaps.append(float(torch.where(mask, logprobs.detach() - old_logprobs, 0).abs().max()))
        return real(logprobs, old_logprobs, advantages, mask, **kw)

    ppo.ppo_policy_loss = recording
    try:
        full = ppo.main(ppo_args(tiny_dir, tiny_dir / "ppo_full"), reward_fn=stub_reward)
        ppo.ppo_policy_loss = real
        ppo.main(ppo_args(tiny_dir, tiny_dir / "ppo_cut", "--stop-after", "1"), reward_fn=stub_reward)
        resumed = ppo.main(ppo_args(tiny_dir, tiny_dir / "ppo_cut", "--resume"), reward_fn=stub_reward)
    finally:
        ppo.ppo_policy_loss = real
    return {"full": full, "resumed": resumed, "gaps": gaps}


@pytest.mark.slow
def test_ppo_ratio_is_one_on_first_minibatch(ppo_runs):
    gaps = ppo_runs["gaps"]  # 2 steps x 2 minibatches
    assert len(gaps) == 4
    assert gaps[0] == 0.0 and gaps[2] == 0.0   # first minibatch of each batch: exactly the old policy
    assert gaps[1] > 0 and gaps[3] > 0          # after an update it moves (lr is large on purpose)


@pytest.mark.slow
def test_ppo_step0_kl_is_zero_and_logs(ppo_runs):
    first = ppo_runs["full"][0]
    assert first["kl"] == 0.0 and first["kl_exact"] == 0.0 and first["kl_k3"] == 0.0
    for key in ("reward", "entropy", "clip_fraction", "approx_kl", "policy_loss", "value_loss",
                "explained_variance", "response_length", "rollout_tok_s", "update_tok_s", "peak_mem_mb"):
        assert key in first
    assert ppo_runs["full"][1]["kl"] != 0.0


@pytest.mark.slow
def test_ppo_resume_equals_uninterrupted(ppo_runs, tiny_dir):
    assert same_logs(ppo_runs["full"], ppo_runs["resumed"])
    a, b = weights(tiny_dir / "ppo_full" / "final"), weights(tiny_dir / "ppo_cut" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = load_file(tiny_dir / "ppo_full" / "state" / "weights.safetensors")
    vb = load_file(tiny_dir / "ppo_cut" / "state" / "weights.safetensors")
    assert torch.equal(va["value_head.proj.weight"], vb["value_head.proj.weight"])


def test_ppo_bad_prompts(tiny_dir, tmp_path):
    from train import ppo

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'prompt' or 'messages'"):
        ppo.read_ppo_prompts([bad], 0)
    nokind = tmp_path / "nokind.jsonl"
    nokind.write_text('{"prompt": "ok", "category": "harmful"}\n{"prompt": "no kind"}\n')
    with pytest.raises(ValueError, match=r"nokind.jsonl:2: --classifier-reward needs"):
        ppo.read_ppo_prompts([nokind], 1.0)
    assert [p["kind"] for p in ppo.read_ppo_prompts([nokind], 0)] == [None, None]  # kinds unread without it
    with pytest.raises(ValueError, match="--reward-model is required"):
        ppo.main(["--model", str(tiny_dir / "model"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- DPO

def write_prefs(path, n=6, extra=()):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer number {i}.",
             "rejected": [{"role": "assistant", "content": f"No {i}"}], "soft_label": 0.75} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + list(extra)))
    return path


def dpo_args(d, data, out, *extra):
    return ["--model", str(d / "model"), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--epochs", "1", "--eval-frac", "0.34", "--lr", "1e-2", "--device", "cpu", "--save-every", "1", *extra]


@pytest.mark.parametrize("flags,expected", [
    ([], math.log(2)),
    (["--label-smoothing", "0.2"], math.log(2)),
    (["--use-soft-labels"], math.log(2)),
    (["--loss", "ipo", "--beta", "0.5"], (1 / (2 * 0.5)) ** 2),   # (h - 1/(2 beta))^2 at h = 0
])
def test_dpo_step0_loss_when_policy_is_reference(tiny_dir, tmp_path, flags, expected):
    from train import dpo

    data = write_prefs(tmp_path / "p.jsonl")
    rows = dpo.main(dpo_args(tiny_dir, data, tmp_path / "o", "--stop-after", "1", *flags))
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_dpo_resume_equals_uninterrupted_and_eval(tiny_dir, tmp_path):
    from train import dpo

    data = write_prefs(tmp_path / "p.jsonl")
    full = dpo.main(dpo_args(tiny_dir, data, tmp_path / "full"))
    dpo.main(dpo_args(tiny_dir, data, tmp_path / "cut", "--stop-after", "1"))
    resumed = dpo.main(dpo_args(tiny_dir, data, tmp_path / "cut", "--resume"))
    assert len(full) == 2 and same_logs(full, resumed)
    a, b = weights(tmp_path / "full" / "final"), weights(tmp_path / "cut" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ev = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert ev["before"]["reward_margin"] == 0.0 and ev["before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ev["after"]["reward_margin"] != 0.0


def test_dpo_resume_on_other_pairs_is_refused(tiny_dir, tmp_path):
    """Same count, other text: the digest of the tokenised pairs tells them apart (a resume would train on a new
    split with the old optimizer state)."""
    from train import dpo

    dpo.main(dpo_args(tiny_dir, write_prefs(tmp_path / "p.jsonl"), tmp_path / "cut", "--stop-after", "1"))
    other = tmp_path / "q.jsonl"
    other.write_text((tmp_path / "p.jsonl").read_text().replace("Answer number", "Reply number"))
    with pytest.raises(ValueError, match="--resume needs the same data"):
        dpo.main(dpo_args(tiny_dir, other, tmp_path / "cut", "--resume"))


def test_dpo_lora_reference_is_the_base(tiny_dir, tmp_path):
    from train import dpo

    data = write_prefs(tmp_path / "p.jsonl")
    rows = dpo.main(dpo_args(tiny_dir, data, tmp_path / "o", "--lora-rank", "2", "--lr", "1e-1",
                             "--lora-targets", "q,v"))
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)   # B = 0 at start: policy == base
    assert rows[1]["reward_margin"] != 0.0                               # the adapter moved the policy
    merged = weights(tmp_path / "o" / "final")
    assert not any("lora" in k for k in merged)                          # saved merged, as a plain model


def test_dpo_bad_inputs(tiny_dir, tmp_path, tok):
    from train import dpo

    extra = [{"prompt": "Same?", "chosen": "yes", "rejected": " yes "},        # identical: skipped
             {"prompt": "Empty?", "chosen": "", "rejected": "no"},            # empty: skipped
             {"prompt": "Blank?", "chosen": "ok", "rejected": [{"role": "assistant", "content": "  "}]}]
    data = write_prefs(tmp_path / "p.jsonl", n=3, extra=extra)
    pairs, counts = dpo.load_pairs(data, tok)
    assert len(pairs) == 3 and counts["identical"] == 1 and counts["empty"] == 2
    assert pairs[0]["chosen"][-1] == tok.eos_token_id                    # completions end with (and train) EOS

    missing = tmp_path / "m.jsonl"
    missing.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: missing field\(s\) \['rejected'\]"):
        dpo.load_pairs(missing, tok)
    badsoft = tmp_path / "s.jsonl"
    badsoft.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "soft_label": 1.5}\n')
    with pytest.raises(ValueError, match=r"s.jsonl:1: field 'soft_label'"):
        dpo.load_pairs(badsoft, tok, soft_labels=True)
    badc = tmp_path / "c.jsonl"
    badc.write_text('{"prompt": "a", "chosen": {"x": 1}, "rejected": "c"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'chosen'"):
        dpo.load_pairs(badc, tok)
    only_bad = tmp_path / "e.jsonl"
    only_bad.write_text(json.dumps(extra[0]) + "\n")
    with pytest.raises(ValueError, match="no usable preference pairs"):
        dpo.main(dpo_args(tiny_dir, only_bad, tmp_path / "o"))
