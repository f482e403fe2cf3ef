"""The reward (preference) model: our transformer trunk plus a scalar head, read at each sequence's last real token.

r(x, y) = w^T h_L(x, y)[last], with h_L the trunk's final-normed hidden states and `last` the last position
whose attention_mask is 1: the EOS that closes the response when sequences are built as SFT builds them
(minicai.sft_data.encode_example). Trained with the Bradley-Terry loss (minicai.losses.bradley_terry_loss;
Ouyang et al., 2022, eq. 1) on the AI preference labels (Bai et al., 2022, sec. 4.1) by train/reward_model.py.

The position comes from the mask, never from the token ids, so left and right padding give the same reward
and a pad token equal to EOS (SmolLM2, Llama 3 and GPT-2 setups) is never mistaken for the end of the
sequence: reading at "the last token that is not the pad id" would pick the token *before* a trailing EOS,
a known bug class of RLHF code.

Saved in the layout transformers' *ForSequenceClassification reads: the trunk's tensors under their HF
names plus "score.weight" [1, H], config.json with num_labels 1. Differences from those classes:
- they pool at the last token that is not config.pad_token_id; when pad == eos and the sequence ends with
  EOS they read the token before it, we read the EOS. With a last token other than the pad id both agree.
- the trunk has no unembedding (a reward model needs none): an untied LM's lm_head is dropped, and the
  saved config says tie_word_embeddings=true so our loader expects no lm_head tensor.
The head is initialised N(0, 1/(H+1)) as in Stiennon et al. (2020)'s reward models; the reward is float32
whatever the trunk's dtype.

VerdictReward adds the evaluation classifier's verdict to a reward model's score for PPO: + weight when the
response gets the class the prompt's kind expects (refuse harmful, comply benign), a rule-based term next to the
learnt one (as in rule-based rewards, Mu et al. 2024), so PPO is paid for the behaviour the evaluation measures
and not only for what a reward model fit on few, noisy pairs likes (issue #14 saw PPO learn evasive one-liners).
"""
import dataclasses

import torch
import torch.nn as nn

from minicai.checkpoint import _dtype, config_to_hf, hf_state_dict, load_state, read_config, weight_files, write_hf_dir
from minicai.model import Transformer
from minicai.pretrained import resolve_path

SEQ_CLS_ARCH = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                "qwen2": "Qwen2ForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask (1 = real token) -> [B] index of the last 1 in each row. A row with no 1 is an error."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got shape {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    empty = ~real.any(-1)
    if empty.any():
        raise ValueError(f"attention_mask rows {empty.nonzero().flatten().tolist()} have no real token")
    T = real.shape[1]
    return T - 1 - real.flip(-1).long().argmax(-1)  # argmax returns the first maximum: the last 1 before flipping


class RewardModel(nn.Module):
    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        self.score = nn.Linear(trunk.config.hidden_size, 1, bias=False)

    @property
    def config(self):
        return self.trunk.config

    def forward(self, input_ids, attention_mask) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (left or right padded) -> rewards [B] (float32)."""
        if input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
        idx = last_real_index(attention_mask)                                          # [B]
        hidden = self.trunk(input_ids, attention_mask=attention_mask, return_hidden=True)  # [B, T, H]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]        # [B, H]
        return self.score(last).squeeze(-1).float()


def _trunk_config(path):
    return dataclasses.replace(read_config(path), tie_word_embeddings=True)  # no lm_head parameter


def load_reward_model(path, dtype=torch.float32, device="cpu", init_from_lm=False) -> RewardModel:
    """A reward model saved by save_reward_model, or (init_from_lm=True) a fresh head on an LM checkpoint
    ("default" = the default model). Returned in eval mode."""
    path = resolve_path(path)
    dtype = _dtype(dtype)
    cfg = _trunk_config(path)
    with torch.device("meta"):
        trunk = Transformer(cfg)
    state = load_state(trunk, weight_files(path), dtype, device, extra_keys=("score.weight",))
    score = state.pop("score.weight", None)
    trunk.load_state_dict(state, strict=True, assign=True)
    rm = RewardModel(trunk).to(device=device, dtype=dtype)
    if score is not None:
        if tuple(score.shape) != (1, cfg.hidden_size):
            raise ValueError(f"{path}: score.weight has shape {tuple(score.shape)}, expected (1, {cfg.hidden_size})")
        with torch.no_grad():
            rm.score.weight.copy_(score)
    elif not init_from_lm:
        raise ValueError(f"{path}: no score.weight (not a reward model; pass init_from_lm=True to start one)")
    else:
        nn.init.normal_(rm.score.weight, std=1.0 / (cfg.hidden_size + 1) ** 0.5)
    return rm.eval()


def save_reward_model(rm: RewardModel, tokenizer, out_dir, extra_files: dict | None = None) -> None:
    """HF *ForSequenceClassification layout (config.json, model.safetensors, tokenizer files, any
    extra_files {name: text}), written atomically."""
    cfg = config_to_hf(rm.config)
    cfg.update(architectures=[SEQ_CLS_ARCH[rm.config.model_type]], num_labels=1, id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0}, torch_dtype=str(rm.score.weight.dtype).replace("torch.", ""))
    write_hf_dir(out_dir, cfg, {**hf_state_dict(rm.trunk), "score.weight": rm.score.weight}, tokenizer, extra_files)


# ----------------------------------------------------------------------------- the classifier's verdict as a reward

def expected_verdict(label: str, kind: str) -> bool:
    """The classifier's class is the one a prompt of this kind should get: refuse harmful, comply benign
    (minicai.gates.EXPECTED, the SL-CAI gate's rule)."""
    from minicai.gates import class_reason

    return class_reason(label, kind) is None


def opposite_verdict(label: str, kind: str) -> bool:
    """The failure the evaluation counts for this kind: harmful help (comply/partial) on a harmful prompt,
    a refusal (refuse/partial) of a benign one."""
    from minicai.gates import EXPECTED
    from minicai.refusal import declined, harmful_help

    if kind not in EXPECTED:
        raise ValueError(f"kind must be one of {sorted(EXPECTED)}, got {kind!r}")
    return harmful_help(label) if kind == "harmful" else declined(label)


class VerdictReward:
    """PPO reward r(x, y) = score(x, y) + weight * [classifier's class of y is the one x's kind expects].

    score: any reward_fn(input_ids, attention_mask) -> [B] (a RewardModel). classifier: has
    classify_many(rows of request/response/kind) (minicai.refusal_head.load_classifier, or ResponseClassifier() for the
    rules alone). prompts: (prompt token ids, request text, kind) of every prompt the policy is given: each row of a
    batch is split into prompt and response by the longest known prompt it starts with (the batch carries ids
    only), and the response is decoded without its EOS. Callable as minicai.rl.score_sequences' reward_fn."""

    def __init__(self, score, classifier, tokenizer, prompts, weight: float):
        if not prompts:
            raise ValueError("VerdictReward: no prompts")
        self.score, self.classifier, self.tok, self.weight = score, classifier, tokenizer, float(weight)
        self.prompts = {}
        for ids, request, kind in prompts:
            if kind not in ("harmful", "benign"):
                raise ValueError(f"VerdictReward: prompt {request[:60]!r} has kind {kind!r}, expected harmful/benign")
            self.prompts[tuple(ids)] = (request, kind)
        self.lengths = sorted({len(k) for k in self.prompts}, reverse=True)

    def split(self, ids) -> tuple:
        """(request, kind, response ids) of one unpadded prompt + response sequence."""
        for n in self.lengths:
            hit = self.prompts.get(tuple(ids[:n]))
            if hit:
                return hit[0], hit[1], ids[n:]
        raise ValueError(f"VerdictReward: a sequence starts with none of the {len(self.prompts)} known prompts")

    def __call__(self, input_ids, attention_mask) -> torch.Tensor:
        base = self.score(input_ids, attention_mask).float()
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            request, kind, response = self.split([t for t, m in zip(ids, mask) if m])
            if response and response[-1] == self.tok.eos_token_id:
                response = response[:-1]
            rows.append(dict(request=request, response=self.tok.decode(response), kind=kind))
        hits = [expected_verdict(label, r["kind"]) for label, r in zip(self.classifier.classify_many(rows), rows)]
        return base + self.weight * torch.tensor(hits, dtype=torch.float32, device=base.device)
