"""Small file helpers: atomic writes and JSONL with errors that name the file and line."""
import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, data) -> None:
    """Write `data` (str or bytes) to `path` via a temp file in the same folder and os.replace,
    so a reader never sees a half-written file even if we are killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, (bytes, bytearray)) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_jsonl_lines(path) -> list:
    """(line number, row) for each non-blank line of a JSONL file; a malformed line or a non-object row
    raises ValueError naming file:line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            out.append((lineno, row))
    return out


def read_jsonl(path, required=()) -> list:
    """Rows of a JSONL file (blank lines skipped); errors as read_jsonl_lines, and a row missing a
    `required` field raises ValueError naming file:line."""
    rows = []
    for lineno, row in read_jsonl_lines(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        rows.append(row)
    return rows


def read_jsonl_tolerant(path) -> list:
    """Rows of a resumable stage's output, which a killed writer may have left with a torn last line:
    that line is cut from the file (it will be regenerated); any other malformed line is an error."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # last line with no trailing newline: a torn write
                atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                break
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def append_jsonl(path, row: dict) -> None:
    """Append one row and fsync, so a resumable stage loses at most the row being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
