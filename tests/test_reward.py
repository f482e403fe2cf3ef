"""Reward model (minicai.reward, train.reward_model) and AI preference labelling (train.label_preferences).

CPU, tiny random models over the default (SmolLM2) tokenizer, whose pad token IS its EOS (<|im_end|> = 2):
the case where reading the reward at "the last token that is not the pad id" silently picks the token
before the EOS. References: the same sequence scored alone without padding, transformers'
*ForSequenceClassification on the saved files, hand-computed expectations.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import minicai.training
from minicai.checkpoint import save_pretrained
from minicai.constitution import load_constitution
from minicai.judge import compare_pairs
from minicai import preferences
from minicai.model import ModelConfig, Transformer
from minicai.pretrained import load_model, resolve_path
from minicai.reward import last_real_index, load_reward_model, save_reward_model
from minicai.tokenizer import load_tokenizer
from train import label_preferences, reward_model

EOS = 2  # SmolLM2's <|im_end|>: eos and pad


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread avoids OpenMP's spin-waiting, which costs 10x on a busy 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    try:
        t = load_tokenizer(resolve_path("default"))
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"default model's tokenizer unavailable: {e}")
    assert t.eos_token_id == t.pad_token_id == EOS
    return t


def tiny_lm_dir(tmp_path, tok, arch="llama", std=0.3, seed=0):
    """A random 2-layer model over the default tokenizer, saved as an HF-format LM checkpoint."""
    common = dict(vocab_size=tok.vocab_size, hidden_size=16, n_layers=2, intermediate_size=32,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=EOS,
                  pad_token_id=EOS)
    if arch == "gpt2":
        cfg = ModelConfig(arch="gpt2", model_type="gpt2", n_heads=2, n_kv_heads=2, head_dim=8, attention_bias=True,
                          mlp_bias=True, **common)
    else:
        cfg = ModelConfig(n_heads=4, n_kv_heads=2, head_dim=4, **common)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    out = str(tmp_path / f"lm_{arch}_{seed}")
    save_pretrained(model, tok, out)
    return out


def rm_from(path):
    torch.manual_seed(0)
    rm = load_reward_model(path, init_from_lm=True)
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # a clearly non-zero head
    return rm


def seq(tok, text, eos=True):
    msgs = [{"role": "user", "content": "Say something."}]
    return tok.apply_chat_template(msgs) + tok.encode(text) + ([EOS] if eos else [])


def batch(seqs, side="right"):
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), EOS)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


def alone(rm, s):
    with torch.no_grad():
        return rm(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]


# ----------------------------------------------------------------------------- reading the reward

def test_last_real_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_real_index(mask).tolist() == [2, 4, 4, 1]
    with pytest.raises(ValueError, match="no real token"):
        last_real_index(torch.tensor([[1, 1], [0, 0]]))


def test_reward_at_last_real_token_when_pad_is_eos(tmp_path, tok):
    rm = rm_from(tiny_lm_dir(tmp_path, tok))
    short, long = seq(tok, "Hi."), seq(tok, "Hello there, how are you today?")
    ids, mask = batch([short, long], "right")               # the short row is followed by pads equal to EOS
    with torch.no_grad():
        r = rm(ids, mask)
    assert torch.allclose(r[0], alone(rm, short), atol=1e-5)
    assert torch.allclose(r[1], alone(rm, long), atol=1e-5)
    # the reward of the EOS-terminated sequence is not that of the sequence before its EOS: reading at the
    # last non-pad token id (which skips the EOS) would be detectably wrong
    assert not torch.allclose(alone(rm, short), alone(rm, short[:-1]), atol=1e-3)


def test_left_and_right_padding_agree(tmp_path, tok):
    rm = rm_from(tiny_lm_dir(tmp_path, tok))
    seqs = [seq(tok, t) for t in ("A.", "A longer answer with several words.", "Medium length one.")]
    with torch.no_grad():
        right, left = rm(*batch(seqs, "right")), rm(*batch(seqs, "left"))
    assert torch.allclose(right, left, atol=1e-5)
    assert torch.allclose(right, torch.stack([alone(rm, s) for s in seqs]), atol=1e-5)


@pytest.mark.parametrize("arch,hf_class", [("llama", "LlamaForSequenceClassification"),
                                           ("gpt2", "GPT2ForSequenceClassification")])
def test_transformers_loads_saved_reward_model(tmp_path, tok, arch, hf_class):
    """transformers reads save_reward_model's files with identical scores. It pools at the last token that is
    not config.pad_token_id, so on a sequence ending in EOS (== pad) it scores the sequence *without* its EOS;
    we read the EOS itself. Both statements are checked."""
    transformers = pytest.importorskip("transformers")
    rm = rm_from(tiny_lm_dir(tmp_path, tok, arch))
    out = str(tmp_path / f"rm_{arch}")
    save_reward_model(rm, tok, out)
    hf = getattr(transformers, hf_class).from_pretrained(out).float().eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == EOS
    ended = seq(tok, "Sure, here is a short answer.")
    open_ended = ended[:-1]                                   # last token is not the pad id
    with torch.no_grad():
        hf_open = hf(input_ids=torch.tensor([open_ended])).logits[0, 0]
        hf_ended = hf(input_ids=torch.tensor([ended])).logits[0, 0]
    assert torch.allclose(hf_open, alone(rm, open_ended), atol=1e-4)
    assert torch.allclose(hf_ended, alone(rm, open_ended), atol=1e-4)   # HF skipped the trailing EOS
    assert not torch.allclose(hf_ended, alone(rm, ended), atol=1e-3)    # we did not
    # and our own loader reads the same files back exactly
    back = load_reward_model(out)
    assert torch.equal(alone(back, ended), alone(rm, ended))


def test_load_reward_model_errors(tmp_path, tok):
    lm = tiny_lm_dir(tmp_path, tok)
    with pytest.raises(ValueError, match="no score.weight"):
        load_reward_model(lm)
    rm = rm_from(lm)
    out = str(tmp_path / "rm")
    save_reward_model(rm, tok, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["score.weight"] = torch.zeros(2, 16)
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(ValueError, match="content hash does not match"):  # the edit is caught by the hash
        load_reward_model(out)
    os.remove(os.path.join(out, "checksums.sha256"))  # without the sidecar the shape check names the tensor
    with pytest.raises(ValueError, match="score.weight has shape"):
        load_reward_model(out)


# ----------------------------------------------------------------------------- training

WORDS = "apple river stone cloud lamp paper chair music window garden bread candle".split()


def synthetic_prefs(path, n=40, seed=0):
    """Chosen = shared filler words + 'good', rejected = the same filler + 'bad'."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            filler = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (3,), generator=g).tolist())
            good = bool(torch.rand((), generator=g) < 0.5)  # the marker sits at the start or the end
            c, r = (f"good {filler}", f"bad {filler}") if good else (f"{filler} good", f"{filler} bad")
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}?"}],
                                "chosen": [{"role": "assistant", "content": c}],
                                "rejected": [{"role": "assistant", "content": r}], "soft_label": 0.9}) + "\n")
    return str(path)


def run_rm(tmp_path, data, lm, out, *extra):
    return reward_model.main(["--data", data, "--model", lm, "--out", str(tmp_path / out), "--quiet",
                              "--batch-size", "8", *extra])


def test_bradley_terry_training_beats_chance(tmp_path, tok):
    data = synthetic_prefs(tmp_path / "prefs.jsonl")
    lm = tiny_lm_dir(tmp_path, tok, std=0.1)
    other = synthetic_prefs(tmp_path / "other.jsonl", n=8, seed=1)
    m = run_rm(tmp_path, data, lm, "rm", "--eval-frac", "0.25", "--epochs", "12", "--lr", "3e-3",
               "--warmup-ratio", "0.05", "--soft-labels", "--margin", "0.5", "--extra-eval", other)
    before, after = m["held_out_before"], m["held_out_after"]
    assert after["n"] == 10 and m["n_train"] == 30
    assert after["accuracy"] >= 0.9, (before, after)
    assert after["loss"] < min(before["loss"], 0.6931) - 0.1
    assert after["margin"] > before["margin"]
    assert m["extra_eval"][other]["after"]["accuracy"] >= 0.85 and m["extra_eval"][other]["after"]["n"] == 8
    # what was saved is a reward model that scores like the trained one
    out = str(tmp_path / "rm")
    saved = json.load(open(os.path.join(out, "reward_metrics.json")))
    assert saved["held_out_after"] == after
    assert os.path.exists(os.path.join(out, "loss.png")) and os.path.exists(str(tmp_path / "rm.run" / "train_log.jsonl"))
    rm = load_reward_model(out)
    c, r = seq(tok, "river lamp good"), seq(tok, "river lamp bad")
    assert alone(rm, c) > alone(rm, r)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path, tok, monkeypatch):
    data = synthetic_prefs(tmp_path / "prefs.jsonl", n=16)
    lm = tiny_lm_dir(tmp_path, tok, std=0.1)
    args = ["--max-steps", "4", "--save-every", "2", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "2",
            "--eval-frac", "0.25", "--padding", "left"]
    full = run_rm(tmp_path, data, lm, "full", *args)

    real = minicai.training.check_finite

    def crash_at_step_3(step, **values):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")  # after the state of step 2 was saved
        real(step, **values)

    monkeypatch.setattr(minicai.training, "check_finite", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_rm(tmp_path, data, lm, "cut", *args)
    monkeypatch.setattr(minicai.training, "check_finite", real)
    assert json.load(open(tmp_path / "cut.run" / "state" / "state.json"))["step"] == 2
    resumed = run_rm(tmp_path, data, lm, "cut", *args, "--resume")

    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda name: [json.loads(l) for l in open(tmp_path / f"{name}.run" / "train_log.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip(log("full")) == strip(log("cut"))
    assert [r["step"] for r in log("cut")] == [0, 1, 2, 3, 4]
    assert resumed == full
    # resuming with different settings is refused
    with pytest.raises(ValueError, match="lr"):
        run_rm(tmp_path, data, lm, "cut", *args[:4], "--lr", "1e-2", *args[6:], "--resume")


def test_nan_guard_stops_training(tmp_path, tok):
    data = synthetic_prefs(tmp_path / "prefs.jsonl", n=8)
    lm = tiny_lm_dir(tmp_path, tok)
    with pytest.raises(FloatingPointError, match="step"):
        run_rm(tmp_path, data, lm, "rm", "--max-steps", "3", "--lr", "1e30", "--warmup-ratio", "0",
               "--grad-clip", "0", "--eval-frac", "0")


def write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_bad_preference_rows(tmp_path):
    ok = {"prompt": "Hi?", "chosen": "Hello!", "rejected": [{"role": "assistant", "content": "Go away."}]}
    path = write_rows(tmp_path / "p.jsonl", [ok, "", {**ok, "chosen": "Go away."}, {**ok, "chosen": "  "},
                                             {**ok, "rejected": ""}])
    pairs, skipped = preferences.read_pairs(path)
    assert len(pairs) == 1 and skipped == {"identical": 1, "empty": 2}
    assert pairs[0]["chosen"] == "Hello!" and pairs[0]["rejected"] == "Go away." and pairs[0]["p"] == 1.0

    cases = [({"prompt": "Hi?", "chosen": "a"}, "missing field"),
             ({**ok, "chosen": 3}, "field 'chosen'"),
             ({**ok, "prompt": [{"role": "assistant", "content": "x"}]}, "field 'prompt'"),
             ({**ok, "soft_label": 1.5}, "soft_label"),
             ("{not json", "malformed JSON")]
    for bad, msg in cases:
        p = write_rows(tmp_path / "bad.jsonl", [ok, bad])
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{msg}"):
            preferences.read_pairs(p)
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing field\(s\) \['soft_label'\]"):
        preferences.read_pairs(path, soft_labels=True)


def test_truncated_response_gets_no_eos_and_split_is_by_prompt(tok):
    msgs = [{"role": "user", "content": "Hi?"}]
    pair = {"messages": msgs, "chosen": "Hello!", "rejected": "Go", "p": 1.0, "where": "x:1",
            "chosen_eos": True, "rejected_eos": False}
    (ex,), too_long = reward_model.encode_pairs(tok, [pair], 1000)
    prompt = tok.apply_chat_template(msgs)
    assert ex["chosen_ids"] == prompt + tok.encode("Hello!") + [EOS]
    assert ex["rejected_ids"] == prompt + tok.encode("Go")
    assert reward_model.encode_pairs(tok, [pair], len(prompt) + 2) == ([], 1)
    exs = [{"key": k} for k in "aabbbcdddd"]
    train, held = preferences.split_by_prompt(exs, 0.25, seed=0)
    assert not {e["key"] for e in train} & {e["key"] for e in held} and len(train) + len(held) == 10
    assert len({e["key"] for e in held}) == 1  # round(0.25 * 4 prompts)


# ----------------------------------------------------------------------------- preference labelling

@pytest.fixture()
def prompts_file(tmp_path):
    return write_rows(tmp_path / "prompts.jsonl", [{"prompt": "How do I bake bread?", "id": "p1", "category": "legitimate"},
                                                   {"messages": [{"role": "user", "content": "Tell me a joke."}]}])


def label(tmp_path, lm, prompts, out, *extra):
    return label_preferences.main(["--model", lm, "--prompts", prompts, "--out", str(out), "--max-new-tokens", "4",
                                   "--batch-size", "2", "--quiet", "--device", "cpu", "--dtype", "float32", *extra])


def calibrated_by_hand(p_first, p_second, prior_a):
    """Contextual calibration (Zhao et al. 2021, eq. 1, W = diag(p_cf)^-1) written out for two letters: each
    order's P(letter) divided by the content-free prior of that letter, renormalised; then both orders averaged."""
    pa, pb = prior_a, 1 - prior_a
    first = (p_first / pa) / (p_first / pa + (1 - p_first) / pb)          # response a shown as "A"
    second = (p_second / pb) / (p_second / pb + (1 - p_second) / pa)      # response a shown as "B"
    return first, second, (first + second) / 2


@pytest.mark.slow
def test_label_preferences_end_to_end_and_resume(tmp_path, tok, prompts_file):
    lm = tiny_lm_dir(tmp_path, tok, std=0.05)
    out = tmp_path / "prefs.jsonl"
    rows = label(tmp_path, lm, prompts_file, out)
    lines = out.read_text().splitlines()
    assert len(rows) == len(lines) == 2
    constitution = load_constitution()
    names = {p.name: p for p in constitution.comparisons}
    judge = load_model(lm)
    free = [{"role": "user", "content": "N/A"}]
    for r in map(json.loads, lines):
        assert r["prompt"][-1]["role"] == "user" and r["source"] == "ai" and r["calibrated"]
        assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
        assert 0.5 <= r["soft_label"] <= 1
        assert r["question"] == names[r["principle"]].question
        # routed: the bread prompt is benign, the joke has no kind (all principles)
        assert r["kind"] == ("benign" if r["id"] == "ai:p1" else None)
        if r["kind"]:
            assert names[r["principle"]].applies in ("benign", "any")
        # raw orders from the judge directly, calibrated by hand with its content-free prior
        _, p1, p2 = compare_pairs(judge, tok, [r["prompt"]], [r["chosen"][0]["content"]], [r["rejected"][0]["content"]],
                                  [r["question"]])
        prior_a = float(compare_pairs(judge, tok, [free], ["N/A"], ["N/A"], [r["question"]])[1])
        first, second, soft = calibrated_by_hand(float(p1), float(p2), prior_a)
        assert (r["p_chosen_first_raw"], r["p_chosen_second_raw"]) == (pytest.approx(float(p1), abs=1e-5),
                                                                       pytest.approx(float(p2), abs=1e-5))
        assert (r["p_chosen_first"], r["p_chosen_second"], r["soft_label"]) == (
            pytest.approx(first, abs=1e-5), pytest.approx(second, abs=1e-5), pytest.approx(soft, abs=1e-5))
    assert {json.loads(l)["id"] for l in lines} == {"ai:p1", "ai:prompts.jsonl:2"}
    report = json.load(open(tmp_path / "prefs.report.json"))["sources"]["ai"]
    with open("data/eval/judge_labelled.jsonl") as f:   # every hand-labelled pair is judged
        assert report["agreement"]["n"] == sum(1 for line in f if line.strip()) and 0 <= report["agreement"]["value"] <= 1
    assert report["pairs"] == 2 and 0 <= report["orders_disagree"] <= 1 and "calibrated" in report["measured"]

    # a run killed while writing its second row: the torn line is redone, the first row is kept
    out.write_text(lines[0] + "\n" + lines[1][:25])
    assert len(label(tmp_path, lm, prompts_file, out, "--agreement", "")) == 1
    assert out.read_text().splitlines() == lines
    assert label(tmp_path, lm, prompts_file, out, "--agreement", "") == []  # nothing left to do


def test_label_preferences_cot_clamps(tmp_path, tok, prompts_file):
    lm = tiny_lm_dir(tmp_path, tok, std=0.05)
    rows = label(tmp_path, lm, prompts_file, tmp_path / "cot.jsonl", "--cot", "--agreement", "", "--limit", "1")
    assert len(rows) == 1 and rows[0]["cot"]
    r = rows[0]
    assert 0.4 <= r["p_chosen_first"] <= 0.6 and 0.4 <= r["p_chosen_second"] <= 0.6
    assert 0.5 <= r["soft_label"] <= 0.6


def test_label_preferences_bad_prompts(tmp_path, tok):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "ok"}, "", {"text": "no prompt"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: missing field 'prompt' or 'messages'"):
        label_preferences.load_prompt_rows([bad])
    dup = write_rows(tmp_path / "dup.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}])
    with pytest.raises(ValueError, match="dup.jsonl:2: duplicate id"):
        label_preferences.load_prompt_rows([dup])


def test_pairs_from_revisions(tmp_path):
    msgs = [{"role": "user", "content": "How do I pick a lock?"}]
    src = write_rows(tmp_path / "revisions.jsonl", [
        {"id": "r1", "messages": msgs, "initial": "Sure, step one...", "final": "I can't help break into homes.",
         "initial_finish_reason": "length", "final_finish_reason": "stop_token",
         "rounds": [{"principle": "harmless"}, {"principle": "honest"}]},
        {"id": "r2", "messages": msgs, "initial": "Same.", "final": "Same. "},          # unchanged: skipped
        {"id": "r3", "prompt": "Hi?", "initial": "Hello", "final": ""}])                # empty: skipped
    out = str(tmp_path / "pairs.jsonl")
    assert [r["id"] for r in label_preferences.main(["--from-revisions", src, "--out", out])] == ["revision:r1"]
    (row,) = [json.loads(l) for l in open(out)]
    assert row["id"] == "revision:r1" and row["prompt"] == msgs and row["soft_label"] == 1.0
    assert row["source"] == "revision"
    assert row["chosen"] == [{"role": "assistant", "content": "I can't help break into homes."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Sure, step one..."}]
    assert row["principles"] == ["harmless", "honest"] and row["rejected_finish_reason"] == "length"
    dropped = [json.loads(l) for l in open(tmp_path / "pairs.dropped.jsonl")]
    assert [(d["id"], d["reason"]) for d in dropped] == [("revision:r2", "empty_or_unchanged"),
                                                         ("revision:r3", "empty_or_unchanged")]
    assert label_preferences.main(["--sources", "revision", "--revisions", src, "--out", out]) == []  # no duplicates
    assert len(open(out).read().splitlines()) == 1
    # the reward model reads these rows; the truncated initial response gets no EOS
    pairs, _ = preferences.read_pairs(out)
    assert pairs[0]["chosen_eos"] and not pairs[0]["rejected_eos"]
    bad = write_rows(tmp_path / "bad.jsonl", [{"id": "r1", "messages": msgs, "initial": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['final'\]"):
        label_preferences.main(["--from-revisions", bad, "--out", str(tmp_path / "o.jsonl")])
