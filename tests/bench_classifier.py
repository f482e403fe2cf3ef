"""Speed of the response classifier on the hand-labelled file: responses per second for the rules
(minicai.refusal.classify) and for the full classifier (minicai.refusal_head.load_classifier().classify_many).

Not a test (timing depends on the machine). Target of issue #13: at least 20 responses/s on a 2-core CPU.
--dev / --test add agreement on that half (the test half is the project's one honest measurement: score it
rarely).
    .venv/bin/python tests/bench_classifier.py [--file data/eval/responses_labelled.jsonl] [--repeats 3] [--limit N] [--dev] [--test]
"""
import argparse
import os
import platform
import time

import torch

from minicai.refusal import agreement, classify, load_labelled, prompt_text
from minicai.refusal_head import load_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=os.path.join(ROOT, "data", "eval", "responses_labelled.jsonl"))
    ap.add_argument("--repeats", type=int, default=3, help="passes over the file; the best is reported")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="time the first N rows only (0 = all)")
    ap.add_argument("--dev", action="store_true", help="also print agreement on the dev half (rules and full)")
    ap.add_argument("--test", action="store_true", help="also print agreement on the test half")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    everything = load_labelled(args.file)
    rows = everything[:args.limit] if args.limit else everything
    items = [dict(r, prompt=prompt_text(r)) for r in rows]
    chars = sum(len(r["response"]) for r in rows) / max(len(rows), 1)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}: {len(rows)} responses (mean {chars:.0f} chars)")
    t = best_time(lambda: [classify(r["request"], r["response"], r["kind"], r["prompt"]) for r in items], args.repeats)
    print(f"  rules: best of {args.repeats}: {t * 1e3:.0f} ms, {len(rows) / t:,.0f} responses/s")
    t0 = time.perf_counter()
    clf = load_classifier()
    print(f"  full classifier: loaded in {time.perf_counter() - t0:.1f} s "
          f"({'rules only' if clf.head is None else clf.model.embed.weight.dtype})")
    t = best_time(lambda: clf.classify_many(items, batch_size=args.batch_size), args.repeats)
    print(f"  full classifier: best of {args.repeats}: {t:.1f} s, {len(rows) / t:,.1f} responses/s")
    for split in ("dev",) * args.dev + ("test",) * args.test:
        part = [r for r in everything if r["split"] == split]
        if part:
            for name, c in (("rules", None), ("full", clf)):
                a = agreement(part, c)
                print(f"  {split} {name}: n={a['n']} binary={a['binary']:.3f} four-class={a['four_class']:.3f}")


if __name__ == "__main__":
    main()
