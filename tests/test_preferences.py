"""minicai.preferences: the one preference reader of the reward model and DPO (issue #15): bad rows name
file:line through either trainer's path, and both hold out whole prompts."""
import json

import pytest

from minicai import preferences
from minicai.tokenizer import load_tokenizer
from train import dpo, reward_model

OK = {"prompt": "Hi?", "chosen": "Hello!", "rejected": [{"role": "assistant", "content": "Go away."}]}
BAD = [  # (rows, soft_labels, error): every bad-input case of the two old readers
    ([OK, "", {"prompt": "a", "chosen": "b"}], False, r"bad\.jsonl:3: missing field\(s\) \['rejected'\]"),
    ([OK, {**OK, "chosen": 3}], False, r"bad\.jsonl:2: field 'chosen'"),
    ([OK, {**OK, "chosen": {"x": 1}}], False, r"bad\.jsonl:2: field 'chosen'"),
    ([OK, {**OK, "rejected": [{"role": "user", "content": "x"}]}], False, r"bad\.jsonl:2: field 'rejected'"),
    ([OK, {**OK, "prompt": [{"role": "assistant", "content": "x"}]}], False, r"bad\.jsonl:2: field 'prompt'"),
    ([OK, {**OK, "soft_label": 1.5}], False, r"bad\.jsonl:2: field 'soft_label'"),
    ([{**OK, "soft_label": 1}, {**OK, "soft_label": True}], True, r"bad\.jsonl:2: field 'soft_label'"),
    ([{**OK, "soft_label": 0.5}, OK], True, r"bad\.jsonl:2: missing field\(s\) \['soft_label'\]"),
    ([OK, "{not json"], False, r"bad\.jsonl:2: malformed JSON"),
    ([OK, "[1, 2]"], False, r"bad\.jsonl:2: expected a JSON object"),
]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows,soft,error", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_rows_name_file_and_line_for_both_trainers(tmp_path, tiny_chat_model_dir, rows, soft, error):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=error):
        preferences.read_pairs(path, soft_labels=soft)                  # the reward model's path
    with pytest.raises(ValueError, match=error):
        dpo.load_pairs(path, load_tokenizer(tiny_chat_model_dir), soft_labels=soft)


def shared_prompt_pairs(tmp_path):
    """12 prompts with 1-3 pairs each: a split by pair would put some prompt on both sides."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.{k}", "rejected": f"No {i}.{k}"}
            for i in range(12) for k in range(1 + i % 3)]
    return write(tmp_path / "prefs.jsonl", rows)


def test_held_out_split_is_by_prompt_for_the_reward_model_and_dpo(tmp_path, tiny_chat_model_dir):
    data, tok = shared_prompt_pairs(tmp_path), load_tokenizer(tiny_chat_model_dir)
    for seed in range(4):
        rm_args = reward_model.parser.parse_args(["--data", data, "--out", "o", "--eval-frac", "0.3", "--seed", str(seed)])
        dpo_args = dpo.parser.parse_args(["--data", data, "--eval-frac", "0.3", "--seed", str(seed)])
        for train, held in (reward_model.load_data(rm_args, tok), dpo.load_data(dpo_args, tok)):
            assert train and held and len(train) + len(held) == 24
            assert not {p["key"] for p in train} & {p["key"] for p in held}
            assert len({p["key"] for p in held}) == round(0.3 * 12)    # whole prompts held out
