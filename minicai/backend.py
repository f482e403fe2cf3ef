"""The one switch between the PyTorch twins (default) and the Triton kernels in kernels/.

Set it with `minicai.backend.set_backend("triton")` or the environment variable MINICAI_BACKEND.
"triton" is honoured only where it can run: a CUDA tensor, or any tensor under TRITON_INTERPRET=1
(the CPU interpreter the tests use). Everywhere else the twin runs, so minicai works without triton.
"""
import importlib.util
import os

_BACKENDS = ("torch", "triton")
_backend = os.environ.get("MINICAI_BACKEND", "torch")
if _backend not in _BACKENDS:
    raise ValueError(f"MINICAI_BACKEND={_backend!r}: expected one of {_BACKENDS}")


def set_backend(name: str) -> None:
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {_BACKENDS}")
    if name == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend 'triton' asked for, but triton is not installed")
    _backend = name


def get_backend() -> str:
    return _backend


def use_triton(tensor) -> bool:
    """True when the Triton kernel should run on `tensor`."""
    if _backend != "triton":
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
