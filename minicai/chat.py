"""`minicai chat` (interactive, streaming) and `minicai generate` (JSONL in -> JSONL out, resumable).

Both sample with minicai.sampling.generate; chat streams through its per-token callback, so the sampling
math is never duplicated here. Prompts go through the checkpoint's own chat template.

generate: each input row has "prompt" (a str, sent as one user turn; --raw sends it as plain text instead)
or "messages" (a list of {"role", "content"}), checked as training checks prompts (constitution.as_messages:
non-empty contents, alternating user/assistant roles, ending with the user); the output row is the input row
plus "response", "finish_reason" and "n_tokens". Rows already in OUT are skipped, matched by a stable key:
the row's "id", else a hash of its prompt (the n-th copy of a repeated prompt matches the n-th copy in OUT),
so a prompt file edited between runs neither skips a new row nor repeats a done one. Every row is checked
(and encoded, lengths included) before the first one is generated.
"""
import sys

CHAT_HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def add_args(p, name):
    p.add_argument("--model", default="default", help="checkpoint directory ('default' = SmolLM2-135M-Instruct)")
    p.add_argument("--temperature", type=float, default=0.7 if name == "chat" else 0.0)
    p.add_argument("--top-p", type=float, default=0.9 if name == "chat" else 1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=512 if name == "chat" else 256)
    p.add_argument("--seed", type=int, default=None if name == "chat" else 0)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--system", default=None, help="system prompt (default: the chat template's own, if any)")
    p.add_argument("--no-verify", action="store_true", help="skip the check of the weights against checksums.sha256")
    if name == "generate":
        p.add_argument("--prompts", required=True, help="input JSONL: rows with 'prompt' (str) or 'messages' (list)")
        p.add_argument("--out", required=True, help="output JSONL (appended to; existing rows are skipped)")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--raw", action="store_true", help="encode 'prompt' as plain text, without the chat template")


def load(args):
    import torch

    from minicai.checkpoint import resolve_device
    from minicai.pretrained import load_pretrained

    return load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=resolve_device(args.device),
                           verify=not args.no_verify)


def sampling_kwargs(args) -> dict:
    from minicai.sampling import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p, args.min_p)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be > 0, got {args.max_new_tokens}")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p)


def with_system(messages, system):
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def run(args):
    return run_chat(args) if args.command == "chat" else run_generate(args)


# ----------------------------------------------------------------------------------------------- chat

class Streamer:
    """Prints a reply as its tokens arrive. Text is re-decoded from all tokens so far (a token can end in the
    middle of a UTF-8 character); a trailing replacement character waits for the next token."""

    def __init__(self, tokenizer, stop_ids, out=sys.stdout):
        self.tok, self.stop_ids, self.out = tokenizer, set(stop_ids), out
        self.tokens, self.printed = [], 0

    def __call__(self, row, token_id):
        if token_id in self.stop_ids:
            return
        self.tokens.append(token_id)
        text = self.tok.decode(self.tokens)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def run_chat(args):
    import torch

    from minicai.sampling import default_stop_ids, generate

    kwargs = sampling_kwargs(args)
    if sys.stdin is None or sys.stdin.closed:
        raise ValueError("stdin is closed: chat reads your messages from it (use `minicai generate` for a file)")
    model, tok = load(args)
    ctx = model.config.max_position_embeddings
    stop_ids = default_stop_ids(model, tok)
    history = []
    print(f"minicai chat ({args.model}); {CHAT_HELP}")
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return 0
        except (RuntimeError, OSError) as e:  # stdin closed or unreadable mid-session
            raise ValueError(f"stdin: cannot read input ({e})") from None
        cmd = line.strip()
        if cmd == "/exit":
            return 0
        if cmd == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(with_system(history, args.system))
        # drop the oldest exchanges until the prompt and the reply fit the context
        while len(ids) + kwargs["max_new_tokens"] > ctx and len(history) > 1:
            history = history[2:]
            ids = tok.apply_chat_template(with_system(history, args.system))
        if len(ids) + kwargs["max_new_tokens"] > ctx:
            print(f"(message too long: {len(ids)} tokens + {kwargs['max_new_tokens']} new > context {ctx})")
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        streamer = Streamer(tok, stop_ids)
        seed = args.seed if args.seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
        try:
            g = generate(model, [ids], tokenizer=tok, seed=seed, callback=streamer, **kwargs)[0]
            reply = g.text
        except KeyboardInterrupt:  # Ctrl-C stops this reply; what was printed stays in the history
            reply = tok.decode(streamer.tokens)
        history.append({"role": "assistant", "content": reply})
        print()


# ----------------------------------------------------------------------------------------------- generate

def read_prompt_rows(path) -> list:
    """minicai.prompts.read_prompts' rows, checked as training checks prompts but evaluation prompts allowed, each
    with its resume "key": the row's id, else a hash of its prompt with the copy number (see the module docstring).
    Errors name file:line."""
    from minicai.prompts import read_prompts

    seen = {}
    rows = read_prompts([path], ids="row", trainable=False, kinds=None, check=_one_prompt_field)
    for p in rows:
        p["key"] = row_key(p["row"], seen)
    return rows


def _one_prompt_field(row, where):
    if isinstance(row.get("prompt"), str) == isinstance(row.get("messages"), list):
        raise ValueError(f"{where}: need exactly one of 'prompt' (str) or 'messages' (list)")


def row_key(row, seen):
    """Stable resume key of a prompt row or of an output row (which carries its input row's fields); seen
    counts keys so far. None for a repeated id."""
    import hashlib
    import json

    if "id" in row:
        key = f"id:{row['id']}"
        if key in seen:
            return None
        seen[key] = 1
        return key
    text = json.dumps(row.get("messages", row.get("prompt")), sort_keys=True, ensure_ascii=False)
    base = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]
    seen[base] = seen.get(base, 0) + 1
    return f"{base}#{seen[base]}"


def encode_row(tok, p, args) -> list:
    try:
        if args.raw and "prompt" in p["row"]:
            return tok.encode(p["row"]["prompt"], add_bos=True)
        return tok.apply_chat_template(with_system(p["messages"], args.system))
    except ValueError as e:
        raise ValueError(f"{p['where']}: {e}") from None


def run_generate(args):
    import hashlib

    from tqdm import tqdm

    from minicai.io import append_jsonl, check_output_path, read_jsonl_tolerant
    from minicai.sampling import generate

    kwargs = sampling_kwargs(args)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {args.batch_size}")
    rows = read_prompt_rows(args.prompts)
    check_output_path(args.out, "file")
    seen = {}
    done = {row_key(r, seen) for r in read_jsonl_tolerant(args.out)}
    todo = [p for p in rows if p["key"] not in done]
    if not todo:
        print(f"{args.out}: all {len(rows)} rows already done")
        return 0
    model, tok = load(args)
    ctx = model.config.max_position_embeddings
    prompts = [encode_row(tok, p, args) for p in todo]
    for p, ids in zip(todo, prompts):
        if len(ids) + args.max_new_tokens > ctx:
            raise ValueError(f"{p['where']}: prompt of {len(ids)} tokens + --max-new-tokens "
                             f"{args.max_new_tokens} exceeds the context ({ctx})")
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="generate", unit="row")
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        # the seed of a batch depends on its first row's key, so a rerun samples a batch it redoes the same way
        first = int.from_bytes(hashlib.sha256(batch[0]["key"].encode()).digest()[:6], "little")
        outs = generate(model, prompts[start:start + args.batch_size], tokenizer=tok,
                        seed=args.seed * 1_000_003 + first if args.seed is not None else None, **kwargs)
        for p, g in zip(batch, outs):
            append_jsonl(args.out, {**p["row"], "response": g.text, "finish_reason": g.finish_reason,
                                    "n_tokens": len(g.tokens)})
        bar.update(len(batch))
    bar.close()
    print(f"wrote {args.out}")
    return 0
