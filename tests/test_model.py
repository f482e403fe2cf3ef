"""Transformer forward vs transformers (the oracle) on tiny random checkpoints of every supported family.

Each test builds a config with transformers' own config class, random weights (larger than the default
init, so a wrong detail shows up in the logits), saves it as an HF directory and loads it with
minicai.load_model. fp32, CPU, no downloads.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import minicai
import minicai.checkpoint as ckpt
import minicai.pretrained as pretrained

V, T = 96, 24  # T > 16 = the llama3 config's original context: positions past it exercise the scaling

# name -> (config class, kwargs). Small but every family detail is switched on somewhere.
CONFIGS = {
    "gpt2": ("GPT2Config", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama2": ("LlamaConfig", dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    # head_dim 32, theta 1e4, original context 16: two frequencies fall in the blended band, the rest are divided
    "llama3": ("LlamaConfig", dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=10000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama3.2": ("LlamaConfig", dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                     tie_word_embeddings=True, rope_theta=500000.0)),
    "llama_bias": ("LlamaConfig", dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                       mlp_bias=True)),
    "qwen2": ("Qwen2Config", dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=64)),
    "smollm2": ("LlamaConfig", dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_theta=100000.0, rms_norm_eps=1e-5)),
}


def make_hf_model(name):
    cls, kwargs = CONFIGS[name]
    cfg = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in pname or "ln_" in pname) and pname.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))   # norm gains around 1
            else:
                p.copy_(0.3 * torch.randn_like(p))       # biases and matrices: clearly non-zero
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, saved directory)."""
    out = {}
    for name in CONFIGS:
        hf = make_hf_model(name)
        path = tmp_path_factory.mktemp(name.replace(".", "_"))
        hf.save_pretrained(path)
        out[name] = (hf, path)
    return out


def hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    hf, path = checkpoints[name]
    model = minicai.load_model(path)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(hf, ids)
    assert ours.shape == (2, T, V) and ours.dtype == torch.float32
    assert ref.abs().max() > 1.0  # the check below is not vacuous
    assert (ours - ref).abs().max().item() <= 1e-4


def test_config_fields(checkpoints):
    """The fields that are easy to get wrong, read from config.json."""
    cfg = minicai.load_model(checkpoints["llama3.2"][1]).config
    assert (cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.tie_word_embeddings) == (12, 4, 2, True)
    cfg = minicai.load_model(checkpoints["llama3"][1]).config
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position) == ("llama3", 8.0, 16)
    cfg = minicai.load_model(checkpoints["qwen2"][1]).config
    assert cfg.attention_bias and cfg.sliding_window == 0


@pytest.mark.parametrize("name", ["gpt2", "llama2", "qwen2"])
def test_left_padded_batch_matches_rows_alone(checkpoints, name):
    """Left padding must not change real positions' logits (positions count real tokens only)."""
    hf, path = checkpoints[name]
    model = minicai.load_model(path)
    g = torch.Generator().manual_seed(2)
    lengths = [T, T - 5, 3]
    ids = torch.randint(0, V, (3, T), generator=g)
    mask = torch.zeros(3, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, T - n:] = 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
    for r, n in enumerate(lengths):
        alone = hf_logits(hf, ids[r:r + 1, T - n:])[0]                  # [n, V]
        assert (batch[r, T - n:] - alone).abs().max().item() <= 1e-4, f"row {r}"
        assert torch.isfinite(batch[r]).all()  # padded positions stay finite (zeros from attention)


@pytest.mark.parametrize("name", ["gpt2", "smollm2"])
def test_kv_cache_decoding_matches_full_forward(checkpoints, name):
    """Prefill a left-padded batch, then feed one token at a time through the KV cache."""
    from minicai.model import KVCache

    hf, path = checkpoints[name]
    model = minicai.load_model(path)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    cache = KVCache(model.config, 2, 12)
    with torch.no_grad():
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], kv_cache=cache)]
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    got = torch.cat(steps, dim=1)
    assert cache.length == 12
    for r, start in enumerate([0, 4]):
        ref = hf_logits(hf, ids[r:r + 1, start:])[0]
        assert (got[r, start:] - ref).abs().max().item() <= 1e-4


def test_bfloat16_and_dtype_strings(checkpoints):
    hf, path = checkpoints["smollm2"]
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(4))
    ref = hf_logits(hf, ids)
    for dtype in (torch.bfloat16, "bfloat16", "torch.bfloat16"):
        model = minicai.load_model(path, dtype=dtype)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        with torch.no_grad():
            out = model(ids)
        assert out.dtype == torch.bfloat16
        # bf16 has 8 mantissa bits: agree with the fp32 oracle to a few percent of the logit scale
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert minicai.load_model(path, dtype="float32").embed.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        minicai.load_model(path, dtype="float33")


def test_load_builds_on_meta_and_assigns(checkpoints, monkeypatch):
    """One copy of the weights: the module is created on the meta device, then the loaded tensors are
    assigned (not copied into freshly allocated parameters)."""
    built_on = []
    real = ckpt.Transformer

    def spy(cfg):
        m = real(cfg)
        built_on.append(m.embed.weight.device.type)
        return m

    monkeypatch.setattr(ckpt, "Transformer", spy)
    loaded = {}
    real_load_state = ckpt.load_state

    def spy_state(*a, **k):
        loaded.update(real_load_state(*a, **k))
        return loaded

    monkeypatch.setattr(ckpt, "load_state", spy_state)
    model = pretrained.load_model(checkpoints["llama2"][1])  # reads the directory through ckpt.load_checkpoint
    assert built_on == ["meta"]
    assert model.embed.weight.data_ptr() == loaded["embed.weight"].data_ptr()
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())


def test_output_weight_and_hidden(checkpoints):
    hf, path = checkpoints["llama3.2"]
    model = minicai.load_model(path)
    assert model.output_weight is model.embed.weight  # tied
    ids = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        h = model(ids, return_hidden=True)
        ref = hf.model(input_ids=ids).last_hidden_state
    assert h.shape == (1, 5, 32) and (h - ref).abs().max() <= 1e-4
    untied = minicai.load_model(checkpoints["llama2"][1])
    assert untied.output_weight is untied.lm_head.weight


def test_sequence_limits_are_errors(checkpoints):
    model = minicai.load_model(checkpoints["gpt2"][1])
    with pytest.raises(ValueError, match="64 positions"):
        model(torch.zeros(1, 65, dtype=torch.long))
    model = minicai.load_model(checkpoints["mistral"][1])
    with pytest.raises(ValueError, match="sliding_window"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
