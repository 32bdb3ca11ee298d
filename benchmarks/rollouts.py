"""Rollout throughput: torch backend vs llama.cpp engine vs OpenAI engine (local llama.cpp server) vs raw llama.cpp.

Same chat prompts (single-digit arithmetic, SmolLM2 chat template), same sampling (temperature, top-p, seed),
same token budget for every row; tokens/s = completion tokens produced / wall time of the whole call (prompt
processing included, model loading excluded). The anchor is llama.cpp's own decode of the same GGUF: a tight
loop of single-sequence `llama_decode` + the same sampler chain, all cores, timing the token loop only (prompt
evaluation excluded, so the anchor is the pure decode speed and the ratio is conservative for the engines).

    python benchmarks/rollouts.py                       # all rows, embedded SmolLM2-135M-Instruct (Q4_1)
    python benchmarks/rollouts.py --max-tokens 256 --n 8 --skip torch,openai --threads 1
    python benchmarks/rollouts.py --prompts 55 --n 8 --max-tokens 64 --parallel 16,32 --skip torch,openai --brief  # quickstart-shaped
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rmx_local.backends import SampleParams  # noqa: E402
from rmx_local.engines import derive_seed  # noqa: E402
from rmx_local.engines.llama_cpp_engine import LlamaCppEngine, cpu_count  # noqa: E402
from rmx_local.models import resolve_model  # noqa: E402

SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
BRIEF = "\nThink briefly, then end with: The answer is N."  # the quickstart's instruction
FIRST = ["What is 7 + 5?", "What is 9 - 4?", "What is 6 * 3?", "What is 8 + 9?", "What is 4 * 7?", "What is 9 - 2?",
         "What is 3 + 8?", "What is 5 * 5?"]
QUESTIONS = list(dict.fromkeys(FIRST + [f"What is {a} {op} {b}?" for op in "+-*" for a in range(1, 10) for b in range(1, 10)]))


def raw_llama_cpp(engine: LlamaCppEngine, prompts: list[str], params: SampleParams) -> tuple[float, int]:
    """Physical anchor: one sequence at a time, `llama_batch_get_one` + `llama_decode` + the same sampler chain.

    Returns (seconds spent in the token loop, tokens made): prompt evaluation is not timed, so this is the pure
    single-sequence decode speed of the GGUF on these cores.
    """
    ll = engine.ll
    engine._ensure_context(512 + params.max_tokens)
    made, seconds = 0, 0.0
    for i, prompt in enumerate(prompts):
        toks = engine.tokenize(prompt)
        for j in range(params.n):
            ll.llama_memory_clear(engine.mem, True)
            sampler = engine._sampler(params, derive_seed(params.seed, i, j))
            arr = (ll.llama_token * len(toks))(*toks)
            ll.llama_decode(engine.ctx, ll.llama_batch_get_one(arr, len(toks)))
            one = (ll.llama_token * 1)()
            start = time.perf_counter()
            for _ in range(params.max_tokens):
                t = ll.llama_sampler_sample(sampler, engine.ctx, -1)
                if ll.llama_vocab_is_eog(engine.vocab, t):
                    break
                made += 1
                one[0] = t
                ll.llama_decode(engine.ctx, ll.llama_batch_get_one(one, 1))
            seconds += time.perf_counter() - start
            ll.llama_sampler_free(sampler)
    return seconds, made


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    made = fn()
    return time.perf_counter() - start, made


def count(out) -> int:
    return sum(len(c) for row in out for c in row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--parallel", default="1,8", help="llama_cpp engine slot counts to try")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: torch,openai")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp and torch threads (0 = all cores)")
    ap.add_argument("--brief", action="store_true", help="the quickstart's brief-answer instruction instead of CoT")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from transformers import AutoTokenizer

    source = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(source.hf_path)
    suffix = BRIEF if args.brief else SUFFIX
    prompts = [tok.apply_chat_template([{"role": "user", "content": q + suffix}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS[: args.prompts]]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    params = SampleParams(n=args.n, temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=0)
    print(f"model {args.model} ({Path(source.gguf_path).name}), {len(prompts)} prompts x {args.n} completions, "
          f"max_tokens {args.max_tokens}, T={args.temperature}, top_p=0.95, {cpu_count()} cores, "
          f"threads {args.threads or cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
    rows: list[tuple[str, float, int]] = []

    def report(name: str, seconds: float, made: int) -> None:
        rows.append((name, seconds, made))
        print(f"  {name:<40} {made:>6} tok {seconds:>7.2f} s {made / seconds:>8.1f} tok/s", flush=True)

    anchor_engine = LlamaCppEngine(source.gguf_path, tok, threads=args.threads, parallel=1)
    anchor_engine._load()
    report("raw llama.cpp decode (1 seq, anchor)", *raw_llama_cpp(anchor_engine, prompts, params))
    anchor_engine.close()
    for p in map(int, args.parallel.split(",")):
        engine = LlamaCppEngine(source.gguf_path, tok, threads=args.threads, parallel=p)
        engine.sample(prompts[:1], ids[:1], SampleParams(1, 0.0, 1.0, 2, 0))  # load + build the context
        report(f"llama_cpp engine (parallel={p})", *timed(lambda: count(engine.sample(prompts, ids, params))))
        engine.close()
    if "openai" not in skip:
        from rmx_local.engines.openai_engine import OpenAIEngine, llama_cpp_server

        with llama_cpp_server(source.gguf_path, threads=args.threads) as url:
            engine = OpenAIEngine(url, "local", tok, concurrency=2, timeout_s=300, retries=1)
            report("openai engine -> llama_cpp.server", *timed(lambda: count(engine.sample(prompts, ids, params))))
    if "torch" not in skip:
        from rmx_local.backends.torch_backend import TorchBackend
        from rmx_local.recipe import Recipe

        recipe = Recipe(model=args.model, threads=args.threads)
        recipe.rollout.batch_size = len(prompts) * args.n
        backend = TorchBackend.load(source, recipe)
        backend.generate(ids[:1], SampleParams(1, 0.0, 1.0, 2, 0))  # warm-up
        report(f"torch backend (batch {recipe.rollout.batch_size})", *timed(lambda: count(backend.generate(ids, params))))

    anchor = rows[0][2] / rows[0][1]
    print(f"\n| row | tokens | seconds | tok/s | x raw llama.cpp |\n|---|---:|---:|---:|---:|")
    for name, seconds, made in rows:
        print(f"| {name} | {made} | {seconds:.2f} | {made / seconds:.1f} | {made / seconds / anchor:.2f} |")


if __name__ == "__main__":
    main()
