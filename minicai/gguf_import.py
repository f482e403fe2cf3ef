"""GGUF -> Hugging Face-format directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json).

Dequantisation (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ...) is the gguf package's. llama.cpp's converter
permutes the rows of attn_q / attn_k so that RoPE rotates adjacent pairs; HF checkpoints rotate halves, so we
apply the inverse permutation. Llama-architecture files (Llama, SmolLM2, Mistral) and Qwen2 are supported.

Layer: above minicai.checkpoint and minicai.tokenizer, below minicai.pretrained (which converts "default" with it).
"""
import os

import numpy as np
import torch

from minicai.checkpoint import config_from_hf, config_to_hf, hf_state_dict, write_hf_dir
from minicai.model import Transformer
from minicai.tokenizer import GPT2_DIGITS_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, Tokenizer

# GGUF tensor name -> HF name ("{i}" = layer).
GGUF_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_KEYS = {
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# tokenizer.ggml.pre -> the tokenizer.json pre_tokenizer that reproduces it
BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {**BYTELEVEL, "use_regex": False}]}


PRE_TOKENIZERS = {
    "gpt-2": BYTELEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTELEVEL]},
    "llama-bpe": _split(LLAMA3_PATTERN),
    "qwen2": _split(QWEN2_PATTERN),
}
assert GPT2_DIGITS_PATTERN  # the "smollm" entry is what tokenizer.py turns into this pattern


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's permute: per head, rows come as interleaved pairs (x0, y0, x1, y1, ...);
    HF wants halves (x0, x1, ..., y0, y1, ...)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, path) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: general.architecture {arch!r} is not supported (llama, qwen2)")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    cfg = {
        "model_type": arch, "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "hidden_size": hidden, "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", n_heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // n_heads),
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
        "rms_norm_eps": float(f"{_field(reader, f'{arch}.attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type is not supported")
    return cfg


def gguf_tokenizer(reader, path) -> Tokenizer:
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model {_field(reader, 'tokenizer.ggml.model')!r} is not supported (gpt2 BPE)")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]  # 3 = control
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": PRE_TOKENIZERS[pre],
          "post_processor": {**BYTELEVEL, "trim_offsets": False},
          "decoder": {**BYTELEVEL, "add_prefix_space": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ") for m in merges]}}

    def tok(key):
        i = _field(reader, key)
        return tokens[i] if i is not None else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok("tokenizer.ggml.bos_token_id"),
              "eos_token": tok("tokenizer.ggml.eos_token_id"), "pad_token": tok("tokenizer.ggml.padding_token_id"),
              "unk_token": tok("tokenizer.ggml.unknown_token_id"), "add_bos_token": False,
              "clean_up_tokenization_spaces": False,
              "model_max_length": _field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)}
    return Tokenizer(tj, {k: v for k, v in config.items() if v is not None}, path=path,
                     chat_template=_field(reader, "tokenizer.chat_template"))


def convert_gguf(gguf_path, out_dir, dtype=torch.float32) -> None:
    """Dequantise `gguf_path` into an HF-format directory at `out_dir` (written atomically)."""
    import gguf

    if not os.path.exists(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such file")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    hf_cfg = gguf_config(reader, gguf_path)
    cfg = config_from_hf(hf_cfg, gguf_path)
    tokenizer = gguf_tokenizer(reader, gguf_path)
    kmap = dict(GGUF_KEYS)
    for i in range(cfg.n_layers):
        kmap.update({k.format(i=i): v.format(i=i) for k, v in GGUF_LAYER_KEYS.items()})
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {hf: t.shape for hf, t in hf_state_dict(model).items()}
    state = {}
    for t in reader.tensors:
        if t.name not in kmap:
            raise ValueError(f"{gguf_path}: tensor {t.name!r} has no place in a {cfg.model_type} model")
        name = kmap[t.name]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape(tuple(reversed([int(x) for x in t.shape])))  # GGUF lists dims fastest-first
        if ".q_proj." in name:
            w = unpermute_rope_rows(w, cfg.n_heads)
        elif ".k_proj." in name:
            w = unpermute_rope_rows(w, cfg.n_kv_heads)
        if name not in expected or tuple(w.shape) != tuple(expected[name]):
            raise ValueError(f"{gguf_path}: tensor {t.name!r} has shape {tuple(w.shape)}, expected "
                             f"{tuple(expected.get(name, ()))} for {name}")
        state[name] = w.to(dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{gguf_path}: missing tensor(s) {missing[:5]}")

    write_hf_dir(out_dir, {**config_to_hf(cfg), "torch_dtype": str(dtype).replace("torch.", "")}, state, tokenizer)


def add_args(p, name):
    """`minicai convert-gguf` (`minicai setup` is minicai.pretrained's)."""
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out_dir", help="output directory (HF format)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype to write")


def run(args):
    convert_gguf(args.gguf, args.out_dir, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.out_dir}")
    return 0
