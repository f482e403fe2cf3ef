"""Triton kernels, imported as `minicai_kernels` (see pyproject.toml). Each has a PyTorch twin in minicai/."""
