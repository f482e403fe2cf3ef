"""Shared plumbing of the RL stage (train/ppo.py, train/dpo.py): batching, per-token log-probs, value head.

Constitutional AI's second stage (Bai et al. 2022, sec. 4, "RL from AI Feedback") optimises the SL-CAI
policy against a preference model trained on AI labels, with PPO (Schulman et al. 2017) or, here also,
DPO (Rafailov et al. 2023). Both need the same thing: log pi(y_t | x, y_<t) for every response token y_t,
for a batch of (prompt, response) pairs of different lengths. The loss math is in minicai.losses.

Layout of a batch (`collate`):

    input_ids  [B, P + R] = [ left-padded prompt (P columns) | right-padded response (R columns) ]
    position_ids = cumsum(attention_mask) - 1, so every row sees the positions it would see alone
    response_mask [B, R]   1 on real response tokens (a prefix of each row, EOS included)

The response token at column P + t is predicted by the hidden state at column P - 1 + t, so the states
hidden[:, P-1 : P+R-1] ([B, R, H]) give, through minicai.logprobs.token_logprobs (tiled, never the
[B, R, V] logits), the log-probs, entropies and exact KL(pi || ref) of the response tokens, and, through
the value head, V(s_t) for the state *before* token t (what GAE expects: the value after the last token
is 0).

Choices: the value head is a Linear(H, 1) on the policy trunk's final hidden states (a shared trunk, as
in Ziegler et al. 2019's lm-human-preferences and TRL's value-head models): one forward gives log-probs and
values, and memory is one model. The price is that the value loss also moves the trunk; its weight
(vf_coef) keeps that small. The head is zero-initialised, so V starts at 0 instead of at noise.
"""
from contextlib import nullcontext

import torch
import torch.nn as nn

from minicai.logprobs import token_logprobs
from minicai.model import pad_batch

IGNORE = -100


# ----------------------------------------------------------------------------- completions

def completion_text(completion, where="completion") -> str:
    """A completion in TRL's formats: a string, or a list holding one assistant message."""
    if isinstance(completion, str):
        return completion
    if (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)
            and completion[0].get("role") == "assistant" and isinstance(completion[0].get("content"), str)):
        return completion[0]["content"]
    raise ValueError(f"{where}: expected a string or a list with one assistant message, got {completion!r:.80}")


# ----------------------------------------------------------------------------- batching

def collate(prompts, responses, pad_id, device=None) -> dict:
    """Left-pad the prompts, right-pad the responses; explicit masks and position ids (layout above)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"collate: {len(prompts)} prompts and {len(responses)} responses (need the same, > 0)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"collate: prompt {i} is empty (the first response token needs a state before it)")
    B, P, R = len(prompts), max(map(len, prompts)), max(1, max(map(len, responses)))
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.as_tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, P - len(p):P + len(r)] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # padding positions are never attended to: any value will do
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
             "response_mask": mask[:, P:].bool()}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["prompt_width"] = P
    return batch


def select_rows(batch, rows) -> dict:
    """The sub-batch of `rows` (a list of indices), with the columns that are padding in every one of
    them cut off: the result is a function of the rows alone, so two passes over it agree bit for bit."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    sub = {k: v[rows] for k, v in batch.items() if k != "prompt_width"}
    P = batch["prompt_width"]
    am = sub["attention_mask"]
    left = int(am[:, :P].any(0).long().argmax())                        # first prompt column in use
    right = P + max(1, int(sub["response_mask"].any(0).sum()))          # responses are right padded
    out = {k: v[:, left:right] for k, v in sub.items() if k != "response_mask"}
    out["response_mask"] = sub["response_mask"][:, :right - P]
    out["prompt_width"] = P - left
    return out


# ----------------------------------------------------------------------------- log-probs and values

def _response_hidden(model, batch):
    hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], return_hidden=True)   # [B, P+R, H]
    P = batch["prompt_width"]
    return hidden[:, P - 1:-1]                                               # [B, R, H], state before token t


def response_logprobs(model, batch, *, temperature=1.0, ref_model=None, value_head=None, with_entropy=False,
                      chunk_size=None) -> dict:
    """Per-token quantities of the response tokens, [B, R] each (0 on padding):

      logprobs      log pi(y_t | s_t) of softmax(logits / temperature)  (gradient flows)
      entropy       H(pi(. | s_t))                                       (with_entropy)
      ref_logprobs  log ref(y_t | s_t)                                   (ref_model; constant)
      kl            exact KL(pi(. | s_t) || ref(. | s_t)) over the vocab (ref_model; grad flows to pi)
      values        value_head(s_t)                                      (value_head)

    The reference sees the same temperature (the KL is between the two sampling distributions)."""
    h = _response_hidden(model, batch)
    mask = batch["response_mask"]
    targets = batch["input_ids"][:, batch["prompt_width"]:].masked_fill(~mask, IGNORE)  # [B, R]
    ref_h = ref_w = None
    out = {}
    if ref_model is not None:
        with torch.no_grad():
            ref_h, ref_w = _response_hidden(ref_model, batch), ref_model.output_weight
            out["ref_logprobs"] = token_logprobs(ref_h, ref_w, targets, temperature=temperature,
                                                 chunk_size=chunk_size, with_entropy=False)[0]
    logp, ent, kl = token_logprobs(h, model.output_weight, targets, temperature=temperature, ref_hidden=ref_h,
                                   ref_weight=ref_w, chunk_size=chunk_size, with_entropy=with_entropy)
    out.update(logprobs=logp, entropy=ent, kl=kl)
    if value_head is not None:
        out["values"] = torch.where(mask, value_head(h), 0)
    return out


def sequence_logprobs(model, batch, *, average=False, chunk_size=None):
    """Sum (or mean, average=True) over each row's response tokens of log pi: [B]. Also returns the
    per-token log-probs [B, R] (for an NLL term)."""
    logp = response_logprobs(model, batch, chunk_size=chunk_size)["logprobs"]
    n = batch["response_mask"].sum(1)
    total = logp.sum(1)
    return (total / n.clamp(min=1) if average else total), logp


def completion_logprobs(model, batch, *, average=False, autocast=nullcontext):
    """For right-padded rows with labels (minicai.sft_data.collate; -100 off the completion): the sum (or
    mean, average=True) of log pi(label) per row [B], and the per-token log-probs and mask [B, T-1]. The
    forward gets no attention mask: in right-padded rows causal attention alone keeps the padding out of
    every real token's view, and the mask-free call is the fast causal kernel. The forward runs under
    `autocast()`, the log-probs (tiled, fp32) outside any autocast."""
    with autocast():
        hidden = model(batch["input_ids"], return_hidden=True)               # [B, T, H]
    with torch.autocast(hidden.device.type, enabled=False):
        targets = batch["labels"][:, 1:]                                     # hidden at t predicts t + 1
        logp = token_logprobs(hidden[:, :-1], model.output_weight, targets, with_entropy=False)[0]
        mask = targets != IGNORE
        total = logp.sum(1)
        return (total / mask.sum(1).clamp(min=1) if average else total), logp, mask


class ValueHead(nn.Module):
    """V(s) = w . h + b on the trunk's final-normed hidden state (fp32 whatever the trunk's dtype)."""

    def __init__(self, hidden_size):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):                      # h [..., H] -> [...]
        return self.proj(h.float()).squeeze(-1)


# ----------------------------------------------------------------------------- reward model and diagnostics

def score_sequences(reward_fn, prompts, responses, pad_id, device=None) -> torch.Tensor:
    """reward_fn(input_ids, attention_mask) -> [B] on prompt + response, left padded as one sequence, so
    the last column is every row's last real token (the EOS when the response has one)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, mask = pad_batch(seqs, pad_id, "left", device)
    with torch.no_grad():
        scores = reward_fn(ids, mask)
    if scores.shape != (len(seqs),):
        raise ValueError(f"reward model returned shape {tuple(scores.shape)}, expected [{len(seqs)}]")
    return scores.float()

