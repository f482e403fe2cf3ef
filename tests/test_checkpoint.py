"""HF-format checkpoints: save/load round trips (transformers reads what we write), shards, atomic saves,
and the errors bad directories raise. Tiny random models, fp32, CPU."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import minicai
import minicai.checkpoint as ckpt

V = 64
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_tied": lambda: transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, tie_word_embeddings=True, rope_theta=1e5, bos_token_id=1,
        eos_token_id=[2, 3], pad_token_id=None),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2),
}


def hf_checkpoint(name, path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(path)
    return hf


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_and_transformers_reads_it(tmp_path, name):
    hf_checkpoint(name, tmp_path / "src")
    model = minicai.load_model(tmp_path / "src")
    minicai.save_pretrained(model, None, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]  # no temp directory left behind
    again = minicai.load_model(tmp_path / "out")
    assert torch.equal(logits(again, IDS), logits(model, IDS))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (logits(theirs, IDS) - logits(model, IDS)).abs().max().item() <= 1e-5
    assert theirs.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_special_ids_and_overwrite(tmp_path):
    """eos_token_id lists keep their first id; saving over an existing checkpoint replaces it whole."""
    hf_checkpoint("llama_tied", tmp_path / "src")
    model = minicai.load_model(tmp_path / "src")
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, -1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    minicai.save_pretrained(model, None, out, extra_files={"README.md": "hello"})
    assert sorted(os.listdir(out)) == ["README.md", "checksums.sha256", "config.json", "model.safetensors"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["bos_token_id"] == 1 and saved["eos_token_id"] == 2 and "pad_token_id" not in saved


def test_sharded_checkpoint(tmp_path):
    hf = hf_checkpoint("llama", tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, out / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    model = minicai.load_model(out)
    assert (logits(model, IDS) - logits(hf, IDS)).abs().max().item() <= 1e-4


def test_gpt2_original_layout(tmp_path):
    """OpenAI's GPT-2 files: no "transformer." prefix, no lm_head, and the causal-mask buffers h.N.attn.bias."""
    hf = hf_checkpoint("gpt2", tmp_path / "src")
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    raw = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    for i in range(2):
        raw[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    out = tmp_path / "raw"
    out.mkdir()
    (out / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    save_file(raw, out / "model.safetensors")
    assert (logits(minicai.load_model(out), IDS) - logits(hf, IDS)).abs().max().item() <= 1e-4


def test_interrupted_save_leaves_nothing_complete_looking(tmp_path, monkeypatch):
    hf_checkpoint("gpt2", tmp_path / "src")
    model = minicai.load_model(tmp_path / "src")

    def dies_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a torn file, as if the process were killed here
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        minicai.save_pretrained(model, None, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    with pytest.raises(KeyboardInterrupt):
        minicai.save_pretrained(model, None, tmp_path / "src")  # over an existing checkpoint
    assert sorted(os.listdir(tmp_path)) == ["src"]
    monkeypatch.undo()
    assert torch.equal(logits(minicai.load_model(tmp_path / "src"), IDS), logits(model, IDS))  # old content intact


# -- clear errors ----------------------------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    hf_checkpoint("llama", tmp_path / "m")
    return tmp_path / "m"


def rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor(llama_dir):
    rewrite_tensors(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*blocks\.1\.mlp\.up\.weight"):
        minicai.load_model(llama_dir)


def test_wrong_shape(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 33)
    rewrite_tensors(llama_dir, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(8, 33\).*\(16, 32\)"):
        minicai.load_model(llama_dir)


def test_unexpected_tensor(llama_dir):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    rewrite_tensors(llama_dir, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors.*q_norm\.weight"):
        minicai.load_model(llama_dir)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(llama_dir):
    edit_config(llama_dir, model_type="bert")
    with pytest.raises(ValueError, match=r"config\.json.*model_type 'bert'"):
        minicai.load_model(llama_dir)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(llama_dir, key):
    edit_config(llama_dir, **{"rope_parameters": None, key: {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match=r"config\.json.*rope_scaling type 'yarn'"):
        minicai.load_model(llama_dir)


def test_missing_config_field(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["intermediate_size"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
        minicai.load_model(llama_dir)


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        minicai.load_model(llama_dir)


def test_missing_shard(llama_dir):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError), match=r"model-00001-of-00002\.safetensors"):
        minicai.load_model(llama_dir)


def test_pickle_only_directory(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    (llama_dir / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"pickle.*safetensors only"):
        minicai.load_model(llama_dir)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        minicai.load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        minicai.load_model(tmp_path)


def test_missing_tokenizer_file(llama_dir):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        minicai.load_tokenizer(llama_dir)


def test_malformed_shard_index(llama_dir):
    (llama_dir / "model.safetensors.index.json").write_text('{"weight_ma')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json"):
        minicai.load_model(llama_dir)


def test_malformed_config(llama_dir):
    (llama_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        minicai.load_model(llama_dir)
