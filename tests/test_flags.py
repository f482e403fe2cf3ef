"""One flag vocabulary across the trainers (issue #15): each old spelling parses to the same Namespace as the
canonical one."""
import pytest

from train import dpo, ppo, reward_model, sft

BASE = {sft: ["--data", "d.jsonl", "--out", "o"], reward_model: ["--data", "d.jsonl", "--out", "o"],
        dpo: ["--data", "d.jsonl"], ppo: []}
ALIASES = [  # (old spelling, canonical spelling)
    (["--lr-min-ratio", "0.3"], ["--min-lr-ratio", "0.3"]),
    (["--grad-checkpoint"], ["--gradient-checkpointing"]),
    (["--use-soft-labels"], ["--soft-labels"]),
    (["--no-autocast"], ["--autocast", "off"]),
]


@pytest.mark.parametrize("script", list(BASE), ids=lambda m: m.__name__.split(".")[-1])
def test_old_spellings_parse_to_the_canonical_namespace(script):
    checked = 0
    for old, new in ALIASES:
        try:
            canonical = script.parser.parse_args(BASE[script] + new)
        except SystemExit:  # the script has no such flag (e.g. soft labels in SFT)
            continue
        assert script.parser.parse_args(BASE[script] + old) == canonical, (old, new)
        checked += 1
    assert checked >= 2  # --min-lr-ratio and --gradient-checkpointing are in every trainer
