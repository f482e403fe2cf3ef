"""minicai: Constitutional AI (Bai et al., 2022) from scratch in pure PyTorch.

Public API (imported lazily so `import minicai` stays cheap and works without triton):
    load_model, load_tokenizer, load_pretrained, save_pretrained, generate
load_* take a checkpoint directory or "default" (minicai.pretrained); save_pretrained writes a directory
(minicai.checkpoint).
"""
import importlib

_API = {
    "load_model": "minicai.pretrained",
    "load_tokenizer": "minicai.pretrained",
    "load_pretrained": "minicai.pretrained",
    "save_pretrained": "minicai.checkpoint",
    "generate": "minicai.sampling",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'minicai' has no attribute {name!r}")
