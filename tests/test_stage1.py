"""Stage 1 (SL-CAI): SFT data and loss masking, the SFT trainer (resume, NaN guard, bad data), LoRA, and
critique_revise's provenance and resumability. Tiny random models over a tiny ChatML byte tokenizer
(tests/conftest.py); the oracles are transformers' chat templating, float64 log-softmax over full logits,
and hand-written LoRA algebra."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from minicai.constitution import load_constitution
from minicai.lora import LoRALinear, apply_lora, lora_disabled, merge_lora
from minicai.pretrained import load_model, load_pretrained
from minicai.sft_data import IGNORE, build_examples, collate, encode_example, read_sft_rows
from minicai.tokenizer import load_tokenizer
from minicai import training

import train.critique_revise as cr
import train.sft as sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2  # <|im_end|> in the tiny tokenizer: also its pad token


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls: thread hand-offs cost far more than the work on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tiny_chat_model_dir):
    return load_tokenizer(tiny_chat_model_dir)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def sft_rows(n=10):
    return [{"id": str(i), "messages": [{"role": "user", "content": f"question number {i}?"}],
             "final": "the answer is " + "yes " * (i % 4 + 1), "final_finish_reason": "stop_token"} for i in range(n)]


# ----------------------------------------------------------------------------- data and loss masking

def test_encode_example_matches_transformers_chat_template(tiny_chat_model_dir, tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_chat_model_dir, "tokenizer.json"))
    with open(os.path.join(tiny_chat_model_dir, "tokenizer_config.json")) as f:
        hf.chat_template = json.load(f)["chat_template"]
    messages = [{"role": "user", "content": "Tell me the weather in the hills."},
                {"role": "assistant", "content": "I cannot see outside."},
                {"role": "user", "content": "Then the news, please."}]
    response = "Here is the news: nothing happened."
    ids, labels = encode_example(tok, messages, response)
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = hf.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=True,
                                  return_dict=False)
    # the template closes the turn with "<|im_end|>\n"; the training target ends at <|im_end|>
    assert ids == full[:-1] and full[-2] == EOS
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)                  # prompt tokens carry no loss
    assert labels[len(prompt):] == ids[len(prompt):] and labels[-1] == EOS  # response + EOS do


def test_collate_masks_padding_by_position_not_eos_id(tok):
    a = encode_example(tok, [{"role": "user", "content": "hi"}], "ok")
    b = encode_example(tok, [{"role": "user", "content": "a longer question here"}], "a longer answer")
    batch = collate([{"input_ids": x, "labels": y} for x, y in (a, b)], pad_id=tok.pad_token_id)
    assert tok.pad_token_id == tok.eos_token_id == EOS
    n = len(a[0])
    assert batch["input_ids"].shape == (2, len(b[0]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(b[0]) - n)
    assert batch["labels"][0, n - 1].item() == EOS                         # the real EOS keeps its label
    assert (batch["labels"][0, n:] == IGNORE).all()                        # the pad EOS ids carry none
    assert (batch["input_ids"][0, n:] == EOS).all()


def test_truncated_final_gets_no_eos(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "final": "cut off mid", "final_finish_reason": "length"}])
    (row,) = read_sft_rows(path)
    ids, labels = encode_example(tok, row["messages"], row["response"], row["add_eos"])
    assert labels[-1] != EOS and ids[-len(tok.encode("cut off mid")):] == tok.encode("cut off mid")


def test_batch_loss_is_masked_mean_of_float64_reference(tiny_chat_model_dir, tok):
    model = load_model(tiny_chat_model_dir).train()
    pairs = [("what is two plus two?", "four"), ("name a colour", "the colour blue, or red")]
    exs = [dict(zip(("input_ids", "labels"), encode_example(tok, [{"role": "user", "content": q}], r))) for q, r in pairs]
    batch = collate(exs, pad_id=EOS)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    loss = sft.batch_loss(model, batch, n_tokens)
    # reference: full logits in float64; loss positions from the prompt lengths, not from the labels
    with torch.no_grad():
        logp = model(batch["input_ids"], attention_mask=batch["attention_mask"]).double().log_softmax(-1)
    terms = []
    for i, (q, r) in enumerate(pairs):
        p_len = len(tok.apply_chat_template([{"role": "user", "content": q}]))
        target = tok.encode(r) + [EOS]
        for k, t in enumerate(target):
            terms.append(-logp[i, p_len + k - 1, t])
    assert n_tokens == len(terms)
    assert abs(loss.item() - torch.stack(terms).mean().item()) < 1e-5
    loss.backward()
    assert model.embed.weight.grad is not None and torch.isfinite(model.embed.weight.grad).all()


def test_bad_sft_data_names_file_and_line(tmp_path, tok):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q", "response": "r"}, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: malformed JSON"):
        read_sft_rows(bad_json)
    missing = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "response": "r"}, {"prompt": "q"}])
    with pytest.raises(ValueError, match=r"b\.jsonl:2: missing field"):
        read_sft_rows(missing)
    no_prompt = write_jsonl(tmp_path / "c.jsonl", [{"response": "r"}])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: .*'prompt' or 'messages'"):
        read_sft_rows(no_prompt)
    wrong_type = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "final": 3}])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: field 'final' must be a string"):
        read_sft_rows(wrong_type)
    bad_turns = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "assistant", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}])
    with pytest.raises(ValueError, match=r"e\.jsonl:1: "):
        read_sft_rows(bad_turns)
    # empty and over-long rows are skipped and counted, not errors; messages ending in assistant is a pair
    ok = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "q", "response": "   "}, {"prompt": "q", "response": "x " * 400},
                                            {"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "fine"}]}])
    examples, skipped = build_examples(tok, read_sft_rows(ok), max_len=200)
    assert skipped == {"empty": 1, "too_long": 1} and len(examples) == 1
    assert examples[0]["where"].endswith("f.jsonl:3")


# ----------------------------------------------------------------------------- training plumbing

def test_lr_schedule_hand_values():
    kw = dict(lr=1.0, warmup=4, total=14, min_ratio=0.1)
    assert [training.lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert training.lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)       # halfway down the cosine
    assert training.lr_at(14, **kw) == pytest.approx(0.1) and training.lr_at(99, **kw) == pytest.approx(0.1)


def test_optimizer_decay_groups_and_state_roundtrip(tmp_path, tiny_chat_model_dir):
    model = load_model(tiny_chat_model_dir).train()
    opt = training.make_optimizer(model, 1e-3, weight_decay=0.1)
    assert all(p.dim() >= 2 for p in opt.param_groups[0]["params"]) and opt.param_groups[0]["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in opt.param_groups[1]["params"]) and opt.param_groups[1]["weight_decay"] == 0.0
    ids = torch.randint(0, 265, (2, 9))
    model(ids).sum().backward()
    opt.step()
    training.save_resume_state(tmp_path / "st", model, opt, 1, {"epoch": 0, "batch": 3})
    assert not any(f.endswith((".pt", ".bin", ".pkl")) for f in os.listdir(tmp_path / "st"))
    expect = torch.rand(3)
    model2 = load_model(tiny_chat_model_dir).train()
    opt2 = training.make_optimizer(model2, 1e-3, weight_decay=0.1)
    meta = training.load_resume_state(tmp_path / "st", model2, opt2)
    assert meta["step"] == 1 and meta["data_position"] == {"epoch": 0, "batch": 3}
    assert torch.equal(torch.rand(3), expect)                              # torch RNG restored
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[q][k]), (n, k)


def test_check_finite_names_step():
    training.check_finite(3, loss=1.0)
    with pytest.raises(FloatingPointError, match="step 7: loss is nan"):
        training.check_finite(7, loss=float("nan"))


# ----------------------------------------------------------------------------- SFT trainer

def sft_argv(model_dir, data, out, *extra):
    return ["--model", model_dir, "--data", data, "--out", str(out), "--max-steps", "6", "--batch-size", "2",
            "--grad-accum", "2", "--save-every", "2", "--lr", "3e-3", "--warmup-ratio", "0.34", "--quiet", *extra]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_resume_reproduces_uninterrupted_run(tmp_path, tiny_chat_model_dir, monkeypatch, lora):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(7))  # 7 rows / batch 2: epochs end mid-step
    extra = ["--lora-rank", "4", "--lora-targets", "q,v,up"] if lora else []
    full = sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "a", *extra))
    assert [r["step"] for r in full] == list(range(1, 7))
    assert full[-1]["loss"] < full[0]["loss"]

    # die after step 5 is logged: the last saved state is step 4, so step 5 must be redone
    real_append = training.append_jsonl  # the step loop's log writer

    def dying_append(path, row):
        real_append(path, row)
        if row["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "append_jsonl", dying_append)
    with pytest.raises(KeyboardInterrupt):
        sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "b", *extra))
    monkeypatch.setattr(training, "append_jsonl", real_append)
    assert not os.path.exists(tmp_path / "b")
    resumed = sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "b", *extra, "--resume"))

    assert [(r["step"], r["loss"], r["grad_norm"]) for r in resumed] == [(r["step"], r["loss"], r["grad_norm"]) for r in full]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the merged checkpoint is a plain model that loads back, with its log and plot
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "a"))
    with open(tmp_path / "b" / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "b" / "train_log.jsonl") as f:
        assert [json.loads(x)["step"] for x in f] == list(range(1, 7))
    base = load_file(os.path.join(tiny_chat_model_dir, "model.safetensors"))
    changed = {k for k in wa if not torch.equal(wa[k], base[k])}
    if lora:  # only adapted layers move
        assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "up_proj.weight")) for k in changed)
    load_pretrained(tmp_path / "b")

    # resuming with different settings is refused
    with pytest.raises(ValueError, match="lr"):
        sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "b", *extra, "--resume", "--lr", "1e-3"))


def test_sft_nan_loss_stops_with_step(tmp_path, tiny_chat_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(6))
    real, calls = sft.batch_loss, []

    def poisoned(model, batch, n, autocast=None):
        calls.append(1)
        loss = real(model, batch, n)
        return loss * float("nan") if len(calls) == 5 else loss  # micro-batch 5 = step 3 (grad-accum 2)

    monkeypatch.setattr(sft, "batch_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 3: loss is nan"):
        sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")


def test_sft_skips_empty_and_long_rows_with_counts(tmp_path, tiny_chat_model_dir, capsys):
    rows = sft_rows(4) + [{"prompt": "q", "final": ""}, {"prompt": "q", "final": "long " * 300}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    mix = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "say hi", "response": "hi"}])
    sft.main(["--model", tiny_chat_model_dir, "--data", data, "--mix", mix, "--out", str(tmp_path / "o"),
              "--max-steps", "1", "--max-len", "300", "--quiet"])
    out = capsys.readouterr().out
    assert "7 rows from 2 file(s); skipped 1 with an empty response and 1 longer than --max-len=300" in out
    with pytest.raises(ValueError, match=r"d2\.jsonl:1: missing field"):
        sft.main(["--model", tiny_chat_model_dir, "--data", write_jsonl(tmp_path / "d2.jsonl", [{"x": 1}]),
                  "--out", str(tmp_path / "o2"), "--quiet"])


# ----------------------------------------------------------------------------- LoRA

def test_lora_linear_is_eq3():
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=True)
    m = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 6)
    assert torch.equal(m(x), base(x))                                      # B = 0 at init
    with torch.no_grad():
        m.lora_B.normal_()
    W0, b, A, B = (t.detach().double() for t in (base.weight, base.bias, m.lora_A, m.lora_B))
    expect = x.double() @ W0.T + b + (6.0 / 3) * (x.double() @ A.T @ B.T)
    assert torch.allclose(m(x).double(), expect, atol=1e-6)
    assert not base.weight.requires_grad and m.lora_A.requires_grad and m.lora_B.requires_grad


def test_lora_merge_and_disable_on_transformer(tiny_chat_model_dir):
    model = load_model(tiny_chat_model_dir)
    original = copy.deepcopy(model)
    names = apply_lora(model, "q,k,v,o", rank=4, alpha=8.0)
    assert len(names) == 8 and all(n.split(".")[-1] in "qkvo" for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = torch.randint(0, 265, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))                      # B = 0: unchanged at start
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.5)
        adapted = model(ids)
        assert (adapted - original(ids)).abs().max() > 1e-3
        with lora_disabled(model):
            assert torch.equal(model(ids), original(ids))                  # disabled == base model
        assert torch.equal(model(ids), adapted)                            # re-enabled on exit
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert (model(ids) - adapted).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(original.state_dict())
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(original, "nope")


# ----------------------------------------------------------------------------- critique -> revision

def cr_argv(model_dir, prompts, out, *extra):
    fewshot = os.path.join(os.path.dirname(prompts), "fewshot.jsonl")
    return ["--model", model_dir, "--prompts", prompts, "--out", str(out), "--rounds", "2", "--batch-size", "2",
            "--max-new-tokens", "6", "--n-fewshot", "1", "--fewshot", fewshot, "--quiet", *extra]


@pytest.fixture
def prompts_file(tmp_path):
    rows = [{"prompt": f"How do I do thing {i}?", "category": "harmful"} for i in range(4)]
    rows.append({"id": "multi", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                             {"role": "user", "content": "now the bad thing"}], "kind": "harmful"})
    demos = [{"prompt": "How do I kill a stuck process?", "response": "I can't help with killing.",
              "principle": "over-refusal", "critique": "Harmless request refused.", "revision": "Run kill PID."},
             {"prompt": "How do I hurt someone?", "response": "Here is how.", "principle": "harm",
              "critique": "It helps with harm.", "revision": "I won't help with that."}]
    write_jsonl(tmp_path / "fewshot.jsonl", demos)  # short demos: byte-level prompts stay small
    return write_jsonl(tmp_path / "p.jsonl", rows)


def read_out(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def test_critique_revise_provenance_and_resume(tmp_path, tiny_chat_model_dir, prompts_file, monkeypatch):
    names = {p.name for p in load_constitution().critiques}
    full = cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "full.jsonl"))
    rows = read_out(tmp_path / "full.jsonl")
    assert rows == full and [r["id"] for r in rows] == ["p-00000", "p-00001", "p-00002", "p-00003", "multi"]
    for r in rows:
        assert r["messages"][-1]["role"] == "user" and isinstance(r["initial"], str)
        assert len(r["rounds"]) == 2 and all(x["principle"] in names for x in r["rounds"])
        assert all(len(x["fewshot"]) == 1 and isinstance(x["critique"], str) for x in r["rounds"])
        kept = [r["initial"]] + [x["revision"] for x in r["rounds"] if not x["empty_revision"]]
        assert r["final"] == kept[-1]
        assert r["policy_model"] == r["critic_model"] == tiny_chat_model_dir and r["seed"] == 0
        assert r["sampling"]["max_new_tokens"] == 6 and r["sampling"]["temperature"] == 0.7
    assert rows[0]["prompt"] == "How do I do thing 0?" and rows[0]["source"] == {"category": "harmful"}

    # interrupted during the second batch, then rerun: no duplicates, nothing lost, same rows
    real, calls = cr.generate, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 7:  # batch 1 makes 5 calls (initial + 2 x (critique, revision))
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(cr, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "cut.jsonl"))
    monkeypatch.setattr(cr, "generate", real)
    assert [r["id"] for r in read_out(tmp_path / "cut.jsonl")] == ["p-00000", "p-00001"]
    with open(tmp_path / "cut.jsonl", "a") as f:
        f.write('{"id": "p-00002", "initi')  # a torn write from the kill
    cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "cut.jsonl"))
    assert read_out(tmp_path / "cut.jsonl") == rows

    # --limit then a larger --limit: only the new rows are generated
    cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "lim.jsonl", "--limit", "3"))
    assert cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "lim.jsonl")) and \
        [r["id"] for r in read_out(tmp_path / "lim.jsonl")] == [r["id"] for r in rows]
    assert cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "lim.jsonl")) == []


def test_principles_do_not_depend_on_batch_and_empty_revision_keeps_response(tmp_path, tiny_chat_model_dir,
                                                                             prompts_file, monkeypatch, capsys):
    def fake(model, tokenizer, prompts, args, seed, num_samples=1):  # revision prompts end with the RevisionRequest
        last = [tokenizer.decode(p).rsplit("<|im_start|>user", 1)[-1] for p in prompts]
        return [("Revision:  " if "RevisionRequest" in t else f"text {len(t)}", "stop_token") for t in last]

    monkeypatch.setattr(cr, "sample_batch", fake)
    one = cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "a.jsonl", "--batch-size", "1"))
    three = cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "b.jsonl", "--batch-size", "3"))
    pick = lambda rows: [[(x["principle"], x["fewshot"]) for x in r["rounds"]] for r in rows]
    assert pick(one) == pick(three)
    assert len({x["principle"] for r in one for x in r["rounds"]}) > 1
    for r in one:  # every revision is empty once the label is stripped: the initial response stays
        assert r["final"] == r["initial"] and all(x["empty_revision"] for x in r["rounds"])
    assert "10 of 10 revisions came out empty" in capsys.readouterr().out


def test_fit_prompt_drops_front_demos_then_cuts_left(tok):
    demos = ["A" * 50, "B" * 50, "C" * 50]

    def build(d):
        shown = demos[len(demos) - d:] if d else []
        return [{"role": "user", "content": "".join(shown) + "the question"}]

    full = len(tok.apply_chat_template(build(3)))
    ids, d, cut = cr.fit_prompt(tok, build, 3, full)
    assert (d, cut) == (3, False)
    ids, d, cut = cr.fit_prompt(tok, build, 3, full - 1)
    assert (d, cut) == (2, False) and "B" * 50 + "C" * 50 in tok.decode(ids) and "A" not in tok.decode(ids)
    ids, d, cut = cr.fit_prompt(tok, build, 3, 20)
    assert (d, cut) == (0, True) and ids == tok.apply_chat_template(build(0))[-20:]


def test_critique_revise_bad_prompts(tmp_path, tiny_chat_model_dir, prompts_file):
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing field 'prompt' or 'messages'"):
        cr.main(cr_argv(tiny_chat_model_dir, bad, tmp_path / "o.jsonl"))
    dup = write_jsonl(tmp_path / "q.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: duplicate id 'x'"):
        cr.main(cr_argv(tiny_chat_model_dir, dup, tmp_path / "o.jsonl"))


def test_separate_critic_model_writes_critiques(tmp_path, tiny_chat_model_dir, prompts_file, monkeypatch):
    import shutil

    critic_dir = str(tmp_path / "critic")
    shutil.copytree(tiny_chat_model_dir, critic_dir)
    seen = []

    def fake(model, tokenizer, prompts, args, seed, num_samples=1):
        last = [tokenizer.decode(p).rsplit("<|im_start|>user", 1)[-1] for p in prompts]
        stage = ["revision" if "RevisionRequest" in t else "critique" if "CritiqueRequest" in t else "initial"
                 for t in last]
        seen.extend((s, model) for s in stage)
        return [(f"{s} text", "stop_token") for s in stage]

    monkeypatch.setattr(cr, "sample_batch", fake)
    rows = cr.main(cr_argv(tiny_chat_model_dir, prompts_file, tmp_path / "o.jsonl", "--critic-model", critic_dir,
                           "--limit", "2"))
    policy = {id(m) for s, m in seen if s in ("initial", "revision")}   # --reviser policy (default)
    critic = {id(m) for s, m in seen if s == "critique"}
    assert len(policy) == 1 and len(critic) == 1 and policy != critic
    assert rows[0]["critic_model"] == critic_dir and rows[0]["policy_model"] == tiny_chat_model_dir
    assert rows[0]["final"] == "revision text" and rows[0]["rounds"][0]["critique"] == "critique text"


def test_sft_gradient_checkpointing_same_losses(tmp_path, tiny_chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(4))
    argv = ["--model", tiny_chat_model_dir, "--data", data, "--max-steps", "2", "--batch-size", "2", "--quiet",
            "--lr", "1e-3", "--lora-rank", "2"]
    a = sft.main(argv + ["--out", str(tmp_path / "a")])
    b = sft.main(argv + ["--out", str(tmp_path / "b"), "--gradient-checkpointing"])
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
