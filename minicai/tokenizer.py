"""Byte-level BPE tokenizer on tiktoken, read from a Hugging Face tokenizer.json, and chat templates.

Families: GPT-2, Llama 3, Qwen2/2.5, SmolLM2 (byte-level BPE with a regex pre-tokenizer). tiktoken merges by
the rank of the merged bytes; HF BPE by the order of its merge list. We rank each token by the position of
the merge that produces it, which gives the same pieces for these vocabularies (the tests check against the
tokenizers library), and map ranks back to ids when they differ. tiktoken also emits a whole pre-token that
is in its ranks without merging, which is the library's `ignore_merges` (set by Llama 3).

Not modelled: an added token's lstrip/rstrip/single_word/normalized options (the families above leave them
off); a Split regex that leaves gaps (tiktoken would drop the gap; the supported patterns match everything);
and merging across a byte that has no token: the library drops such a byte (SmolLM2 lacks a few control
characters) and may merge its neighbours, we drop it after BPE, so "!\x04!" gives "!", "!" rather than "!!".

Security: text from users or models never becomes a special token. `encode` treats "<|im_end|>" as plain
text; `apply_chat_template` lets only the template's own text produce special tokens.

Layer: below minicai.checkpoint (imports nothing of it); reads a directory, "default" is minicai.pretrained's.
"""
import copy
import hashlib
import json
import os
import re
import unicodedata
from functools import lru_cache

import numpy as np
import tiktoken

from minicai.io import atomic_write, checkpoint_dir

# GPT-2's regex (Radford et al., 2019) as the tokenizers library's ByteLevel pre-tokenizer applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) followed by ByteLevel: every digit alone; a whitespace run also ends before a digit.
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Sentinels that mark message content while a chat template renders (Unicode private-use characters).
_OPEN, _CLOSE = "\ue000", "\ue001"


class _Marked(str):
    """Message content between the sentinels. Templates commonly test, compare and trim content
    (`content | trim`, `.strip()`, `if content`): those act on the text inside the sentinels, as they
    would on the unmarked string."""

    def inner(self) -> str:
        return str.__str__(self)[1:-1]

    def strip(self, chars=None):
        return _Marked(_OPEN + self.inner().strip(chars) + _CLOSE)

    def lstrip(self, chars=None):
        return _Marked(_OPEN + self.inner().lstrip(chars) + _CLOSE)

    def rstrip(self, chars=None):
        return _Marked(_OPEN + self.inner().rstrip(chars) + _CLOSE)

    def __len__(self):
        return len(self.inner())

    def __eq__(self, other):
        return self.inner() == (other.inner() if isinstance(other, _Marked) else other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.inner())


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict:
    return {c: b for b, c in byte_to_unicode().items()}


def token_bytes(token: str, path="tokenizer.json") -> bytes:
    dec = unicode_to_byte()
    try:
        return bytes(dec[c] for c in token)
    except KeyError:
        raise ValueError(f"{path}: token {token!r} is not in byte-level form (only byte-level BPE is supported)") from None


def pattern_from_pre_tokenizer(pre, path) -> str:
    """The single regex that reproduces the tokenizer.json pre_tokenizer."""
    def bytelevel(p, use_regex):
        if p.get("type") != "ByteLevel" or p.get("add_prefix_space", False) or p.get("use_regex", True) != use_regex:
            return False
        return True

    if pre is None:
        raise ValueError(f"{path}: pre_tokenizer is null (only byte-level BPE is supported)")
    if bytelevel(pre, True):
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and bytelevel(steps[1], True):
            return GPT2_DIGITS_PATTERN
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {})
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and bytelevel(steps[1], False)):
            return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{path}: unsupported pre_tokenizer {json.dumps(pre)[:200]}")


class Tokenizer:
    def __init__(self, tokenizer_json: dict, config: dict | None = None, path="tokenizer.json", chat_template=None):
        self.path = path
        self.tokenizer_json = tokenizer_json
        self.config = config or {}
        model = tokenizer_json.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model.type {model.get('type')!r} is not supported (byte-level BPE only)")
        norm = tokenizer_json.get("normalizer")
        if norm is not None and norm.get("type") != "NFC":
            raise ValueError(f"{path}: normalizer {norm.get('type')!r} is not supported (null or NFC)")
        self.nfc = norm is not None
        vocab = model["vocab"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]

        specials = {t["content"] for t in tokenizer_json.get("added_tokens", []) if t.get("special")}
        # tiktoken merges the adjacent pair whose joined bytes rank lowest: rank single bytes first, then each
        # token by the position of the first merge that makes it. Special tokens get no rank: BPE must never
        # produce them from text. tiktoken also emits a whole pre-token found in its ranks without merging,
        # which is the library's ignore_merges (Llama 3); so tokens no merge reaches are ranked only then.
        ranks, rank_to_id = {}, []    # bytes -> rank, rank -> id

        def add(tok):
            b = token_bytes(tok, path)
            if b not in ranks:
                ranks[b] = len(rank_to_id)
                rank_to_id.append(vocab[tok])

        by_id = sorted(vocab, key=vocab.get)
        for tok in by_id:
            if tok not in specials and len(token_bytes(tok, path)) == 1:
                add(tok)
        # A byte without a token (SmolLM2 has none for a few control characters) is dropped by the library.
        # tiktoken needs every byte ranked: give it a rank that maps to id -1, removed after encoding.
        for b in sorted(set(range(256)) - {b[0] for b in ranks if len(b) == 1}):
            ranks[bytes([b])] = len(rank_to_id)
            rank_to_id.append(-1)
        self.drops_bytes = -1 in rank_to_id
        for a, b in merges:
            if a + b not in vocab:
                raise ValueError(f"{path}: merge {a!r} {b!r} yields a token missing from the vocab")
            add(a + b)
        if model.get("ignore_merges"):
            for tok in by_id:
                if tok not in specials:
                    add(tok)
        self.rank_to_id = np.array(rank_to_id, dtype=np.int64)
        self.identity = bool((self.rank_to_id == np.arange(len(rank_to_id))).all())
        self.id_to_bytes = {i: token_bytes(t, path) for t, i in vocab.items() if t not in specials}  # for decode

        self.special = {}        # content -> id, for added tokens flagged special
        self.added_plain = {}    # non-special added tokens, which the tokenizers library also splits out of text
        for t in tokenizer_json.get("added_tokens", []):
            (self.special if t.get("special") else self.added_plain)[t["content"]] = t["id"]
        self.id_to_special = {i: s for s, i in {**self.added_plain, **self.special}.items()}
        self.special_ids = set(self.special.values())
        self.vocab_size = max([*vocab.values(), *self.id_to_special]) + 1
        pattern = pattern_from_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), path)
        self.enc = tiktoken.Encoding(name=f"minicai:{path}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._added_re = (re.compile("|".join(re.escape(s) for s in sorted(self.added_plain, key=len, reverse=True)))
                          if self.added_plain else None)
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True)))
        self.chat_template = chat_template

        def special_id(key):
            tok = self.config.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            return self.special.get(tok, self.added_plain.get(tok)) if tok else None

        self.bos_token_id = special_id("bos_token")
        self.eos_token_id = special_id("eos_token")
        self.pad_token_id = special_id("pad_token")

    # -- encoding ------------------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self.enc.encode_ordinary(text)
        if self.identity:
            return ranks
        ids = self.rank_to_id[ranks].tolist()
        return [i for i in ids if i >= 0] if self.drops_bytes else ids

    def encode(self, text: str, add_bos: bool = False) -> list:
        """Token ids of `text` as plain text: special-token strings inside it stay plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        if self._added_re is None:
            return ids + self._encode_ordinary(text)
        pos = 0
        for m in self._added_re.finditer(text):
            ids += self._encode_ordinary(text[pos:m.start()]) + [self.added_plain[m.group()]]
            pos = m.end()
        return ids + self._encode_ordinary(text[pos:])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (a character cut between tokens) becomes U+FFFD, as in the library."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self.id_to_special:
                out.append(b"".join(run).decode("utf-8", errors="replace"))
                run = []
                if not (skip_special_tokens and i in self.special_ids):
                    out.append(self.id_to_special[i])
            elif i in self.id_to_bytes:
                run.append(self.id_to_bytes[i])
            else:
                raise ValueError(f"token id {i} is outside the vocabulary ({self.vocab_size})")
        out.append(b"".join(run).decode("utf-8", errors="replace"))
        return "".join(out)

    # -- chat ----------------------------------------------------------------------------------------
    def render_chat(self, messages, add_generation_prompt=True, mark_content=False) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.path}: this tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m or not isinstance(m["content"], str):
                raise ValueError(f"messages[{i}] must be a dict with 'role' and str 'content', got {m!r}")
            if _OPEN in m["content"] or _CLOSE in m["content"]:
                raise ValueError(f"messages[{i}] contains a reserved private-use character (U+E000/U+E001)")
        if mark_content:
            messages = [{**m, "content": _Marked(_OPEN + m["content"] + _CLOSE)} for m in messages]
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text("bos_token"), eos_token=self._token_text("eos_token"))

    def _token_text(self, key):
        tok = self.config.get(key)
        return tok.get("content", "") if isinstance(tok, dict) else (tok or "")

    def apply_chat_template(self, messages, add_generation_prompt=True) -> list:
        """Ids of the conversation rendered by the checkpoint's own template. Special tokens come only from
        the template's text; message contents are encoded as plain text."""
        text = self.render_chat(messages, add_generation_prompt, mark_content=True)
        ids, buf, in_content = [], [], False
        for part in re.split(f"([{_OPEN}{_CLOSE}])", text):
            if part == _OPEN or part == _CLOSE:
                if in_content == (part == _OPEN):  # a template that splits or slices content loses track of it
                    raise ValueError(f"{self.path}: the chat template cuts message content apart; "
                                     "cannot tell its text from the template's")
                in_content = part == _OPEN
                continue
            if in_content:
                buf.append(part)
                continue
            pos = 0
            for m in self._special_re.finditer(part) if self.special else ():
                buf.append(part[pos:m.start()])
                ids += self.encode("".join(buf)) + [self.special[m.group()]]
                buf, pos = [], m.end()
            buf.append(part[pos:])
        if in_content:
            raise ValueError(f"{self.path}: the chat template cuts message content apart; "
                             "cannot tell its text from the template's")
        return ids + self.encode("".join(buf))

    # -- saving --------------------------------------------------------------------------------------
    def save(self, out_dir) -> None:

        atomic_write(os.path.join(out_dir, "tokenizer.json"), json.dumps(self.tokenizer_json, ensure_ascii=False))
        config = dict(self.config)
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))


@lru_cache(maxsize=8)
def _compile_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


_BUILT = {}  # sha256 of the three files -> Tokenizer: building the BPE ranks takes ~1 s, and a pipeline loads
            # the same tokenizer (copied into every checkpoint it writes) a dozen times


def load_tokenizer(path) -> Tokenizer:
    """Tokenizer of a checkpoint directory (tokenizer.json, tokenizer_config.json, optional chat_template.jinja).
    A directory only: minicai.load_tokenizer / minicai.pretrained.load_tokenizer also take "default".
    Files with the same bytes as an earlier call's give a shallow copy of that tokenizer (it is never mutated)."""
    path = checkpoint_dir(path)
    tj_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tj_path):
        raise FileNotFoundError(f"{tj_path}: missing (minicai reads byte-level BPE tokenizers from tokenizer.json)")
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file, "rb") as f:
                digest.update(name.encode() + f.read())
    key = digest.hexdigest()
    if key not in _BUILT:
        _BUILT[key] = build_tokenizer(path, tj_path)
    tok = copy.copy(_BUILT[key])
    tok.path = tj_path
    return tok


def build_tokenizer(path, tj_path) -> Tokenizer:
    with open(tj_path, encoding="utf-8") as f:
        try:
            tj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{tj_path}: malformed JSON ({e})") from None
    config = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: malformed JSON ({e})") from None
    template = config.pop("chat_template", None)
    if isinstance(template, list):  # named templates: take "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    return Tokenizer(tj, config, path=tj_path, chat_template=template)
