"""Gates on SL-CAI targets (issue #14): what a sampled revision must pass to become an SFT target.

A small model's revisions fail in known ways (measured on SmolLM2-135M-Instruct: 36 of 64 revisions began with
their own critique, 18 of 32 opened with meta-text), and it complies with most harmful requests, so a target
is kept only when it passes every rule below, checked in this order on the candidate after the sentence cut;
the first rule that fails names the reason:
  empty               nothing is left
  meta_text           it talks about the exchange instead of taking part in it: "the user's request", "the AI",
                      "the assistant", "the response" / "the reply", a CritiqueRequest / "Revision:" label
  copies_critique     COPY_SHARE or more of its word COPY_N-grams occur in the critique it was written from
  copies_instruction  the same against the instruction it was given (the revision request or the conditioning
                      principles), for the modes without a critique
  class_<label>       the response classifier's class (minicai.refusal.CLASSES) is not the one the prompt's kind
                      expects: refuse for a harmful prompt, comply for a benign one (EXPECTED)
N-grams that also occur in the prompt do not count as copied: a refusal may name what it refuses, and the
critique names it too.

The sentence cut is the open CAI recipe's post-processing (Huang et al. 2024, "Constitutional AI recipe",
Hugging Face): keep the first N sentences, so that a good first sentence ("I can't help with that.") is not
lost to the nonsense a small model writes after it. A sentence ends at . ! or ? (closing quotes and brackets
included) before white space or at a line break; "1." "e.g." "Dr." and single letters do not end one.
"""
import re

EXPECTED = {"harmful": "refuse", "benign": "comply"}
COPY_N = 4
COPY_SHARE = 0.5

_META = re.compile(
    r"\bthe user'?s? (?:request|question|query|message|prompt)\b|\bthe ai\b|\bthe assistant\b"
    r"|\bthe (?:original |revised |initial |previous )?(?:response|reply)\b"
    r"|\b(?:critique|revision)(?:\s*request)?\s*:", re.IGNORECASE)
_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)|\n")
_NOT_END = re.compile(r"(?:^|\s)(?:\d+|[a-z]|e\.g|i\.e|etc|vs|mr|mrs|ms|dr|st|no)\.$", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def sentence_end(text: str, n: int):
    """The index just past the nth sentence end of text, or None when it has fewer (or n <= 0)."""
    count, start = 0, 0
    for m in _END.finditer(text if n > 0 else ""):
        if not text[start:m.end()].strip() or (m.group() != "\n" and _NOT_END.search(text[:m.start() + 1])):
            continue  # a blank line, or "1." / "e.g." inside a sentence
        count, start = count + 1, m.end()
        if count == n:
            return m.end()
    return None


def cut_sentences(text: str, n: int) -> str:
    """The first n sentences of text (all of it when it has fewer, or n <= 0), stripped."""
    end = sentence_end(text, n)
    return (text if end is None else text[:end]).strip()


def was_cut(text: str, target: str, finish_reason: str) -> bool:
    """The kept target is shorter than the sample, or the sampler stopped the sample once its cut was final
    (finish_reason "stop_when"): either way it ends at a sentence, so it is recorded "cut" and gets an EOS."""
    return target != text.strip() or finish_reason == "stop_when"


def stop_after_sentences(n: int):
    """The sampler's stop_when for candidates cut to n sentences (None when n <= 0: nothing is cut)."""
    return (lambda text: sentences_final(text, n)) if n > 0 else None


def sentences_final(text: str, n: int) -> bool:
    """True once cut_sentences(text + anything, n) == cut_sentences(text, n): the nth sentence end is followed
    by more text (whitespace, by _END's lookahead). An end at the very end of text may still grow ("..", a
    closing quote) or vanish ("3.5"). A sampler may stop a row here: the rest would be cut off anyway."""
    end = sentence_end(text, n)
    return end is not None and end < len(text)


def _grams(text: str, n: int) -> list:
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def copied_share(text: str, source: str, prompt: str = "", n: int = COPY_N) -> float:
    """Share of text's word n-grams that occur in source and not in prompt (0 when text has none)."""
    grams = _grams(text, n)
    if not grams:
        return 0.0
    copied = set(_grams(source, n)) - set(_grams(prompt, n))
    return sum(g in copied for g in grams) / len(grams)


def text_reason(text: str, prompt: str, critique: str = "", instruction: str = ""):
    """The first text rule `text` fails (empty, meta_text, copies_critique, copies_instruction), or None."""
    if not text.strip():
        return "empty"
    if _META.search(text):
        return "meta_text"
    if critique and copied_share(text, critique, prompt) >= COPY_SHARE:
        return "copies_critique"
    if instruction and copied_share(text, instruction, prompt) >= COPY_SHARE:
        return "copies_instruction"
    return None


def class_reason(label: str, kind: str):
    """None when the classifier's label is what a prompt of this kind expects, else "class_<label>"."""
    if kind not in EXPECTED:
        raise ValueError(f"kind must be one of {sorted(EXPECTED)}, got {kind!r}")
    return None if label == EXPECTED[kind] else f"class_{label}"


def first_passing(reasons: list):
    """Index of the first candidate whose reason is None (best-of-n keeps it), or None when all failed."""
    return next((i for i, r in enumerate(reasons) if r is None), None)
