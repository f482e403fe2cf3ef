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


def test_script_args_is_parse_args_from_python_values():
    from minicai.training import script_args

    argv = ["--data", "a.jsonl", "b.jsonl", "--out", "o", "--max-steps", "3", "--lr", "0.001", "--resume",
            "--autocast", "off", "--lora-rank", "4"]
    assert script_args(sft.parser, data=["a.jsonl", "b.jsonl"], out="o", max_steps=3, lr=1e-3, resume=True,
                       autocast="off", lora_rank=4) == sft.parser.parse_args(argv)
    assert script_args(ppo.parser, steps=2) == ppo.parser.parse_args(["--steps", "2"])  # no required flag
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['no_such_flag'\]"):
        script_args(sft.parser, data=["a"], out="o", no_such_flag=1)
    with pytest.raises(ValueError, match="missing required --data"):
        script_args(reward_model.parser, out="o")
    with pytest.raises(ValueError, match="--data needs at least one value"):  # nargs="+", as parse_args says
        script_args(sft.parser, data=[], out="o")
    with pytest.raises(ValueError, match=r"--autocast='fast': expected one of"):
        script_args(dpo.parser, data=["a"], autocast="fast")
    for bad in (dict(max_steps="3"), dict(max_steps=1.5), dict(data="a.jsonl"), dict(resume="yes")):
        with pytest.raises(ValueError, match="expected|takes a list"):
            script_args(sft.parser, **{"data": ["a"], "out": "o", **bad})
