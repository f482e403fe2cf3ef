"""Speed of the response classifier (minicai.refusal.classify) on the hand-labelled file: responses per second.

Not a test (timing depends on the machine). Target of issue #13: at least 20 responses/s on a 2-core CPU.
    .venv/bin/python tests/bench_classifier.py [--file data/eval/responses_labelled.jsonl] [--repeats 5]
"""
import argparse
import os
import platform
import time

from minicai.refusal import agreement, classify, load_labelled, prompt_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=os.path.join(ROOT, "data", "eval", "responses_labelled.jsonl"))
    ap.add_argument("--repeats", type=int, default=5, help="passes over the file; the best is reported")
    args = ap.parse_args()
    rows = load_labelled(args.file)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for r in rows:
            classify(r["request"], r["response"], r["kind"], prompt_text(r))
        best = min(best, time.perf_counter() - t0)
    chars = sum(len(r["response"]) for r in rows) / max(len(rows), 1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs: {len(rows)} responses "
          f"(mean {chars:.0f} chars), best of {args.repeats}: {best * 1e3:.1f} ms, {len(rows) / best:,.0f} responses/s")
    for split in ("dev", "test"):
        part = [r for r in rows if r["split"] == split]
        if part:
            a = agreement(part)
            print(f"  {split}: n={a['n']} binary={a['binary']:.3f} four-class={a['four_class']:.3f}")


if __name__ == "__main__":
    main()
