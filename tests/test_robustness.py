"""Issue 16, "nothing lost, nothing silent": every bad input is a clear error naming the file:line or the
flag, nothing on disk is touched before the inputs are checked, divergence stops a run and keeps the last
good state, checkpoints carry a content hash, a kill -9 during a save leaves nothing behind that a rerun
does not clean up. Tiny models (tests/conftest.py); the oracles are hand-built files and hand-computed
guard decisions, and an uninterrupted run for the kill test."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minicai import cli, training
from minicai.checkpoint import resolve_device, save_pretrained
from minicai.io import check_output_path, read_jsonl_lines, read_jsonl_tolerant
from minicai.pretrained import load_model

import train.dpo as dpo
import train.reward_model as reward_model
import train.sft as sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread in this module


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


def sft_data(tmp_path, n=6):
    return write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": f"question {i}?"}],
                                           "final": "the answer is " + "yes " * (i % 3 + 1)} for i in range(n)])


def prefs(tmp_path, n=6):
    return write(tmp_path / "prefs.jsonl", [{"prompt": f"Question {i}?", "chosen": f"good answer {i}",
                                             "rejected": f"bad {i}"} for i in range(n)])


def sft_argv(model, data, out, *extra):
    return ["--model", model, "--data", data, "--out", str(out), "--batch-size", "2", "--max-steps", "2",
            "--save-every", "1", "--lr", "1e-3", "--quiet", *extra]


def tree_bytes(d):
    """{relative path: bytes} of every file under d (to show a folder was not touched)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), d)] = fh.read()
    return out


# ----------------------------------------------------------------------------- JSONL readers

def test_non_utf8_and_malformed_lines_name_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        read_jsonl_lines(p)
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid UTF-8"):
        sft.main(sft_argv("unused", str(p), tmp_path / "o"))   # the data is read before the model
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        read_jsonl_lines(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        read_jsonl_lines(tmp_path)
    # a BOM is tolerated; the row after it parses
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert read_jsonl_lines(tmp_path / "bom.jsonl") == [(1, {"a": 1})]


def test_tolerant_reader_cuts_a_write_torn_inside_a_utf8_character(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_bytes(b'{"id": 1}\n{"id": 2, "t": "\xc3')          # killed between the two bytes of "\xc3\xa9"
    assert read_jsonl_tolerant(p) == [{"id": 1}]
    assert p.read_bytes() == b'{"id": 1}\n'
    p.write_bytes(b'{"id": 1}\n\xff\n{"id": 3}\n')             # not the last line: an error, not a cut
    with pytest.raises(ValueError, match=r"out\.jsonl:2: not valid UTF-8"):
        read_jsonl_tolerant(p)


# ----------------------------------------------------------------------------- nothing lost

def test_fresh_sft_over_an_earlier_run_keeps_it_until_asked(tmp_path, tiny_chat_model_dir):
    data, out = sft_data(tmp_path), tmp_path / "o"
    sft.main(sft_argv(tiny_chat_model_dir, data, out))
    before = tree_bytes(tmp_path / "o.run")
    # a mistyped --data: error naming it, the earlier state and log untouched
    with pytest.raises(FileNotFoundError, match="typo.jsonl"):
        sft.main(sft_argv(tiny_chat_model_dir, str(tmp_path / "typo.jsonl"), out))
    assert tree_bytes(tmp_path / "o.run") == before
    # valid data, no --resume / --overwrite: refused, naming the flag
    with pytest.raises(ValueError, match="--overwrite"):
        sft.main(sft_argv(tiny_chat_model_dir, data, out))
    assert tree_bytes(tmp_path / "o.run") == before
    # --overwrite: the old state and log are moved aside, not deleted
    sft.main(sft_argv(tiny_chat_model_dir, data, out, "--overwrite", "--lr", "2e-3"))
    aside = tree_bytes(tmp_path / "o.run.previous")
    assert aside["state/weights.safetensors"] == before["state/weights.safetensors"]
    assert aside["train_log.jsonl"] == before["train_log.jsonl"]


def test_reward_model_bad_data_keeps_the_log(tmp_path, tiny_chat_model_dir):
    argv = ["--model", tiny_chat_model_dir, "--out", str(tmp_path / "rm"), "--max-steps", "1", "--eval-frac", "0",
            "--batch-size", "2", "--quiet"]
    reward_model.main(["--data", prefs(tmp_path), *argv])
    log = (tmp_path / "rm.run" / "train_log.jsonl").read_bytes()
    with pytest.raises(FileNotFoundError, match="typo.jsonl"):
        reward_model.main(["--data", str(tmp_path / "typo.jsonl"), *argv])
    assert (tmp_path / "rm.run" / "train_log.jsonl").read_bytes() == log


def test_output_of_the_wrong_kind_is_refused_untouched(tmp_path, tiny_chat_model_dir):
    f = tmp_path / "precious.txt"
    f.write_text("mine")
    with pytest.raises(ValueError, match="precious.txt: is an existing file, --out needs a directory"):
        sft.main(sft_argv(tiny_chat_model_dir, sft_data(tmp_path), f))
    with pytest.raises(ValueError, match="precious.txt: is an existing file, --out needs a directory"):
        dpo.main(["--model", tiny_chat_model_dir, "--data", prefs(tmp_path), "--out", str(f)])
    assert f.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["precious.txt", "prefs.jsonl", "sft.jsonl"]
    with pytest.raises(ValueError, match="is an existing directory, --out needs a file"):
        check_output_path(tmp_path, "file")
    with pytest.raises(ValueError, match="precious.txt is a file"):
        check_output_path(f / "sub" / "x.jsonl", "file")
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    assert cli.main(["generate", "--model", tiny_chat_model_dir, "--prompts", prompts, "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("flags,needle", [
    (["--max-steps", "-1"], "--max-steps must be >= 0, got -1"),
    (["--max-steps", "0", "--epochs", "0"], "--epochs must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--warmup-ratio", "1"], r"--warmup-ratio must be in \[0, 1\), got 1.0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
])
def test_sft_flag_ranges(tmp_path, flags, needle):
    with pytest.raises(ValueError, match=needle):
        sft.main(sft_argv("unused", "unused.jsonl", tmp_path / "o", *flags))
    assert os.listdir(tmp_path) == []


def test_dpo_flag_ranges(tmp_path):
    for flags, needle in ((["--beta", "0"], "--beta must be > 0"), (["--eval-frac", "1"], "--eval-frac must be in"),
                          (["--label-smoothing", "0.9"], r"--label-smoothing must be in \[0, 0.5\]")):
        with pytest.raises(ValueError, match=needle):
            dpo.main(["--data", "unused", "--out", str(tmp_path / "o"), *flags])


# ----------------------------------------------------------------------------- divergence

def test_divergence_guard_rules_hand_cases(tmp_path):
    g = training.DivergenceGuard(str(tmp_path / "s"), uniform_loss=math.log(4), max_jump=10)
    g.check(1, 1.3, 0.5)                       # below ln 4 = 1.386 but not clearly: not armed
    g.check(2, 1.39, 0.5)                      # noise at the uniform level right after the start: allowed
    for step in range(3, 30):
        g.check(step, 0.4, 0.5)                # EMA falls under ln(4) / 2 = 0.693: armed
    assert g.armed
    g.check(30, 2.5, 0.5)                      # one hard batch over ln 4 (the cpu-full reward model's case)
    g.check(31, 1.5, 0.5)                      # and a second: two in a row still pass
    g.check(32, 0.4, 0.5)                      # a normal batch resets the count
    g.check(33, math.log(4), 0.5)
    g.check(34, 1.4, 0.5)
    with pytest.raises(training.DivergenceError, match=r"step 35: loss 1.3863 is at or above the uniform-prediction "
                                                       r"loss 1.3863 for 3 steps in a row"):
        g.check(35, math.log(4), 0.5)
    with pytest.raises(training.DivergenceError, match="step 31: gradient norm is exactly 0"):
        g.check(31, 0.4, 0.0)
    with pytest.raises(FloatingPointError, match="step 32: loss is nan"):
        g.check(32, float("nan"), 1.0)
    with pytest.raises(FloatingPointError, match="step 33: grad_norm is inf"):
        g.check(33, 0.4, float("inf"))
    # jump: over 10 x the recent average, floored at a tenth of the uniform loss
    j = training.DivergenceGuard(str(tmp_path / "t"), uniform_loss=None, max_jump=10)
    j.check(1, 2.0, 1.0)
    j.check(2, 19.0, 1.0)                      # 9.5x: allowed
    with pytest.raises(training.DivergenceError, match=r"step 3: loss 300 jumped over --max-loss-jump 10"):
        j.check(3, 300.0, 1.0)
    off = training.DivergenceGuard(str(tmp_path / "u"), uniform_loss=None, max_jump=0)
    off.check(1, 1.0, 1.0)
    off.check(2, 1e6, 1.0)                     # --max-loss-jump 0 turns the jump rule off


def test_diverging_sft_stops_and_writes_no_checkpoint(tmp_path, tiny_chat_model_dir):
    data = sft_data(tmp_path)
    with pytest.raises(FloatingPointError, match=r"step 2: .*(nan|inf|jumped|exactly 0)"):
        sft.main(sft_argv(tiny_chat_model_dir, data, tmp_path / "o", "--lr", "1e6", "--max-steps", "6",
                          "--warmup-ratio", "0", "--grad-clip", "0"))
    # the state of step 1 (the weights that gave step 2's loss) was staged, never promoted
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.run" / "state")
    assert [n for n in os.listdir(tmp_path / "o.run") if "partial" in n] == []


def test_diverging_dpo_continuation_leaves_the_previous_state(tmp_path, tiny_chat_model_dir):
    argv = ["--model", tiny_chat_model_dir, "--data", prefs(tmp_path, 8), "--out", str(tmp_path / "o"),
            "--batch-size", "2", "--epochs", "4", "--eval-frac", "0", "--save-every", "1", "--seed", "1"]
    dpo.main(argv + ["--lr", "1e-3", "--stop-after", "2"])
    state = tree_bytes(tmp_path / "o" / "state")
    assert json.loads(state["state.json"])["step"] == 2
    with pytest.raises(FloatingPointError, match=r"step [34]: "):
        dpo.main(argv + ["--lr", "1e7", "--grad-clip", "0", "--resume"])
    assert tree_bytes(tmp_path / "o" / "state") == state       # the last good state, byte for byte
    assert not os.path.exists(tmp_path / "o" / "final")


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_content_hash(tmp_path, tiny_chat_model_dir, monkeypatch):
    m = load_model(tiny_chat_model_dir)
    out = tmp_path / "ck"
    save_pretrained(m, None, out)
    w = out / "model.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:                  # flip bytes inside the last tensor: same size, same header
        f.seek(size - 64)
        f.write(b"\xff" * 16)
    assert w.stat().st_size == size
    with pytest.raises(ValueError, match=r"ck/model.safetensors: content hash does not match"):
        load_model(out)
    load_model(out, verify=False)              # the skip
    monkeypatch.setenv("MINICAI_NO_VERIFY", "1")
    load_model(out)
    monkeypatch.delenv("MINICAI_NO_VERIFY")
    os.remove(out / "checksums.sha256")        # an older checkpoint without the sidecar still loads
    load_model(out)


def test_verified_once_per_process_until_the_file_changes(tmp_path, tiny_chat_model_dir):
    """A file is hashed again after a write, even one that keeps its size: a load in between that passed does
    not vouch for the new bytes."""
    m = load_model(tiny_chat_model_dir)
    out = tmp_path / "ck"
    save_pretrained(m, None, out)
    load_model(out)                            # verified (and remembered)
    w = out / "model.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:
        f.seek(size - 64)
        f.write(b"\xff" * 16)
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 1000))  # coarse clocks: make the write visible
    with pytest.raises(ValueError, match="content hash does not match"):
        load_model(out)


def test_kill_9_during_a_save_then_resume_is_identical(tmp_path, tiny_chat_model_dir):
    data = sft_data(tmp_path)
    argv = lambda out: sft_argv(tiny_chat_model_dir, data, out, "--max-steps", "4")
    full = sft.main(argv(tmp_path / "a"))
    env = {**os.environ, "MINICAI_TEST_KILL_IN_SAVE": "3", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "train.sft", *argv(tmp_path / "b")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    run = tmp_path / "b.run"
    assert [n for n in os.listdir(run) if n.startswith("state.partial-")]    # what the kill left
    assert json.loads((run / "state" / "state.json").read_text())["step"] == 2
    resumed = sft.main(argv(tmp_path / "b") + ["--resume"])
    assert [n for n in os.listdir(run) if "partial" in n or ".old-" in n] == []
    assert [(x["step"], x["loss"]) for x in resumed] == [(x["step"], x["loss"]) for x in full]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stale_partial_of_a_live_process_is_left_alone(tmp_path):
    from minicai.checkpoint import clean_stale

    live = tmp_path / f"state.partial-{os.getppid()}"
    live.mkdir()
    dead = tmp_path / "state.old-999999999"
    dead.mkdir()
    assert clean_stale(tmp_path / "state") == [str(dead)]
    assert live.exists()


# ----------------------------------------------------------------------------- generate, chat, devices

def gen(model, prompts, out):
    return cli.main(["generate", "--model", model, "--prompts", prompts, "--out", str(out), "--max-new-tokens", "3"])


def test_generate_checks_prompts_as_training_does(tmp_path, tiny_chat_model_dir, capsys):
    cases = {"empty": [{"prompt": " "}], "role": [{"messages": [{"role": "wizard", "content": "hi"}]}],
             "last": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
             "dup": [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], "none": []}
    for name, rows in cases.items():
        path = write(tmp_path / f"{name}.jsonl", rows)
        assert gen(tiny_chat_model_dir, path, tmp_path / "o.jsonl") == 2
        err = capsys.readouterr().err
        assert (f"{name}.jsonl: no prompts" if name == "none" else f"{name}.jsonl:{len(rows)}:") in err, err
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_generate_raw_mode_and_one_prompt_field(tmp_path, tiny_chat_model_dir, capsys):
    out = tmp_path / "o.jsonl"
    raw = ["generate", "--model", tiny_chat_model_dir, "--out", str(out), "--max-new-tokens", "2", "--raw", "--prompts"]
    assert cli.main(raw + [write(tmp_path / "blank.jsonl", [{"prompt": "abc"}, {"prompt": " "}])]) == 2
    assert "blank.jsonl:2: prompt must be a non-empty string" in capsys.readouterr().err
    both = write(tmp_path / "both.jsonl", [{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}])
    assert gen(tiny_chat_model_dir, both, out) == 2
    assert "both.jsonl:1: need exactly one of 'prompt' (str) or 'messages' (list)" in capsys.readouterr().err
    ok = write(tmp_path / "ok.jsonl", [{"prompt": "abc"}, {"messages": [{"role": "user", "content": "hi"}]}])
    assert not os.path.exists(out) and cli.main(raw + [ok]) == 0
    assert [r.get("prompt") for _, r in read_jsonl_lines(out)] == ["abc", None]


def test_generate_resumes_by_prompt_not_by_line(tmp_path, tiny_chat_model_dir):
    p, out = tmp_path / "p.jsonl", tmp_path / "o.jsonl"
    write(p, [{"prompt": "alpha"}, {"prompt": "beta"}, {"prompt": "gamma"}, {"prompt": "beta"}])
    assert gen(tiny_chat_model_dir, str(p), out) == 0
    rows = out.read_text().splitlines()
    out.write_text(rows[0] + "\n" + rows[1] + "\n")              # a run killed after two rows
    write(p, [{"prompt": "new"}, {"prompt": "beta"}, {"prompt": "gamma"}, {"prompt": "beta"}])  # alpha edited away
    assert gen(tiny_chat_model_dir, str(p), out) == 0
    done = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
    assert done == ["alpha", "beta", "new", "gamma", "beta"]      # each current prompt once, the 2nd beta too


def test_missing_device_and_closed_stdin_are_one_line_errors(tmp_path, tiny_chat_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here.*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    assert cli.main(["chat", "--model", tiny_chat_model_dir, "--device", "cuda:1"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", None)
    assert cli.main(["chat", "--model", tiny_chat_model_dir]) == 2
    assert capsys.readouterr().err.strip() == ("minicai chat: error: stdin is closed: chat reads your messages from "
                                               "it (use `minicai generate` for a file)")
