"""The `minicai` console script. Each subcommand lives in its module as `add_args(parser)` + `run(args)`."""
import argparse
import importlib
import sys

# name -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "setup": ("minicai.pretrained", "convert the default model (SmolLM2-135M-Instruct GGUF) into the cache, once"),
    "convert-gguf": ("minicai.gguf_import", "convert a GGUF file into a Hugging Face-format directory"),
    "chat": ("minicai.chat", "chat with a model in the terminal (streaming)"),
    "generate": ("minicai.chat", "sample responses for a JSONL file of prompts (resumable)"),
    "eval": ("minicai.evaluate", "score checkpoints on harmlessness, over-refusal, jailbreaks, helpfulness, honesty"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minicai", description="Constitutional AI from scratch in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        getattr(importlib.import_module(module), "add_args")(p, name)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return getattr(importlib.import_module(args._module), "run")(args) or 0
    except (ValueError, OSError, FloatingPointError) as e:  # bad input: one clear line, no traceback
        print(f"minicai {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
