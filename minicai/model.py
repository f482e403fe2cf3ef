"""One decoder-only transformer for GPT-2 and the Llama family (Llama 2/3/3.x, Qwen2/2.5, Mistral, SmolLM2).

GPT-2 (Radford et al., 2019): learned absolute positions, pre-LayerNorm with biases, GELU (tanh form) MLP.
Llama (Touvron et al., 2023): RMSNorm, rotary position embeddings (Su et al., 2021, rotate-half layout as in
Hugging Face checkpoints), SwiGLU MLP (Shazeer, 2020), grouped-query attention (Ainslie et al., 2023).
Qwen2 adds biases on q/k/v (Llama's optional attention_bias also puts one on the output projection);
Mistral is Llama with a sliding window (we reject sequences longer than it).

The KV cache is an argument of forward, never state of the module: training, scoring and sampling share
this one forward. Deliberate deviations from the reference implementations:
- no dropout (RLHF wants it off; GPT-2's dropout rates in config.json are ignored);
- GPT-2's fused c_attn is split into q/k/v at load time so both families share one attention block.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minicai.attention import attention


@dataclass
class ModelConfig:
    arch: str = "llama"                 # "gpt2" or "llama" (Llama, Qwen2, Mistral, SmolLM2 all map to llama)
    model_type: str = "llama"           # config.json's model_type, written back on save
    vocab_size: int = 32000             # rows of the embedding / unembedding
    hidden_size: int = 4096             # width of the residual stream
    n_layers: int = 32                  # transformer blocks
    n_heads: int = 32                   # query heads
    n_kv_heads: int = 32                # key/value heads (< n_heads: GQA, 1: MQA)
    head_dim: int = 128                 # per-head width (Llama 3.2 / Qwen may differ from hidden/heads)
    intermediate_size: int = 11008      # MLP inner width
    max_position_embeddings: int = 2048 # learned positions (GPT-2) or the trained context (Llama)
    norm_eps: float = 1e-5              # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0         # RoPE base frequency
    rope_type: str = "default"          # "default", "linear" or "llama3" (Llama 3.1+ long-context scaling)
    rope_factor: float = 1.0            # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0   # llama3 scaling: wavelengths above original_ctx/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below original_ctx/high are kept
    rope_original_max_position: int = 8192  # llama3 scaling: the pre-scaling context length
    attention_bias: bool = False        # biases on q/k/v (Qwen2, GPT-2)
    mlp_bias: bool = False              # biases in the MLP (GPT-2)
    tie_word_embeddings: bool = False   # unembedding shares the embedding matrix
    sliding_window: int = 0             # Mistral's window; 0 = none
    bos_token_id: int = -1              # from config.json, -1 if absent
    eos_token_id: int = -1              # first EOS id from config.json, -1 if absent
    pad_token_id: int = -1              # -1 if absent


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with optional linear or "llama3" scaling (Llama 3.1 paper, sec. 3)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.float64) / cfg.head_dim))
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor,
                               torch.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, signed_sin [B, 1, T, D] (signed_sin = [-sin, sin] over the two halves).
    Rotate-half layout, pairs (i, i + D/2): x * cos + [-x2, x1] * sin, written as halves swapped (one flip)
    times signed_sin, which is bit-identical and a third fewer ops per call (decoding is op-bound)."""
    B, H, T, D = x.shape
    swapped = x.view(B, H, T, 2, D // 2).flip(-2).view(B, H, T, D)          # [x2, x1]
    return (x * cos + swapped * signed_sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, same math
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # normalise in fp32 as the reference does, then cast back before the weight (Llama's order)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.hidden_size, cfg.norm_eps)


def pad_batch(seqs, pad_id=0, side="left", device=None) -> tuple:
    """Token-id lists -> (input_ids, attention_mask) [B, T] long, T the longest, 1 = real token: the batch layout
    forward's attention_mask describes. Left padding puts every row's last token in the last column (sampling,
    scoring a sequence's end); right padding keeps positions from 0 (training: causal attention alone keeps it
    out of every real token's view)."""
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


class KVCache:
    """Preallocated keys/values for every layer: k, v [n_layers, B, Hkv, max_len, D].

    `length` is the number of positions written so far (the same for every row: batches are left-padded).
    The model writes through `update` and advances `length` once per forward."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, Hkv, T, D] after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows of the batch so they stop costing compute. `rows` (ascending) move to the front
        in place, only the positions written so far: no new allocation of the whole cache per finished row."""
        rows = rows.tolist()
        if rows != sorted(rows):
            raise ValueError(f"keep_rows needs ascending row indices, got {rows}")
        for i, r in enumerate(rows):  # r >= i: every source row is read before anything overwrites it
            if r != i:
                self.k[:, i, :, :self.length] = self.k[:, r, :, :self.length]
                self.v[:, i, :, :self.length] = self.v[:, r, :, :self.length]
        self.k, self.v = self.k[:, :len(rows)], self.v[:, :len(rows)]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, cfg.n_heads * d, bias=cfg.attention_bias)
        self.k = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * d, bias=cfg.attention_bias)
        self.v = nn.Linear(cfg.hidden_size, cfg.n_kv_heads * d, bias=cfg.attention_bias)
        # Llama's attention_bias also puts a bias on o_proj; Qwen2 biases q/k/v only
        o_bias = cfg.arch == "gpt2" or (cfg.model_type == "llama" and cfg.attention_bias)
        self.o = nn.Linear(cfg.n_heads * d, cfg.hidden_size, bias=o_bias)

    def project(self, x):
        """x [B, T, H] -> q, k, v [B, T, heads * D] (minicai.prepack multiplies the three as one while sampling)."""
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x, rope, key_padding_mask, kv_cache, layer):
        B, T, _ = x.shape
        cfg = self.cfg
        q, k, v = self.project(x)
        q = q.view(B, T, cfg.n_heads, cfg.head_dim).transpose(1, 2)             # [B, Hq, T, D]
        k = k.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)          # [B, Hkv, T, D]
        v = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)                                 # [B, Hkv, past+T, D]
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)  # [B, Hq, T, D]
        return self.o(y.transpose(1, 2).reshape(B, T, cfg.n_heads * cfg.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gpt2 = cfg.arch == "gpt2"
        if not self.gpt2:
            self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def gate_up(self, x):
        """SwiGLU's two input projections (minicai.prepack multiplies them as one while sampling)."""
        return self.gate(x), self.up(x)

    def forward(self, x):
        if self.gpt2:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, key_padding_mask, kv_cache, layer):
        x = x + self.attn(self.norm1(x), rope, key_padding_mask, kv_cache, layer)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] unembedding matrix (the embedding itself when tied)."""
        return self.embed.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, *, position_ids=None, attention_mask=None, kv_cache=None, return_hidden=False):
        """input_ids [B, T] -> logits [B, T, V] (or final-normed hidden [B, T, H] with return_hidden).

        attention_mask [B, past+T]: 1 for real tokens, 0 for (left) padding. Without position_ids, positions
        count real tokens only, so a left-padded row sees the positions it would see alone."""
        cfg = self.config
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        if past + T > cfg.max_position_embeddings and cfg.arch == "gpt2":
            raise ValueError(f"sequence of {past + T} tokens exceeds GPT-2's {cfg.max_position_embeddings} positions")
        if cfg.sliding_window and past + T > cfg.sliding_window:
            raise ValueError(f"sequence of {past + T} tokens exceeds sliding_window={cfg.sliding_window} (not implemented)")
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None

        x = self.embed(input_ids)                                                # [B, T, H]
        rope = None
        if cfg.arch == "gpt2":
            x = x + self.pos_embed(position_ids)
        else:
            freqs = position_ids[:, None, :, None].float() * rope_inv_freq(cfg, x.device)  # [B, 1, T, D/2]
            cos, sin = freqs.cos(), freqs.sin()
            rope = (torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((-sin, sin), dim=-1).to(x.dtype))  # [B, 1, T, D]
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, key_padding_mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, key_padding_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)
        if return_hidden:
            return x
        return self.unembed(x)                                                  # [B, T, V]

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [..., H] -> logits [..., V]."""
        return F.linear(x, self.output_weight)
