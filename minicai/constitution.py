"""The written constitution and the stage-1 (SL-CAI) prompt builders.

Implements Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback":
  - sec 3.1 critique -> revision: the model sees a conversation, a CritiqueRequest drawn at random
    from the constitution, writes a Critique, then sees the matching RevisionRequest and writes a
    revised response; few-shot demonstrations of the whole pattern come first.
  - sec 4.1 the comparison principles ("Which of these responses ...?") used for AI feedback.

Additions beyond the paper: each principle says which prompts it is drawn for (`applies`: harmful, benign or
any), so that e.g. an over-refusal critique is never applied to a bomb request; and may carry a positive and a
negative instruction for contrastive pairs (RLCD, Yang et al. 2023, "RLCD: Reinforcement Learning from
Contrastive Distillation"). prompt_kind tells which kind a prompt row is.

The constitution lives in plain text (constitution.txt at the repo root, format documented at its
top) so a researcher can edit principles without touching code.

Deliberate deviations from the paper, for small chat models:
  - The paper concatenates everything into one "Human:/Assistant:" transcript. We use the chat
    template instead: each demonstration is a user turn (the quoted conversation + CritiqueRequest),
    an assistant turn (the critique), a user turn (RevisionRequest) and an assistant turn (the
    revision). The conversation being critiqued is quoted as text inside the user turn, so the model
    reviews it rather than continuing it.
  - The model writes the bare critique / revision, not "Critique: ..." / "Revision: ...", so a
    revision can be used as a training target as is. strip_label removes a label if one slips in.
  - The RevisionRequest ends with a fixed instruction to reply with the revised response only;
    small models otherwise tend to add "Here is the revised response:" preambles.
"""
import re
from dataclasses import dataclass
from pathlib import Path

from minicai.io import read_jsonl_lines

DEFAULT_CONSTITUTION = Path(__file__).resolve().parent.parent / "constitution.txt"
DEFAULT_FEWSHOT = Path(__file__).resolve().parent.parent / "data" / "fewshot_critique_revision.jsonl"

CONVERSATION_INTRO = "Here is a conversation between a user and an AI assistant:"
REVISION_SUFFIX = "Reply with the revised assistant response only."


KINDS = ("harmful", "benign")  # what a prompt is; a principle's `applies` is one of these or "any"


@dataclass(frozen=True)
class Principle:
    """A critique/revision pair (stage 1). `applies`: the prompt kind it is drawn for ("any": both);
    `positive` / `negative`: instructions that make a model answer in line with / against it ("" = none)."""
    name: str
    critique: str
    revision: str
    weight: float = 1.0
    applies: str = "any"
    positive: str = ""
    negative: str = ""


@dataclass(frozen=True)
class ComparisonPrinciple:
    """A question asked about two candidate responses (stage 2); applies/positive/negative as in Principle."""
    name: str
    question: str
    weight: float = 1.0
    applies: str = "any"
    positive: str = ""
    negative: str = ""


@dataclass
class Constitution:
    critiques: list
    comparisons: list
    path: str = "<memory>"

    def sample_critique(self, rng, kind=None):
        """One critique principle drawn with probability proportional to its weight; kind "harmful" /
        "benign" draws only among principles that apply to that kind of prompt (None: among all)."""
        return _sample(self.critiques, rng, "critique", self.path, kind)

    def sample_comparison(self, rng, kind=None):
        """One comparison principle drawn with probability proportional to its weight; kind as in
        sample_critique."""
        return _sample(self.comparisons, rng, "compare", self.path, kind)

    def get(self, name):
        for p in self.critiques + self.comparisons:
            if p.name == name:
                return p
        raise KeyError(f"{self.path}: no principle named {name!r}")


def _sample(items, rng, section, path, kind):
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind must be None, 'harmful' or 'benign', got {kind!r}")
        items = [p for p in items if p.applies in (kind, "any")]
    if not items:
        only = "" if kind is None else f" that apply to {kind} prompts (applies: {kind} or any)"
        raise ValueError(f"{path}: has no [{section} NAME] principles{only} to sample from")
    # rng is a random.Random: choices() consumes it deterministically, so a seed fixes the draws
    return rng.choices(items, weights=[p.weight for p in items], k=1)[0]


def prompt_kind(row, default=None) -> str:
    """"harmful" or "benign" for a prompt row: its `kind` if present, else its `category` ("harmful" ->
    harmful, any other category -> benign). A row with neither is an error unless `default` is given,
    since guessing "harmful" would route refusal principles onto helpful prompts."""
    if "kind" in row:
        if row["kind"] not in KINDS:
            raise ValueError(f"prompt row has kind {row['kind']!r}, expected 'harmful' or 'benign': {_show(row)}")
        return row["kind"]
    if "category" in row:
        return "harmful" if row["category"] == "harmful" else "benign"
    if default is None:
        raise ValueError(f"prompt row has neither 'kind' nor 'category', so it is unknown whether it is harmful "
                         f"or benign (add one, or pass default=): {_show(row)}")
    if default not in KINDS:
        raise ValueError(f"default must be 'harmful' or 'benign', got {default!r}")
    return default


def _show(row) -> str:
    return repr(row)[:120]


# ----------------------------------------------------------------------------- parsing

_HEADER = re.compile(r"^\[\s*(\S+)\s+([A-Za-z0-9_-]+)\s*\]\s*$")
_KEY = re.compile(r"^([A-Za-z_]+)\s*:(.*)$")
_KEYS = {"critique": ("critique", "revision"), "compare": ("question",)}  # required keys per kind
_OPTIONAL = ("weight", "applies", "positive", "negative")
_APPLIES = KINDS + ("any",)


def load_constitution(path=DEFAULT_CONSTITUTION) -> Constitution:
    """Parse a constitution file (format: see the comment at the top of constitution.txt).
    Any malformation raises ValueError naming file:line."""
    path = str(path)
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
        lines = f.read().splitlines()

    blocks = []   # dicts: kind, name, line, fields {key: [value, line]}
    block, last_key = None, None
    for lineno, raw in enumerate(lines, 1):
        stripped = raw.strip()
        where = f"{path}:{lineno}"
        if not stripped:
            last_key = None  # a blank line ends a value: an indented line after it is an error
            continue
        if stripped.startswith("#"):
            continue
        if raw[0] in " \t":  # continuation of the previous value
            if last_key is None:
                raise ValueError(f"{where}: indented line continues nothing (a continuation must "
                                 f"directly follow a 'key: value' line)")
            block["fields"][last_key][0] += " " + stripped
            continue
        if stripped.startswith("["):
            m = _HEADER.match(stripped)
            if not m:
                raise ValueError(f"{where}: malformed header {stripped!r} (expected [critique NAME] "
                                 f"or [compare NAME], NAME made of letters, digits, '_' or '-')")
            kind, name = m.groups()
            if kind not in _KEYS:
                raise ValueError(f"{where}: unknown section type {kind!r} (expected 'critique' or 'compare')")
            for b in blocks:
                if b["name"] == name:
                    raise ValueError(f"{where}: duplicate principle name {name!r} (first defined at "
                                     f"line {b['line']})")
            block = {"kind": kind, "name": name, "line": lineno, "fields": {}}
            blocks.append(block)
            last_key = None
            continue
        m = _KEY.match(stripped)
        if not m:
            raise ValueError(f"{where}: expected a [header], 'key: value' or an indented continuation, "
                             f"got {stripped!r}")
        key, value = m.group(1), m.group(2).strip()
        if block is None:
            raise ValueError(f"{where}: {key!r} appears before any [critique NAME] / [compare NAME] header")
        allowed = _KEYS[block["kind"]] + _OPTIONAL
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} in [{block['kind']} {block['name']}] "
                             f"(allowed: {', '.join(allowed)})")
        if key in block["fields"]:
            raise ValueError(f"{where}: key {key!r} given twice in [{block['kind']} {block['name']}]")
        block["fields"][key] = [value, lineno]
        last_key = key

    if not blocks:
        raise ValueError(f"{path}: no principles found (expected [critique NAME] or [compare NAME] blocks)")

    principles = [_principle(b, path) for b in blocks]
    return Constitution([p for p in principles if isinstance(p, Principle)],
                        [p for p in principles if isinstance(p, ComparisonPrinciple)], path)


def _principle(b, path):
    """A parsed block {kind, name, line, fields {key: [value, line]}} checked and turned into its principle."""
    fields, title = b["fields"], f"[{b['kind']} {b['name']}]"
    for key in _KEYS[b["kind"]]:
        if key not in fields:
            raise ValueError(f"{path}:{b['line']}: {title} is missing {key!r}")
    for key, (value, line) in fields.items():
        if not value:
            raise ValueError(f"{path}:{line}: {key!r} of {title} is empty")
    weight = 1.0
    if "weight" in fields:
        text, wline = fields["weight"]
        try:
            weight = float(text)
        except ValueError:
            raise ValueError(f"{path}:{wline}: weight of {title} must be a number, got {text!r}") from None
        if not 0 < weight < float("inf"):
            raise ValueError(f"{path}:{wline}: weight of {title} must be positive and finite, got {text!r}")
    applies, aline = fields.get("applies", ["any", b["line"]])
    if applies not in _APPLIES:
        raise ValueError(f"{path}:{aline}: applies of {title} must be one of {', '.join(_APPLIES)}, got {applies!r}")
    if ("positive" in fields) != ("negative" in fields):  # a contrast needs both of its halves
        given, other = ("positive", "negative") if "positive" in fields else ("negative", "positive")
        raise ValueError(f"{path}:{fields[given][1]}: {title} has {given!r} without {other!r} (give both or neither)")
    extra = dict(applies=applies, positive=fields.get("positive", [""])[0], negative=fields.get("negative", [""])[0])
    if b["kind"] == "critique":
        return Principle(b["name"], fields["critique"][0], fields["revision"][0], weight, **extra)
    return ComparisonPrinciple(b["name"], fields["question"][0], weight, **extra)


# ----------------------------------------------------------------------------- few-shot data

@dataclass(frozen=True)
class Demonstration:
    """One worked critique -> revision example shown to the model before the real one."""
    messages: list      # the conversation up to the response: [{"role", "content"}], ends with user
    response: str       # the initial (flawed) assistant response
    principle: Principle
    critique: str
    revision: str


def load_fewshot(path=DEFAULT_FEWSHOT, constitution=None) -> list:
    """Demonstrations from a JSONL file with fields prompt (str) or messages, response, principle
    (the name of a critique principle in `constitution`), critique, revision. The principle's text is
    taken from the constitution, so rewording a principle rewords the demonstrations with it."""
    if constitution is None:
        constitution = load_constitution()
    by_name = {p.name: p for p in constitution.critiques}
    demos = []
    for lineno, row in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        missing = [k for k in ("response", "principle", "critique", "revision") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        try:
            messages = as_messages(row.get("messages", row.get("prompt")))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for key in ("response", "critique", "revision"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise ValueError(f"{where}: field {key!r} must be a non-empty string")
        if row["principle"] not in by_name:
            raise ValueError(f"{where}: unknown critique principle {row['principle']!r} "
                             f"(not in {constitution.path})")
        demos.append(Demonstration(messages, row["response"], by_name[row["principle"]],
                                   row["critique"], row["revision"]))
    return demos


# ----------------------------------------------------------------------------- prompt builders

def as_messages(prompt) -> list:
    """A prompt as a chat message list: a string becomes one user turn; a list must alternate
    user/assistant (after an optional system turn), start and end with user, with string contents."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt must be a non-empty string or a non-empty list of messages")
    start = 1 if isinstance(prompt[0], dict) and prompt[0].get("role") == "system" else 0
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"message {i} must be a dict with a non-empty string 'content'")
        if i >= start:
            want = "user" if (i - start) % 2 == 0 else "assistant"
            if m.get("role") != want:
                raise ValueError(f"message {i} has role {m.get('role')!r}, expected {want!r} "
                                 f"(turns must alternate user/assistant)")
    if prompt[-1]["role"] != "user" or len(prompt) == start:
        raise ValueError("the last message must be a user turn")
    return prompt


def row_messages(row, where) -> list:
    """The chat messages of a prompt row (its "messages", else its "prompt"); errors name `where` (file:line)."""
    if "prompt" not in row and "messages" not in row:
        raise ValueError(f"{where}: missing field 'prompt' or 'messages'")
    try:
        return as_messages(row["messages"] if "messages" in row else row["prompt"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def render_conversation(prompt, response) -> str:
    """The conversation as quoted text: 'User: ...' / 'Assistant: ...' paragraphs."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    turns = [f"{names[m['role']]}: {m['content'].strip()}" for m in as_messages(prompt)]
    turns.append(f"Assistant: {response.strip()}")
    return "\n\n".join(turns)


def _critique_request(prompt, response, principle) -> str:
    return (f"{CONVERSATION_INTRO}\n\n{render_conversation(prompt, response)}\n\n"
            f"CritiqueRequest: {principle.critique}")


def _revision_request(principle) -> str:
    return f"RevisionRequest: {principle.revision}\n{REVISION_SUFFIX}"


def _demo_turns(fewshot) -> list:
    turns = []
    for d in fewshot:
        turns += [
            {"role": "user", "content": _critique_request(d.messages, d.response, d.principle)},
            {"role": "assistant", "content": d.critique.strip()},
            {"role": "user", "content": _revision_request(d.principle)},
            {"role": "assistant", "content": d.revision.strip()},
        ]
    return turns


def critique_messages(prompt_messages, response, principle, fewshot=()) -> list:
    """Chat messages asking the model to critique `response` to `prompt_messages` under `principle`.
    Few-shot demonstrations come first as complete prior exchanges; the last message is the user's
    CritiqueRequest, so the next assistant turn is the critique."""
    return _demo_turns(fewshot) + [
        {"role": "user", "content": _critique_request(prompt_messages, response, principle)}]


def revision_messages(prompt_messages, response, critique, principle, fewshot=()) -> list:
    """critique_messages + the model's critique + the RevisionRequest: the next assistant turn is
    the revised response. Shares its whole prefix with critique_messages (KV-cache friendly)."""
    return critique_messages(prompt_messages, response, principle, fewshot) + [
        {"role": "assistant", "content": critique.strip()},
        {"role": "user", "content": _revision_request(principle)},
    ]


def strip_label(text, label) -> str:
    """Remove a leading 'Critique:' / 'Revision:' style label (and surrounding space) that a model
    may echo despite the demonstrations; other text is returned stripped but unchanged."""
    text = text.strip()
    m = re.match(rf"^(?:\*\*)?{re.escape(label)}(?:\*\*)?\s*:\s*(?:\*\*)?", text, flags=re.IGNORECASE)
    return text[m.end():].strip() if m else text
