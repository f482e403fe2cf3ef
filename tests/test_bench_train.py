"""tests/bench_train.py: its peers (TRL, transformers) are optional; without them it names the install command
and still runs the other sides."""
import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture()
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_missing_trl_names_the_install_command(bench, monkeypatch):
    hide(monkeypatch, "trl", "datasets")  # both hidden, so the answer does not depend on what is installed here
    missing = bench.missing_peers(["minicai-dpo", "trl-dpo", "hf-sft", "trl-sft"])
    assert set(missing) == {"trl-dpo", "trl-sft"}
    assert missing["trl-dpo"] == "trl, datasets not installed: pip install -e '.[bench]'"


def test_missing_transformers_skips_every_peer(bench, monkeypatch):
    hide(monkeypatch, "trl", "transformers", "datasets")
    missing = bench.missing_peers(bench.SIDES)
    assert set(missing) == {"trl-dpo", "hf-dpo", "trl-sft", "hf-sft"}
    assert missing["trl-sft"].startswith("trl, datasets, transformers not installed")
    assert missing["hf-sft"].startswith("transformers not installed")


def test_skipped_sides_leave_the_rest_running(bench, monkeypatch, capsys):
    hide(monkeypatch, "trl", "datasets")
    ran = []
    monkeypatch.setattr(bench, "run_side", lambda side, dtype, argv, timeout: ran.append((side, dtype)) or
                        (None, "not run in this test"))
    args = bench.parser.parse_args(["--sides", "minicai-dpo", "trl-dpo", "--dtypes", "float32"])
    assert bench.main(args, []) == 1  # the stubbed side "failed"; the point is which sides were tried
    assert ran == [("minicai-dpo", "float32")]
    assert "trl-dpo: skipped (trl, datasets not installed: pip install -e '.[bench]')" in capsys.readouterr().out
