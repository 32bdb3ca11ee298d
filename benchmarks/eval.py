"""Print the tables of docs/eval.md from `rmx-local eval --out` folders (and, with --run, make them first).

    python benchmarks/eval.py --run RUN_DIR --gsm8k data/gsm8k/test.jsonl --out eval-quickstart   # measure, then print
    python benchmarks/eval.py --out eval-quickstart                                                 # print only

--run scores `base` and RUN_DIR (greedy, both runtimes, --kl) on the run's held-out split
(RUN_DIR/problems.json:eval), on arith:two_step and arith:word (--limit 100 each) and on a seeded GSM8K test
subset (--gsm8k-limit, --gsm8k-max-tokens), one `rmx-local eval` call after another. Every finished
OUT/<name>/summary.json is then printed as two Markdown tables: accuracy per runtime with the paired
difference (z), KL and the torch / llama.cpp agreement; and problems/s, wall and CPU seconds per scoring.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def measure(args: argparse.Namespace) -> None:
    common = ["--runtime", "torch,llama_cpp", "--kl", "--threads", str(args.threads), "--batch-size", "512", "--plain"]
    calls = {"heldout": ["--data", f"{args.run}/problems.json:eval"],
             "arith": ["--data", "arith:two_step", "--data", "arith:word", "--limit", "100"]}
    if args.gsm8k:
        calls["gsm8k"] = ["--data", args.gsm8k, "--limit", str(args.gsm8k_limit), "--max-tokens", str(args.gsm8k_max_tokens)]
    for name, extra in calls.items():
        cmd = [sys.executable, "-m", "rmx_local", "eval", "base", args.run, *extra, *common, "--out", str(Path(args.out) / name)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def tables(out: Path) -> str:
    acc, speed = [], []
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        for e in s["data"]:
            r = e["results"]
            adapted = next(label for label in r["torch"] if label != "base")

            def cell(rt: str, label: str) -> str:
                return f"{r[rt][label]['accuracy']:.3f} ± {r[rt][label]['se']:.3f}"

            def delta(rt: str) -> str:
                v = r[rt][adapted]["vs_first"]
                return f"{v['diff']:+.3f} ± {v['se']:.3f} ({v['z']:+.1f})" if v["z"] is not None else f"{v['diff']:+.3f}"

            agree = e["agreement"]
            acc.append(f"| {e['spec']} ({e['problems']}; max {s['decoding']['max_tokens']} tokens) | {cell('torch', 'base')} | "
                       f"{cell('torch', adapted)} | {delta('torch')} | {cell('llama_cpp', 'base')} | {cell('llama_cpp', adapted)} | "
                       f"{delta('llama_cpp')} | {r['torch'][adapted].get('kl', float('nan')):.3f} | "
                       f"{agree['base']['same_answer']:.2f} / {agree[adapted]['same_answer']:.2f} |")
            for rt in ("torch", "llama_cpp"):
                for label in ("base", adapted):
                    x = r[rt][label]
                    speed.append(f"| {e['spec']} | {rt} | {'base' if label == 'base' else 'adapted'} | {x['problems_per_s']:.2f} | "
                                 f"{x['seconds']:.0f} | {x['cpu_seconds']:.0f} | {x['mean_tokens']:.1f} | {x['unparseable']:.3f} |")
    return "\n".join([
        "| data (problems) | torch base | torch adapted | adapted - base (z) | llama.cpp base | llama.cpp adapted | "
        "adapted - base (z) | KL (nats/token) | same answer torch vs llama.cpp (base / adapted) |",
        "|---|---|---|---|---|---|---|---|---|", *acc, "",
        "| data | runtime | model | problems/s | wall s | CPU s | tokens | unparseable |",
        "|---|---|---|---:|---:|---:|---:|---:|", *speed])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="folder holding one `rmx-local eval --out` folder per call")
    ap.add_argument("--run", help="measure first: the run folder to score against `base`")
    ap.add_argument("--gsm8k", help="a GSM8K test JSONL to add")
    ap.add_argument("--gsm8k-limit", type=int, default=30)
    ap.add_argument("--gsm8k-max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.run:
        measure(args)
    print(tables(Path(args.out)))


if __name__ == "__main__":
    main()
