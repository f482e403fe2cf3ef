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
positions that count real tokens only, so each row sees exactly the positions it would see alone. Inside the
call the rows are sorted longest first (outputs keep the caller's order) and the prompts prefill the cache in
groups of similar length (`prefill_groups`: a pad token costs compute, a group one more read of the weights),
so a short prompt beside a long one costs its own length; only the last position is projected to the
vocabulary. Then one token per step for the whole batch. Rows that finish are dropped from the batch
(KVCache.keep_rows) so they stop costing compute, and cache positions that are then padding in every row
left are cut off the front. Sampling draws by inverting each row's CDF at one uniform (`sample`), and top-p
sorts only the top NUCLEUS_CANDIDATES tokens when they hold the nucleus: both exact (batch 8, 49k vocabulary,
1 thread: 20 ms -> 1 ms per step against torch.multinomial per row, 47 ms -> 3 ms against a full sort).

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
"""
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from minicai.model import KVCache, pad_batch
from minicai.prepack import prepacked_weights

NUCLEUS_CANDIDATES = 256  # top-p sorts these first (all the vocabulary only when they hold less than top_p)


@dataclass
class Generation:
    tokens: list = field(default_factory=list)        # generated ids (prompt excluded, stop token included)
    logprobs: list = field(default_factory=list)      # log pi(token) under the sampled distribution (see above)
    raw_logprobs: list = field(default_factory=list)  # log softmax(z)(token): temperature 1, no truncation
    finish_reason: str = "length"                     # "stop_token" | "stop_string" | "stop_when" | "length"
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
        # the nucleus is usually far smaller than the vocabulary: sort only the top NUCLEUS_CANDIDATES when
        # they already hold top_p of the mass in every row (a full sort of 49k logits costs ~6 ms per row)
        sorted_logp, order = logp.topk(min(V, NUCLEUS_CANDIDATES), dim=-1)  # [..., k] descending
        probs = sorted_logp.exp()
        cum = probs.cumsum(-1)
        if sorted_logp.shape[-1] < V and bool((cum[..., -1] < top_p).any()):
            sorted_logp, order = logp.sort(dim=-1, descending=True)         # [..., V]
            probs = sorted_logp.exp()
            cum = probs.cumsum(-1)
        # keep a token while the mass strictly before it is < top_p: the smallest set reaching top_p
        keep_sorted = cum - probs < top_p
        keep_sorted[..., 0] = True                                           # the top token always stays
        keep = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, order, keep_sorted)
        logp = torch.log_softmax(logp.masked_fill(~keep, float("-inf")), dim=-1)
    if min_p > 0:
        # p >= min_p * p_max  <=>  log p >= log(min_p) + log p_max (renormalising keeps the ratio)
        threshold = logp.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p))
        logp = torch.log_softmax(logp.masked_fill(logp < threshold, float("-inf")), dim=-1)
    return logp


def sample(logp, generators=None) -> torch.Tensor:
    """One token per row of logp [B, V] (log pi, -inf = never), row b drawn with generators[b]: the first
    token whose cumulative probability exceeds u * total, for one uniform u per row (inverse CDF). Why not
    torch.multinomial: one call per row (for its own generator) costs ~2.5 ms on a 49k vocabulary on CPU,
    the whole batch's CDF ~1 ms. A token of probability 0 has an empty interval, so it is never drawn."""
    cdf = logp.exp().cumsum(-1)                                              # [B, V] float32
    if generators is None:
        u = torch.rand(cdf.shape[0], device=cdf.device)
    else:
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generators])
    target = u * cdf[:, -1]                                                  # u < 1, so target < total
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)


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


def decode_step(model, tokens, positions, mask, cache):
    """tokens, positions [B] -> next-token logits [B, V] (float32)."""
    return model(tokens[:, None], position_ids=positions[:, None], attention_mask=mask, kv_cache=cache)[:, -1].float()


# ------------------------------------------------------------------------------------------ prefill

PREFILL_FORWARD_COST = 32  # fixed cost of one prefill forward (reading every weight once), in prompt tokens


def prefill_groups(lens) -> list:
    """Rows sorted longest first -> consecutive groups [(start, end)] minimising the sum over groups of
    PREFILL_FORWARD_COST + rows * longest (exact, by dynamic programming): each pad token a group carries
    is weighed against the fixed cost of one more forward."""
    best, cut = [0.0] + [math.inf] * len(lens), [0] * (len(lens) + 1)
    for end in range(1, len(lens) + 1):
        for start in range(end):
            cost = best[start] + PREFILL_FORWARD_COST + (end - start) * lens[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(lens)
    while end:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


class CacheRows(KVCache):
    """Rows start:end of a KVCache from position `offset` on: a group's prefill writes into the batch's cache."""

    def __init__(self, cache: KVCache, start: int, end: int, offset: int):
        self.k, self.v = cache.k[:, start:end, :, offset:], cache.v[:, start:end, :, offset:]
        self.length = 0


def prefill(model, rows, max_new_tokens, device, dtype):
    """rows (token-id lists, longest first) -> (KVCache for B rows x L + max_new_tokens positions holding every
    prompt left padded to the longest, L; last-position logits [B, V] float32). The prompts run in groups of
    similar length (prefill_groups) rather than as one batch padded to L, so short prompts next to a long
    one cost their own length; each group writes straight into its rows of the shared cache."""
    L = len(rows[0])
    # identical neighbours (num_samples copies of a prompt) are prefilled once, then their cache rows copied
    new = [j == 0 or rows[j] != rows[j - 1] for j in range(len(rows))]
    if not all(new):
        cache, logits = prefill(model, [r for r, n in zip(rows, new) if n], max_new_tokens, device, dtype)
        source = (torch.tensor(new).cumsum(0) - 1).to(device)     # row j -> its unique prompt's row
        cache.k, cache.v = cache.k.index_select(1, source), cache.v.index_select(1, source)
        return cache, logits.index_select(0, source)
    cache = KVCache(model.config, len(rows), L + max_new_tokens, device=device, dtype=dtype)
    logits = []
    for start, end in prefill_groups([len(r) for r in rows]):
        group, width = rows[start:end], len(rows[start])
        ids, mask = pad_batch(group, 0, "left", device)               # pad id 0 is masked
        hidden = model(ids, attention_mask=mask if len(group[-1]) < width else None,
                       kv_cache=CacheRows(cache, start, end, L - width), return_hidden=True)
        logits.append(model.unembed(hidden[:, -1]).float())           # only the last position's logits
    cache.length = L
    return cache, torch.cat(logits)


# ------------------------------------------------------------------------------------------ generate

@torch.inference_mode()
def generate(model, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             stop_token_ids=None, stop_strings=None, stop_when=None, num_samples=1, seed=None, tokenizer=None,
             callback=None, prepack=True) -> list:
    """Sample continuations of `prompts` (a list of token-id lists).

    Returns len(prompts) * num_samples Generation objects, ordered prompt0-sample0, prompt0-sample1, ...
    stop_token_ids: default [tokenizer.eos_token_id] (or the model config's EOS); [] disables stop tokens.
    stop_strings: need `tokenizer`; see the module docstring for how tokens and text are cut.
    stop_when(text) -> bool: a row stops (finish_reason "stop_when", text uncut) at the first token after which
        its decoded generated text satisfies it; needs `tokenizer`. For callers that cut the text anyway
        (e.g. gates.sentences_final): the rows stop costing compute once the rest would be cut off.
    seed: same seed, same outputs (None draws one from torch's global generator).
    callback(row, token_id): called for every generated token as it is produced (for streaming).
    prepack: on CPU (fp32/bf16), multiply by weights prepacked for oneDNN while generating (faster decoding,
        one extra copy of the weights for the duration of the call); see minicai.prepack.
    """
    cfg = model.config
    check_sampling_args(temperature, top_k, top_p, min_p)
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    stop_ids, stop_strings = check_stops(model, tokenizer, stop_token_ids, stop_strings)
    if stop_when is not None and (tokenizer is None or not callable(stop_when)):
        raise ValueError("stop_when must be a callable on the generated text, and needs a tokenizer")
    device, dtype = model.output_weight.device, model.output_weight.dtype
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, ()).item())

    rows = [p for p in prompts for _ in range(num_samples)]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))  # batch row j generates output row order[j]
    B, N, L = len(rows), max_new_tokens, len(rows[order[0]])
    mask = torch.zeros(B, L + N, dtype=torch.long)                 # [B, L+N] 1 = real token, grows per step
    for j, r in enumerate(order):
        mask[j, L - len(rows[r]):L] = 1
    gens = None if temperature == 0 else row_generators(seed, B, device)
    state = SimpleNamespace(
        out=[Generation() for _ in range(B)], active=order, gens=None if gens is None else [gens[r] for r in order],
        mask=mask.to(device), positions=torch.tensor([len(rows[r]) for r in order], device=device), col=L,
        sampling=(temperature, top_k, top_p, min_p), stop_ids=stop_ids, stop_strings=stop_strings, stop_when=stop_when,
        tokenizer=tokenizer, callback=callback, max_new_tokens=N)
    with prepacked_weights(model, enabled=prepack):  # packed copies live for this call only
        cache, logits = prefill(model, [rows[r] for r in order], N, device, dtype)
        decode(model, cache, logits, state)
    return finish(state.out, tokenizer, stop_strings)


def check_stops(model, tokenizer, stop_token_ids, stop_strings):
    """-> (set of stop token ids, list of stop strings), checked."""
    vocab = model.config.vocab_size
    if stop_token_ids is None:
        stop_token_ids = default_stop_ids(model, tokenizer)
    for t in stop_token_ids:
        if not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"stop_token_ids contains {t!r}, not a token id in [0, {vocab})")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (pass tokenizer=...)")
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    return set(stop_token_ids), stop_strings


def next_tokens(logits, state):
    """Draw each batch row's next token -> (tokens [b], the same as ints, their log-probs and raw log-probs)."""
    temperature = state.sampling[0]
    if temperature == 0:
        tok = logits.argmax(-1)                                        # [b]
    else:
        logp = process_logits(logits, *state.sampling)                 # [b, V]
        tok = sample(logp, state.gens)
    # log softmax(z)[tok] = z[tok] - logsumexp(z): temperature 1, untruncated, without a [b, V] result
    raw = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    lp = raw if temperature == 0 else logp.gather(-1, tok[:, None])[:, 0]
    toks, lps, raws = torch.stack([tok.to(lp.dtype), lp, raw]).tolist()  # one host sync per step (ids < 2^24: exact)
    return tok, [int(t) for t in toks], lps, raws


def record(toks, lps, raws, state) -> list:
    """Append each active row's token; mark rows that finish (state.active[j] = None); -> their batch indices."""
    done = []
    for j, (r, t) in enumerate(zip(state.active, toks)):
        if r is None:
            continue
        g = state.out[r]
        g.tokens.append(t)
        g.logprobs.append(lps[j])
        g.raw_logprobs.append(raws[j])
        if state.callback is not None:
            state.callback(r, t)
        if t in state.stop_ids:
            g.finish_reason = "stop_token"
        elif state.stop_strings and any(s in state.tokenizer.decode(g.tokens) for s in state.stop_strings):
            g.finish_reason = "stop_string"
        elif state.stop_when is not None and state.stop_when(state.tokenizer.decode(g.tokens)):
            g.finish_reason = "stop_when"
        elif len(g.tokens) == state.max_new_tokens:
            g.finish_reason = "length"
        else:
            continue
        done.append(j)
    for j in done:
        state.active[j] = None
    return done


def decode(model, cache, logits, state) -> None:
    """One token per step for the rows still running: finished rows leave the batch (KVCache.keep_rows), and
    cache positions that are padding in every remaining row are cut off the front (they only cost attention)."""
    padded = bool((state.mask[:, :state.col] == 0).any())             # no padding: skip masks (faster attention)
    for _ in range(state.max_new_tokens):
        tok, *drawn = next_tokens(logits, state)
        done = record(*drawn, state)
        if all(r is None for r in state.active):
            return
        if done:                                                       # drop finished rows from the batch
            keep = [j for j, r in enumerate(state.active) if r is not None]
            sel = torch.tensor(keep, device=tok.device)
            cache.keep_rows(sel)
            tok, state.positions, state.mask = tok[sel], state.positions[sel], state.mask[sel]
            state.active = [state.active[j] for j in keep]
            state.gens = [state.gens[j] for j in keep] if state.gens is not None else None
            lead = int(state.mask[:, :state.col].argmax(-1).min())      # leading columns that are pad in every row
            if lead:
                cache.k, cache.v = cache.k[:, :, :, lead:], cache.v[:, :, :, lead:]
                cache.length -= lead
                state.mask, state.col = state.mask[:, lead:], state.col - lead
            padded = bool((state.mask[:, :state.col] == 0).any())
        state.mask[:, state.col] = 1                                   # the token fed now is real in every row
        state.col += 1
        logits = decode_step(model, tok, state.positions, state.mask[:, :state.col] if padded else None, cache)
        state.positions += 1


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
