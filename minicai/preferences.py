"""Preference pairs: the one reader of preference JSONL, for the reward model (Bradley-Terry, Bai et al. 2022
sec. 4.1) and DPO (Rafailov et al. 2023 eq. 7), which train on the same pairs.

Format (TRL's, train.label_preferences writes it): prompt (a string or a user-last message list), chosen and
rejected (strings, or a list holding one assistant message), optional soft_label = P(chosen is better) in
[0, 1] (required with soft_labels), chosen_finish_reason / rejected_finish_reason, source. A missing or
wrong-typed field, malformed JSON or an evaluation-only prompt is an error naming file:line; pairs whose
stripped sides are empty or identical are skipped and counted.

EOS rule: each side is SFT's layout, chat_template(prompt) + response + EOS (minicai.sft_data.encode_example),
except a response cut at the sampler's length cap (finish_reason "length"): it did not end there, so it gets
no EOS (PPO scores such a sample without one too).

Held-out split by prompt: a seeded eval_frac of the distinct prompts goes to the held-out side with all of
its pairs, so a held-out score is measured on prompts never trained on.
"""
import json
import random

from minicai.constitution import as_messages
from minicai.garak_data import check_trainable_messages
from minicai.io import read_jsonl_lines
from minicai.rl import completion_text
from minicai.sft_data import encode_example


def read_pairs(path, soft_labels=False) -> tuple:
    """([{messages, chosen, rejected, p, chosen_eos, rejected_eos, source, key, where}], {"identical": n,
    "empty": n}) of one file; p = soft_label (1 when absent), key = the prompt (what the split groups by)."""
    pairs, skipped = [], {"identical": 0, "empty": 0}
    need = ("prompt", "chosen", "rejected") + (("soft_label",) if soft_labels else ())
    for lineno, row in read_jsonl_lines(path, required=need):
        where = f"{path}:{lineno}"
        try:
            messages = as_messages(row["prompt"])
        except ValueError as e:
            raise ValueError(f"{where}: field 'prompt': {e}") from None
        check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
        chosen = completion_text(row["chosen"], f"{where}: field 'chosen'").strip()
        rejected = completion_text(row["rejected"], f"{where}: field 'rejected'").strip()
        p = row.get("soft_label", 1.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{where}: field 'soft_label' must be a number in [0, 1], got {p!r}")
        if not chosen or not rejected:
            skipped["empty"] += 1
        elif chosen == rejected:
            skipped["identical"] += 1
        else:
            pairs.append({"messages": messages, "chosen": chosen, "rejected": rejected, "p": float(p),
                          "chosen_eos": row.get("chosen_finish_reason") != "length",
                          "rejected_eos": row.get("rejected_finish_reason") != "length",
                          "source": str(row.get("source", "")), "key": json.dumps(messages, sort_keys=True),
                          "where": where})
    return pairs, skipped


def read_pair_files(paths, soft_labels=False) -> tuple:
    """read_pairs over several files: (pairs, skipped counts summed)."""
    pairs, skipped = [], {"identical": 0, "empty": 0}
    for path in paths:
        p, s = read_pairs(path, soft_labels)
        pairs += p
        skipped = {k: skipped[k] + s[k] for k in skipped}
    return pairs, skipped


def encode_pair(tokenizer, pair) -> tuple:
    """(prompt ids, chosen ids, rejected ids): chat_template(prompt) and each response + EOS (the EOS rule)."""
    prompt = tokenizer.apply_chat_template(pair["messages"], add_generation_prompt=True)
    c = encode_example(tokenizer, pair["messages"], pair["chosen"], pair["chosen_eos"])[0][len(prompt):]
    r = encode_example(tokenizer, pair["messages"], pair["rejected"], pair["rejected_eos"])[0][len(prompt):]
    return prompt, c, r


def split_by_prompt(examples, eval_frac, seed) -> tuple:
    """(train, held-out): a seeded eval_frac of the distinct prompts (examples' "key") goes to the held-out side."""
    if not 0 <= eval_frac < 1:
        raise ValueError(f"--eval-frac must be in [0, 1), got {eval_frac}")
    keys = sorted({e["key"] for e in examples})
    random.Random(seed).shuffle(keys)
    n_eval = round(eval_frac * len(keys))
    if eval_frac > 0 and len(keys) >= 2:
        n_eval = min(max(1, n_eval), len(keys) - 1)  # at least one prompt held out, at least one to train on
    held = set(keys[:n_eval])
    return [e for e in examples if e["key"] not in held], [e for e in examples if e["key"] in held]
