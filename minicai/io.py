"""Small file helpers: atomic writes, JSONL whose every error names file:line, and the checks every script runs
on its paths before it touches the disk (an output of the wrong kind, an unreadable input)."""
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


def check_input_file(path, what="input") -> None:
    """A readable regular file, or ValueError/FileNotFoundError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file ({what})")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a file ({what})")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not readable ({what})")


def checkpoint_dir(path) -> str:
    """`path` as a str if it is a directory, else FileNotFoundError: what the tokenizer and checkpoint loaders
    take. "default" is resolved above them, by minicai.pretrained.resolve_path (it needs the GGUF conversion)."""
    if not os.path.isdir(path):
        hint = " (minicai.pretrained.resolve_path resolves \"default\")" if str(path) == "default" else ""
        raise FileNotFoundError(f"{path}: no such checkpoint directory{hint}")
    return str(path)


def check_output_path(path, kind, flag="--out") -> None:
    """Fail before anything is written when `path` cannot become a `kind` ("file" or "dir"): it exists as
    the other kind, a parent is a file, or the nearest existing parent is not writable."""
    if not path:
        raise ValueError(f"{flag}: empty path")
    p = os.path.abspath(path)
    if os.path.exists(p) and os.path.isdir(p) != (kind == "dir"):
        have = "directory" if os.path.isdir(p) else "file"
        raise ValueError(f"{path}: is an existing {have}, {flag} needs a {'directory' if kind == 'dir' else 'file'}")
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: {parent} is a file, so {flag} cannot be created under it")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{path}: {parent} is not writable ({flag})")


def _lines(path, tolerate_torn_end=False):
    """(line number, text) of each line, decoded as UTF-8 one line at a time so a bad byte names its line."""
    check_input_file(path)
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[0].startswith(b"\xef\xbb\xbf"):  # a BOM from a Windows editor
        raw[0] = raw[0][3:]
    for lineno, line in enumerate(raw, 1):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as e:
            if tolerate_torn_end and lineno == len(raw):
                yield lineno, None  # a write cut inside a multi-byte character
                return
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None


def read_jsonl_lines(path, required=()) -> list:
    """(line number, row) for each non-blank line of a JSONL file; a missing file, a non-UTF-8 byte, a
    malformed line, a non-object row or a row missing a `required` field raises an error naming file:line."""
    out = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
        out.append((lineno, row))
    return out


def read_jsonl(path, required=()) -> list:
    """Rows of a JSONL file (blank lines skipped); errors as read_jsonl_lines."""
    return [row for _, row in read_jsonl_lines(path, required)]


def read_jsonl_tolerant(path) -> list:
    """Rows of a resumable stage's output, which a killed writer may have left with a torn last line:
    that line is cut from the file (it will be regenerated); any other malformed line is an error."""
    if not os.path.exists(path):
        return []
    lines = list(_lines(path, tolerate_torn_end=True))
    rows = []
    for lineno, line in lines:
        if line is not None and not line.strip():
            continue
        try:
            if line is None:
                raise json.JSONDecodeError("torn UTF-8", "", 0)
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # last line with no trailing newline: a torn write
                atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                break
            raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def append_jsonl(path, row: dict) -> None:
    """Append one row and fsync, so a resumable stage loses at most the row being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
