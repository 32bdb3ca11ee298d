"""Rollouts from 1 vs 2 OpenAI-compatible servers (`rollout.urls`): tokens/s, the same completions, one server killed.

Two llama-cpp-python servers (`python -m llama_cpp.server`) on the embedded SmolLM2-135M-Instruct GGUF, each with
`--threads` threads, on 127.0.0.1. Rows: one server; both servers (the engine shares requests out); both servers
with the second one SIGKILLed once a third of the tokens are made (the run must finish on the first). Every row
samples the same chat prompts with the same seeds; "same" says whether its completions equal the one-server
row's, token for token. A llama.cpp server is deterministic per seed only with `--n_batch 1 --n_ubatch 1`
(the default here): with its default batch sizes, the prompt prefix it reuses from the previous request changes
the batch split and so the last bits of the logits, and 2 of 32 completions of one server differed after another
request history (`--fast` shows it: the "1 server, again" row). tok/s = completion tokens / wall time of the
call. Shortcut: both servers share this machine's cores, so 2 servers can only gain when 1 thread each leaves a
core idle.

    python benchmarks/endpoints.py                  # 8 prompts x 4 completions x 48 tokens, 1 thread per server
    python benchmarks/endpoints.py --fast           # the servers' default batch sizes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmx_local.backends import SampleParams  # noqa: E402
from rmx_local.engines.openai_engine import OpenAIEngine, llama_cpp_server  # noqa: E402
from rmx_local.models import resolve_model  # noqa: E402

QUESTIONS = [f"What is {a} {op} {b}?" for op in "+-*" for a in range(2, 10) for b in range(2, 10)]
SUFFIX = "\nThink briefly, then end with: The answer is N."


def prompts_for(tok, count: int) -> tuple[list[str], list[list[int]]]:
    texts = [tok.apply_chat_template([{"role": "user", "content": q + SUFFIX}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS[:count]]
    return texts, [tok.encode(t, add_special_tokens=False) for t in texts]


def run_rows(prompts: int = 8, n: int = 4, max_tokens: int = 48, threads: int = 1, concurrency: int = 2,
             exact: bool = True, log=print) -> list[dict]:
    from transformers import AutoTokenizer

    source = resolve_model("embedded:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(source.hf_path)
    texts, ids = prompts_for(tok, prompts)
    params = SampleParams(n, 0.8, 0.95, max_tokens, seed=7)
    procs = []
    with contextlib.ExitStack() as stack:
        extra = ("--n_batch", "1", "--n_ubatch", "1") if exact else ()
        urls = [stack.enter_context(llama_cpp_server(source.gguf_path, threads=threads, n_ctx=1024, on_start=procs.append,
                                                     extra=extra)) for _ in range(2)]

        def call(which: list[str], kill_after: int | None = None) -> dict:
            engine = OpenAIEngine(which, "smollm2", tok, concurrency=concurrency, timeout_s=120, retries=2, backoff_s=0.5)
            made = [0]

            def progress(k: int) -> None:
                made[0] += k
                if kill_after is not None and made[0] >= kill_after and procs[1].poll() is None:
                    threading.Thread(target=lambda: (os.kill(procs[1].pid, signal.SIGKILL), procs[1].wait()), daemon=True).start()

            start = time.monotonic()
            out = engine.sample(texts, ids, params, progress)
            seconds = time.monotonic() - start
            tokens = sum(len(c) for row in out for c in row)
            return {"out": out, "s": seconds, "tokens": tokens, "tok/s": tokens / seconds,
                    "used": [e.used for e in engine.fleet.endpoints], "down": [e.failed for e in engine.fleet.endpoints]}

        call(urls[:1])  # warm both servers' first request (page cache, allocations) out of the timings
        call(urls[1:])
        rows = {"1 server": call(urls[:1]), "1 server, again": call(urls[:1]), "2 servers": call(urls)}
        total = rows["1 server"]["tokens"]
        rows["2 servers, 2nd killed"] = call(urls, kill_after=total // 3)
    ref = rows["1 server"]["out"]
    table = [{"row": k, **{x: v[x] for x in ("s", "tokens", "tok/s", "used", "down")}, "same": v["out"] == ref,
              "differ": [(i, j) for i, row in enumerate(v["out"]) for j, c in enumerate(row) if c != ref[i][j]]}
             for k, v in rows.items()]
    log(f"{prompts} prompts x {n} completions x <= {max_tokens} tokens, llama.cpp servers with {threads} thread(s) each, "
        f"{'--n_batch 1 --n_ubatch 1' if exact else 'default batch sizes'}, concurrency {concurrency} per server, "
        f"{os.cpu_count()} cores")
    log("| endpoints | s | tokens | tok/s | requests per server | marked down | same completions as 1 server |")
    log("|---|---:|---:|---:|---|---|---|")
    for r in table:
        same = "yes" if r["same"] else f"no: {len(r['differ'])} of {prompts * n} differ"
        log(f"| {r['row']} | {r['s']:.1f} | {r['tokens']} | {r['tok/s']:.0f} | {r['used']} | {r['down']} | {same} |")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--fast", action="store_true", help="the servers' default batch sizes (faster prompts, not deterministic)")
    a = ap.parse_args()
    run_rows(a.prompts, a.n, a.max_tokens, a.threads, a.concurrency, exact=not a.fast)


if __name__ == "__main__":
    main()
