"""Supervised fine-tuning data: (prompt, response) rows -> token ids and loss labels.

One example is the chat template of the prompt with the generation prompt, then the response, then the
end-of-turn token:

    input_ids = template(prompt, add_generation_prompt=True) + encode(response) + [eos]
    labels    = [-100] * len(template(...))                  + encode(response) + [eos]

so only the response and its end-of-turn token carry loss (the model learns to answer and to stop, not to
predict the user's words). labels[i] is the token at position i; the trainer shifts (hidden at i-1
predicts labels[i]). Padding is marked by position in `collate`, never by token id: with ChatML models
pad == eos (<|im_end|>), and masking by id would silently drop the real end-of-turn target.

Row formats accepted (JSONL, one object per line):
  1. critique_revise output: "final" (the last revision) with "messages" or "prompt". When the revision hit
     the length cap ("final_finish_reason": "length") it was cut mid-sentence, so no EOS is appended:
     the model must not learn to stop there.
  2. "prompt" (str) or "messages" (user-last list) with "response" (str).
  3. "messages" ending in an assistant turn: that turn is the response, the turns before it the prompt.
Malformed JSON, a row that fits none of these, or fields of the wrong type raise ValueError naming
file:line. An empty (or all-whitespace) response is not an error: the row is skipped and counted, as is
a row longer than max_len tokens (see build_examples).
"""
from minicai.constitution import as_messages
from minicai.garak_data import check_trainable_messages
from minicai.io import read_jsonl_lines
from minicai.model import pad_batch

IGNORE = -100


def read_sft_rows(path) -> list:
    """Rows of one SFT data file as dicts {messages, response, add_eos, where} (where = "file:line")."""
    return [_parse_row(row, f"{path}:{lineno}") for lineno, row in read_jsonl_lines(path)]


def _parse_row(row, where) -> dict:
    add_eos = True
    try:
        if "final" in row or "response" in row:
            key = "final" if "final" in row else "response"
            response = row[key]
            if not isinstance(response, str):
                raise ValueError(f"field {key!r} must be a string, got {type(response).__name__}")
            if "messages" not in row and "prompt" not in row:
                raise ValueError(f"field {key!r} needs a 'prompt' or 'messages' field with it")
            messages = as_messages(row["messages"] if "messages" in row else row["prompt"])
            add_eos = not (key == "final" and row.get("final_finish_reason") == "length")
        elif isinstance(row.get("messages"), list) and row["messages"] and \
                isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") == "assistant":
            response = row["messages"][-1].get("content")
            if not isinstance(response, str):
                raise ValueError("the final assistant message has no string 'content'")
            messages = as_messages(row["messages"][:-1])
        else:
            raise ValueError("missing field(s): need 'final' or 'response' (with 'prompt' or 'messages'), "
                             "or 'messages' ending in an assistant turn")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
    return {"messages": messages, "response": response.strip(), "add_eos": add_eos, "where": where}


def encode_example(tokenizer, messages, response, add_eos=True) -> tuple:
    """(input_ids, labels) for one prompt/response pair (see the module docstring)."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{tokenizer.path}: the tokenizer has no eos_token (needed to end each response)")
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    target = tokenizer.encode(response) + ([eos] if add_eos else [])
    return prompt + target, [IGNORE] * len(prompt) + target


def build_examples(tokenizer, rows, max_len) -> tuple:
    """Encode rows; skip (and count) empty responses and examples longer than max_len tokens.
    Returns (examples [{input_ids, labels, where}], {"empty": n, "too_long": n})."""
    out, skipped = [], {"empty": 0, "too_long": 0}
    for r in rows:
        if not r["response"]:
            skipped["empty"] += 1
            continue
        ids, labels = encode_example(tokenizer, r["messages"], r["response"], r["add_eos"])
        if len(ids) > max_len:
            skipped["too_long"] += 1
            continue
        out.append({"input_ids": ids, "labels": labels, "where": r["where"]})
    return out, skipped


def collate(examples, pad_id=0) -> dict:
    """Right-pad a list of examples: input_ids, attention_mask (1 = real), labels (-100 on padding), all
    [B, T] long tensors. pad_id only fills input_ids; padding is excluded from the loss by position."""
    ids, mask = pad_batch([e["input_ids"] for e in examples], pad_id, "right")
    labels = pad_batch([e["labels"] for e in examples], IGNORE, "right")[0]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
