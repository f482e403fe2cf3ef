"""Batched autoregressive sampling with a preallocated KV cache: greedy, temperature, top-k, top-p, min-p.

At each step the next token is drawn from the truncated distribution of the last position's logits z:

    q(t) = softmax(z / T)                                 temperature T (T = 0: argmax, a point mass)
    keep(t) = t in top_k(z) and t in nucleus_p(q) and q(t) >= min_p * max_t q(t)
    pi(t) = q(t) [keep(t)] / sum_s q(s) [keep(s)]

top-k keeps the k largest logits (Fan et al., 2018); top-p keeps the smallest set of most likely tokens whose
probability reaches p, always the top token (nucleus sampling, Holtzman et al., 2020); min-p keeps tokens at
least min_p times as likely as the most likely one (Nguyen et al., 2024). They are applied in that order,
each on the distribution renormalised after the previous one (HF's warper order). `process_logits` is the
one place this math lives; `generate` and the chat loop both call it.

Decoding: prompts are left padded into one batch, with an attention mask (1 = real token) and explicit
positions that count real tokens only, so each row sees exactly the positions it would see alone. One
forward over the padded prompts fills the cache (only the last position is projected to the vocabulary),
then one token per step. Rows that finish are dropped from the batch (KVCache.keep_rows) so they stop
costing compute.

Choices (documented in `generate` too):
- `logprobs` is the log-probability of each token under the distribution it was drawn from (pi above),
  the behaviour policy a PPO ratio needs. At temperature 0 that distribution is a point mass (log 1 = 0
  for every token, which tells a trainer nothing), so greedy rows report the untruncated temperature-1
  log-prob instead: logprobs == raw_logprobs for greedy decoding.
- A prompt with len(prompt) + max_new_tokens > the model's context is an error (not clipped): results
  never depend silently on which other prompts share the batch.
- stop strings: a row stops at the first token after which its decoded *generated* text contains a stop
  string. `tokens` keep everything generated up to that token; `text` is cut just before the stop string.
  A stop token stays in `tokens` but is left out of `text`.
- Randomness: each output row has its own torch.Generator seeded from (seed, row index), so a row's samples
  do not depend on the other rows of the batch or on when they finish.
- compile=True (CUDA only): the decode step is torch.compile'd with mode="reduce-overhead" (CUDA graphs)
  over a *static* cache: every step attends over the whole preallocated cache with a mask marking the
  unwritten slots, and writes its k/v at a position held in a tensor, so every step has the same shapes.
  Finished rows are then not dropped (a new batch size would mean a new graph); they run on, ignored.
"""
from dataclasses import dataclass, field

import torch

from minicai.model import KVCache, prepacked_weights

FINISH_REASONS = ("stop_token", "stop_string", "length")


@dataclass
class Generation:
    tokens: list = field(default_factory=list)        # generated ids (prompt excluded, stop token included)
    logprobs: list = field(default_factory=list)      # log pi(token) under the sampled distribution (see above)
    raw_logprobs: list = field(default_factory=list)  # log softmax(z)(token): temperature 1, no truncation
    finish_reason: str = "length"                     # "stop_token" | "stop_string" | "length"
    text: str | None = None                           # decoded response, when a tokenizer was given


# ------------------------------------------------------------------------------------------ sampling math

def check_sampling_args(temperature, top_k, top_p, min_p) -> None:
    if not isinstance(temperature, (int, float)) or not (0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(min_p, (int, float)) or not (0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")


def process_logits(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """logits [..., V] -> log pi [..., V] in float32: the temperature-scaled, truncated, renormalised
    distribution; -inf outside the allowed set. temperature 0 gives the point mass on the argmax."""
    check_sampling_args(temperature, top_k, top_p, min_p)
    z = logits.float()
    if temperature == 0:
        top = z.argmax(-1, keepdim=True)
        return torch.full_like(z, float("-inf")).scatter_(-1, top, 0.0)
    logp = torch.log_softmax(z / temperature, dim=-1)                       # [..., V]
    V = z.shape[-1]
    if 0 < top_k < V:
        drop = torch.ones_like(logp, dtype=torch.bool).scatter_(-1, logp.topk(top_k, dim=-1).indices, False)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    if top_p < 1:
        sorted_logp, order = logp.sort(dim=-1, descending=True)             # [..., V]
        probs = sorted_logp.exp()
        # keep a token while the mass strictly before it is < top_p: the smallest set reaching top_p
        before = probs.cumsum(-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False                                          # the top token always stays
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    if min_p > 0:
        # p >= min_p * p_max  <=>  log p >= log(min_p) + log p_max (renormalising keeps the ratio)
        threshold = logp.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p))
        logp = torch.log_softmax(logp.masked_fill(logp < threshold, float("-inf")), dim=-1)
    return logp


def sample(logp, generators=None) -> torch.Tensor:
    """One token per row of logp [B, V] (log pi, -inf = never), row b drawn with generators[b]."""
    probs = logp.exp()
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])


def row_generators(seed, n_rows, device) -> list:
    """One generator per output row, seeded from (seed, row) so a row's draws ignore the rest of the batch."""
    gens = []
    for row in range(n_rows):
        g = torch.Generator(device=device)
        g.manual_seed((seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63))
        gens.append(g)
    return gens


# ------------------------------------------------------------------------------------------ input checks

def check_prompts(prompts, cfg, max_new_tokens) -> list:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be an int > 0, got {max_new_tokens!r}")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    ctx = cfg.max_position_embeddings
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)):
            raise ValueError(f"prompts[{i}] must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token (e.g. BOS)")
        for t in p:
            if not isinstance(t, int) or isinstance(t, bool):
                raise ValueError(f"prompts[{i}] contains {t!r}, not an int token id")
            if not 0 <= t < cfg.vocab_size:
                raise ValueError(f"prompts[{i}] contains token id {t}, outside the vocabulary [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > ctx:
            what = "is longer than" if len(p) >= ctx else f"plus max_new_tokens={max_new_tokens} exceeds"
            raise ValueError(f"prompts[{i}] has {len(p)} tokens, which {what} the model's context of {ctx} "
                             f"positions (shorten the prompt or lower max_new_tokens)")
        out.append(list(p))
    return out


def default_stop_ids(model, tokenizer) -> list:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if eos is not None and eos >= 0 else []


# ------------------------------------------------------------------------------------------ static cache

class StaticKVCache(KVCache):
    """A copy of a prefilled KVCache whose shapes never change while decoding (for torch.compile + CUDA graphs).

    One buffer per layer (so the compiled step mutates graph inputs, not views of them). Each step writes at
    `slot` (a 1-element tensor the caller advances) and returns the whole buffer; `length` always reads
    max_len - 1, so the model expects a [B, max_len] attention mask, in which the caller marks the slots
    written so far. Assigning `length` (the model's `length += T`) is ignored."""

    def __init__(self, cache: KVCache):
        self.ks = [k.clone() for k in cache.k]                    # n_layers x [B, Hkv, max_len, D]
        self.vs = [v.clone() for v in cache.v]
        self.slot = torch.tensor([cache.length], device=cache.k.device)

    @property
    def max_len(self) -> int:
        return self.ks[0].shape[2]

    @property
    def length(self):
        return self.max_len - 1

    @length.setter
    def length(self, value):
        pass

    def update(self, layer, k, v):
        self.ks[layer].index_copy_(2, self.slot, k)
        self.vs[layer].index_copy_(2, self.slot, v)
        return self.ks[layer], self.vs[layer]

    def keep_rows(self, rows):
        raise NotImplementedError("a static cache keeps every row (fixed shapes)")


def decode_step(model, tokens, positions, mask, cache):
    """tokens, positions [B] -> next-token logits [B, V] (float32). The one decode forward, compiled or not."""
    return model(tokens[:, None], position_ids=positions[:, None], attention_mask=mask, kv_cache=cache)[:, -1].float()


_compiled = {}


def compiled_decode_step():
    if "step" not in _compiled:
        _compiled["step"] = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    return _compiled["step"]


# ------------------------------------------------------------------------------------------ generate

@torch.inference_mode()
def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             stop_token_ids=None, stop_strings=None, num_samples=1, seed=None, tokenizer=None,
             compile=False, callback=None, static_cache=None, prepack=True) -> list:
    """Sample continuations of `prompts` (a list of token-id lists).

    Returns len(prompts) * num_samples Generation objects, ordered prompt0-sample0, prompt0-sample1, ...
    stop_token_ids: default [tokenizer.eos_token_id] (or the model config's EOS); [] disables stop tokens.
    stop_strings: need `tokenizer`; see the module docstring for how tokens and text are cut.
    seed: same seed, same outputs (None draws one from torch's global generator).
    callback(row, token_id): called for every generated token as it is produced (for streaming).
    compile: CUDA only; torch.compile the decode step with CUDA graphs over a static cache (see module doc).
    static_cache: use the static-shape cache without compiling (what compile=True runs; default = compile).
    prepack: on CPU (fp32/bf16), multiply by weights prepacked for oneDNN while generating (faster decoding,
        one extra copy of the weights for the duration of the call); see model.prepacked_weights.
    """
    cfg = model.config
    check_sampling_args(temperature, top_k, top_p, min_p)
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if stop_token_ids is None:
        stop_token_ids = default_stop_ids(model, tokenizer)
    stop_ids = set()
    for t in stop_token_ids:
        if not isinstance(t, int) or not 0 <= t < cfg.vocab_size:
            raise ValueError(f"stop_token_ids contains {t!r}, not a token id in [0, {cfg.vocab_size})")
        stop_ids.add(t)
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=...)")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    weight = model.output_weight
    device, dtype = weight.device, weight.dtype
    if compile and device.type != "cuda":
        raise ValueError(f"compile=True needs the model on CUDA (it is on {device}): it captures CUDA graphs")
    static = compile if static_cache is None else static_cache
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())

    rows = [p for p in prompts for _ in range(num_samples)]
    B, N = len(rows), max_new_tokens
    lens = [len(r) for r in rows]
    L = max(lens)
    ids = torch.zeros(B, L, dtype=torch.long)                      # [B, L] left padded (pad id 0 is masked)
    mask = torch.zeros(B, L + N, dtype=torch.long)                 # [B, L+N] 1 = real token, grows per step
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):L] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = min(lens) != L                                        # no padding: skip masks (faster attention)
    positions = torch.tensor(lens, device=device)                  # [B] position of the next token
    gens = None if temperature == 0 else row_generators(seed, B, device)
    out = [Generation() for _ in range(B)]

    cache = KVCache(cfg, B, L + N, device=device, dtype=dtype)
    with prepacked_weights(model, enabled=prepack):  # packed copies live for this call only
        hidden = model(ids, attention_mask=mask[:, :L] if padded else None, kv_cache=cache, return_hidden=True)
        logits = model.unembed(hidden[:, -1]).float()                  # [B, V] only the last position's logits
        if static:
            cache = StaticKVCache(cache)
            step_fn = compiled_decode_step() if compile else decode_step
            if compile:  # buffers mutated in place between replays keep their addresses (no copies into the graph)
                for t in (*cache.ks, *cache.vs, cache.slot, mask, positions):
                    torch._dynamo.mark_static_address(t)
        else:
            step_fn = decode_step

        active = list(range(B))                                        # output row of each batch row (None: done)
        row_gens = gens                                                # generator of each batch row
        for step in range(N):
            if temperature == 0:
                tok = logits.argmax(-1)                                # [b]
            else:
                logp = process_logits(logits, temperature, top_k, top_p, min_p)  # [b, V]
                tok = sample(logp, row_gens)
            # log softmax(z)[tok] = z[tok] - logsumexp(z): temperature 1, untruncated, without a [b, V] result
            raw = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            lp = raw if temperature == 0 else logp.gather(-1, tok[:, None])[:, 0]
            toks, (lps, raws) = tok.tolist(), torch.stack([lp, raw]).tolist()  # one host sync per step

            done = []
            for j, r in enumerate(active):
                if r is None:
                    continue
                g, t = out[r], toks[j]
                g.tokens.append(t)
                g.logprobs.append(lps[j])
                g.raw_logprobs.append(raws[j])
                if callback is not None:
                    callback(r, t)
                if t in stop_ids:
                    g.finish_reason = "stop_token"
                elif stop_strings and any(s in tokenizer.decode(g.tokens) for s in stop_strings):
                    g.finish_reason = "stop_string"
                elif len(g.tokens) == N:
                    g.finish_reason = "length"
                else:
                    continue
                done.append(j)
            for j in done:
                active[j] = None
            if all(r is None for r in active):
                break
            mask[:, L + step] = 1                                      # the token fed now is real in every row
            if static:  # fixed shapes: finished rows run on and are ignored
                logits = step_fn(model, tok, positions, mask, cache).clone()  # clone: graph outputs are reused
                cache.slot += 1
            else:
                if done:                                               # drop finished rows from the batch
                    keep = [j for j, r in enumerate(active) if r is not None]
                    sel = torch.tensor(keep, device=device)
                    cache.keep_rows(sel)
                    tok, positions, mask = tok[sel], positions[sel], mask[sel]
                    active = [active[j] for j in keep]
                    row_gens = [row_gens[j] for j in keep] if row_gens is not None else None
                    padded = padded and bool((mask[:, :L] == 0).any())
                logits = step_fn(model, tok, positions, mask[:, :cache.length + 1] if padded else None, cache)
            positions += 1
        return finish(out, tokenizer, stop_strings)


def finish(out, tokenizer, stop_strings) -> list:
    """Fill each Generation's text: without the stop token, cut before the first stop string."""
    if tokenizer is None:
        return out
    for g in out:
        text = tokenizer.decode(g.tokens[:-1] if g.finish_reason == "stop_token" else g.tokens)
        if g.finish_reason == "stop_string":
            text = text[:min(i for i in (text.find(s) for s in stop_strings) if i >= 0)]
        g.text = text
    return out
