import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python -m train.X` style imports in tests
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- tiny chat tokenizer + model (stage-1 tests)

TINY_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_chat_tokenizer(out_dir):
    """A byte-level BPE tokenizer.json laid out like SmolLM2's: <|endoftext|>=0, <|im_start|>=1 (bos),
    <|im_end|>=2 (eos AND pad), the 256 bytes from 3, a few merges, and a ChatML template with a default
    system prompt. Both minicai and the `tokenizers` library can load it."""
    import json

    from minicai.tokenizer import byte_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[byte_to_unicode()[b]] = len(vocab)
    merges = [["h", "e"], ["Ġ", "t"], ["Ġt", "he"], ["i", "n"], ["Ġ", "a"], ["e", "r"]]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, s in enumerate(specials)],
          "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
          "post_processor": None,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": merges}}
    cfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
           "unk_token": "<|endoftext|>", "add_bos_token": False, "chat_template": TINY_CHATML,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """An HF-format checkpoint dir: a random 2-layer Llama-style Transformer (hidden 32, tied embeddings)
    over the tiny ChatML byte tokenizer above (vocab 265, eos == pad == 2)."""
    from minicai.checkpoint import save_pretrained
    from minicai.model import ModelConfig, Transformer
    from minicai.tokenizer import load_tokenizer

    out = str(tmp_path_factory.mktemp("tiny_chat_model"))
    vocab = write_tiny_chat_tokenizer(out)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      intermediate_size=64, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    g = torch.Generator().manual_seed(1234)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if p.dim() > 1 else 0.0) + (1.0 if p.dim() == 1 else 0.0))
    save_pretrained(model, load_tokenizer(out), out)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny matmuls cost more in thread hand-offs than in work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
