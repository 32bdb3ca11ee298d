"""Rollout engines: engine choice, the OpenAI client's retries and errors (against a scripted local HTTP server),
and the llama.cpp engine / llama.cpp server on the embedded SmolLM2 GGUF (token-exact prompt/completion boundary)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace

import pytest
from conftest import serve_http

from rmx_local.backends import SampleParams
from rmx_local.engines import BackendEngine, derive_seed, make_engine, pick_engine_name
from rmx_local.engines.openai_engine import OpenAIEngine, completions_url
from rmx_local.errors import RmxError
from rmx_local.recipe import Recipe

MAX_TOKENS = 12
QUESTIONS = ["What is 7 + 5?", "What is 9 - 4?", "What is 3 * 3?"]


def params(n=2, temperature=0.8, seed=0, max_tokens=MAX_TOKENS):
    return SampleParams(n=n, temperature=temperature, top_p=0.95, max_tokens=max_tokens, seed=seed)


# ---- engine choice ----------------------------------------------------------------------------------
def test_backend_engine_is_lazy_and_delegates():
    calls = []

    class FakeBackend:
        def generate(self, prompts, p, progress=None):
            return [[[len(x)]] * p.n for x in prompts]

    engine = BackendEngine(lambda: calls.append(1) or FakeBackend())
    assert calls == []
    assert engine.sample(["ab", "c"], [[1, 2], [3]], params(n=2)) == [[[2], [2]], [[1], [1]]]
    engine.sample(["a"], [[1]], params(n=2))
    assert calls == [1]


def test_make_engine_choices(tokenizer, monkeypatch):
    import rmx_local.engines as engines

    recipe = Recipe()
    no_gguf = SimpleNamespace(spec="org/m", gguf_path=None)
    gguf = SimpleNamespace(spec="m.gguf", gguf_path="/x/m.gguf")
    assert make_engine(recipe, no_gguf, tokenizer, lambda: None).name == "backend"
    monkeypatch.setattr(engines, "has_accelerator", lambda: False)
    monkeypatch.setattr(engines, "llama_cpp_importable", lambda: True)
    assert pick_engine_name("auto", gguf) == "llama_cpp"
    assert pick_engine_name("auto", no_gguf) == "backend"
    monkeypatch.setattr(engines, "has_accelerator", lambda: True)
    assert pick_engine_name("auto", gguf) == "backend"
    recipe.rollout.engine = "llama_cpp"
    with pytest.raises(RmxError, match="needs a GGUF"):
        make_engine(recipe, no_gguf, tokenizer, lambda: None)
    recipe.rollout.engine = "openai"
    with pytest.raises(RmxError, match="needs rollout.base_url"):
        make_engine(recipe, no_gguf, tokenizer, lambda: None)
    recipe.rollout.base_url = "http://127.0.0.1:9"
    monkeypatch.setenv("RMX_TEST_KEY", "sk-test")
    recipe.rollout.api_key_env = "RMX_TEST_KEY"
    engine = make_engine(recipe, no_gguf, tokenizer, lambda: None)
    assert engine.name == "openai" and engine.url == "http://127.0.0.1:9/v1/completions" and engine.model == recipe.model
    assert engine.api_key == "sk-test"
    recipe.rollout.engine, recipe.rollout.batch_size = "llama_cpp", 64
    engine = make_engine(recipe, gguf, tokenizer, lambda: None)  # nothing loaded yet
    assert engine.name == "llama_cpp" and engine.model is None and engine.parallel == 32  # capped


def test_seeds_and_urls():
    seeds = {derive_seed(0, i, j) for i in range(20) for j in range(20)}
    assert len(seeds) == 400 and max(seeds) < 2**31 and derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert completions_url("http://h:8000/v1/") == "http://h:8000/v1/completions"
    assert completions_url("https://h") == "https://h/v1/completions"
    with pytest.raises(RmxError, match="not an http"):
        completions_url("h:8000")


# ---- OpenAI client against a scripted server ---------------------------------------------------------
class Script:
    """What the fake server answers, request by request: (status, body dict, headers) or ("sleep", seconds)."""

    def __init__(self, *steps, default=None):
        self.steps, self.default, self.bodies = list(steps), default, []


def _serve(script: Script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script.bodies.append(body)
            script.auth = self.headers.get("Authorization")
            step = script.steps.pop(0) if script.steps else script.default or (200, None, {})
            if step[0] == "sleep":
                time.sleep(step[1])
                return
            status, payload, headers = step
            if payload is None:  # echo a completion whose text encodes the seed
                payload = {"choices": [{"index": 0, "text": f"s{body['seed'] % 97}", "finish_reason": "stop"}]}
            raw = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    return serve_http(Handler)


@pytest.fixture
def fake():
    servers = []

    def start(script):
        server = _serve(script)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def client(url, tokenizer, **kw):
    kw = {"concurrency": 1, "timeout_s": 2.0, "retries": 2, "backoff_s": 0.01, **kw}
    return OpenAIEngine(url, "m", tokenizer, **kw)


def test_openai_fans_out_when_n_is_ignored(fake, tokenizer):
    script = Script()
    engine = client(fake(script), tokenizer, concurrency=4)
    engine.api_key = "sk-1"
    out = engine.sample(["p0", "p1"], [[5], [6]], params(n=3), progress=(counted := []).append)
    assert script.auth == "Bearer sk-1"
    expected = [[tokenizer.encode(f"s{derive_seed(0, i, j) % 97}", add_special_tokens=False) for j in range(3)] for i in range(2)]
    assert out == expected and sum(counted) == sum(len(x) for row in out for x in row)
    assert engine.send_n is False and len(script.bodies) == 6
    first = script.bodies[0]
    assert first["n"] == 3 and first["top_k"] == 0 and first["stop"] == ["<|im_end|>"] and first["max_tokens"] == MAX_TOKENS
    assert engine.sample(["p0"], [[5]], params(n=3)) == expected[:1]  # same seeds, now without `n`
    assert all("n" not in b for b in script.bodies[6:])


def test_openai_uses_n_and_checked_token_ids(fake, tokenizer):
    ids = tokenizer.encode("12", add_special_tokens=False)
    choices = [{"index": 1, "text": "12", "token_ids": ids + [tokenizer.eos_token_id]},  # ids decode to the text: used
               {"index": 0, "text": "3<|im_end|>", "token_ids": [4, 4]}]  # ids disagree with the text: re-tokenized
    engine = client(fake(Script(default=(200, {"choices": choices}, {}))), tokenizer)
    out = engine.sample(["p"], [[5]], params(n=2))
    assert out == [[tokenizer.encode("3", add_special_tokens=False), ids]] and engine.requests == 1


def test_openai_fans_out_when_n_returns_copies(fake, tokenizer):
    same = {"choices": [{"index": k, "text": "7"} for k in range(3)]}
    script = Script((200, same, {}))
    engine = client(fake(script), tokenizer)
    out = engine.sample(["p"], [[5]], params(n=3))
    assert out[0][0] == tokenizer.encode("7", add_special_tokens=False) and len(script.bodies) == 3
    assert [b["seed"] for b in script.bodies] == [derive_seed(0, 0, j) for j in range(3)] and engine.send_n is False


def test_openai_greedy_sends_one_request(fake, tokenizer):
    script = Script()
    out = client(fake(script), tokenizer).sample(["p"], [[5]], params(n=4, temperature=0))
    assert len(script.bodies) == 1 and "n" not in script.bodies[0] and len(out[0]) == 4 and out[0][0] == out[0][3]


def test_openai_drops_refused_optional_fields(fake, tokenizer):
    script = Script((400, {"error": "top_k must be -1 (disable), or at least 1, got 0."}, {}))
    engine = client(fake(script), tokenizer)
    assert len(engine.sample(["p"], [[5]], params(n=2))[0]) == 2
    assert "top_k" in script.bodies[0] and all("top_k" not in b and "n" not in b for b in script.bodies[1:])


@pytest.mark.parametrize("status", [429, 500, 503])
def test_openai_retries_rate_limits_and_server_errors(fake, tokenizer, status):
    script = Script((status, {"error": "busy"}, {"Retry-After": "0"}))
    engine = client(fake(script), tokenizer)
    out = engine.sample(["p"], [[5]], params(n=1))
    assert out == [[tokenizer.encode(f"s{derive_seed(0, 0, 0) % 97}", add_special_tokens=False)]]
    assert engine.requests == 2


def test_openai_honours_retry_after(fake, tokenizer):
    engine = client(fake(Script((429, {}, {"Retry-After": "0.3"}))), tokenizer)
    start = time.monotonic()
    engine.sample(["p"], [[5]], params(n=1))
    assert time.monotonic() - start >= 0.3


def test_openai_gives_up_with_one_clear_error(fake, tokenizer):
    engine = client(fake(Script(default=(500, {"error": "boom"}, {}))), tokenizer, retries=3)
    with pytest.raises(RmxError) as e:
        engine.sample(["p"], [[5]], params(n=2))
    assert engine.requests == 4 and "failed after 4 attempts (HTTP 500" in str(e.value) and "server's log" in e.value.fix
    assert engine.url in str(e.value)


def test_openai_timeout(fake, tokenizer):
    engine = client(fake(Script(default=("sleep", 1.5))), tokenizer, timeout_s=0.2, retries=1)
    with pytest.raises(RmxError) as e:
        engine.sample(["p"], [[5]], params(n=1))
    assert engine.requests == 2 and "timed out" in str(e.value) and "rollout.timeout_s" in e.value.fix


def test_openai_server_down(tokenizer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = client(f"http://127.0.0.1:{port}/v1", tokenizer, retries=2)
    with pytest.raises(RmxError) as e:
        engine.sample(["p", "q"], [[5], [6]], params(n=2))
    msg = str(e.value)
    assert f"127.0.0.1:{port}/v1/completions" in msg and "not reachable" in msg and "start the server" in e.value.fix
    assert 3 <= engine.requests <= 4  # the first failing request stops the call; nothing partial is returned


@pytest.mark.parametrize("status,fix", [(401, "API key"), (404, "rollout.api_model")])
def test_openai_client_errors_are_not_retried(fake, tokenizer, status, fix):
    engine = client(fake(Script(default=(status, {"error": "no"}, {}))), tokenizer)
    engine.optional, engine.send_n = {}, False
    with pytest.raises(RmxError) as e:
        engine.sample(["p"], [[5]], params(n=1))
    assert engine.requests == 1 and f"HTTP {status}" in str(e.value) and fix in e.value.fix


def test_openai_malformed_answer(fake, tokenizer):
    engine = client(fake(Script(default=(200, {"choices": []}, {}))), tokenizer)
    with pytest.raises(RmxError, match="without completion choices"):
        engine.sample(["p"], [[5]], params(n=1))


# ---- llama.cpp on the embedded SmolLM2 GGUF ------------------------------------------------------------
LLAMA_THREADS = 1  # tests share 2 busy cores: OpenMP threads that wait on each other are far slower there


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from rmx_local.models import resolve_model

    source = resolve_model("embedded:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(source.hf_path)
    suffix = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    prompts = [tok.apply_chat_template([{"role": "user", "content": q + suffix}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    return SimpleNamespace(source=source, tok=tok, prompts=prompts,
                           ids=[tok.encode(p, add_special_tokens=False) for p in prompts])


@pytest.fixture(scope="module")
def llama_engine(smol):
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(smol.source.gguf_path, smol.tok, threads=LLAMA_THREADS, parallel=4)
    yield engine
    engine.close()


def test_llama_cpp_prompt_specials_and_greedy_boundary(smol, llama_engine, monkeypatch):
    tok = smol.tok
    for prompt, ids in zip(smol.prompts, smol.ids):
        assert llama_engine.tokenize(prompt) == ids  # <|im_start|> etc. parsed as specials, no BOS added
    assert smol.ids[0][0] == tok.convert_tokens_to_ids("<|im_start|>")
    greedy = params(n=2, temperature=0)
    raw = llama_engine.sample_tokens(smol.prompts, greedy)
    out = llama_engine.sample(smol.prompts, smol.ids, greedy, progress=(seen := []).append)
    assert llama_engine.same_vocab and out == raw  # same vocab: the sampled ids themselves
    assert sum(seen) == sum(len(row[0]) for row in out)
    monkeypatch.setattr(llama_engine, "same_vocab", False)  # a foreign GGUF: text re-tokenized
    retok = llama_engine.sample(smol.prompts, smol.ids, greedy)
    for prompt, ids, (a, b), r in zip(smol.prompts, smol.ids, retok, raw):
        assert a == b and 0 < len(a) <= MAX_TOKENS and tok.eos_token_id not in a
        text = llama_engine.detokenize(r[0])
        assert tok.decode(ids + a) == prompt + text == tok.decode(ids + r[0]) and "<|im_end|>" not in text
        assert a == tok.encode(text, add_special_tokens=False)  # may merge "\n" "\n" into "\n\n", hence ids above


def test_llama_cpp_greedy_matches_llama_generate(smol, llama_engine):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=smol.source.gguf_path, n_ctx=256, n_threads=LLAMA_THREADS, verbose=False)
    try:
        ref, vocab = [], llama_cpp.llama_model_get_vocab(llm.model)
        for t in llm.generate(smol.ids[0], temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(vocab, t) or len(ref) == MAX_TOKENS:
                break
            ref.append(t)
    finally:
        llm.close()
    assert llama_engine.sample_tokens(smol.prompts[:1], params(n=1, temperature=0)) == [[ref]]


def test_llama_cpp_sampling_is_seeded_and_independent_of_batching(smol, llama_engine):
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine

    p = params(n=3, temperature=1.0, max_tokens=8)
    a = llama_engine.sample_tokens(smol.prompts[:2], p)
    assert a == llama_engine.sample_tokens(smol.prompts[:2], p)
    assert len({tuple(c) for row in a for c in row}) > 1  # different samples
    assert a != llama_engine.sample_tokens(smol.prompts[:2], params(n=3, temperature=1.0, max_tokens=8, seed=1))
    other = LlamaCppEngine(smol.source.gguf_path, smol.tok, threads=LLAMA_THREADS, parallel=1)
    try:  # one KV stream per sequence: a sequence's logits do not depend on its batch-mates
        assert other.sample_tokens(smol.prompts[:2], p) == a
    finally:
        other.close()


def test_llama_cpp_shared_preamble_and_consecutive_steps(smol, llama_engine, monkeypatch):
    """Prompts sampled together (chat preamble decoded once, slots compacted at the tail) give each prompt the
    completions it gets alone, and every decode step's sequence ids are one consecutive run from 0."""
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine

    greedy = params(n=1, temperature=0)
    alone = [llama_engine.sample_tokens([p], greedy)[0] for p in smol.prompts]
    toks = [llama_engine.tokenize(p) for p in smol.prompts]
    assert llama_engine._decode_preamble(toks) > 20  # the system preamble of the chat template
    steps, decode = [], llama_engine._decode

    def record():
        b = llama_engine.batch
        if b.logits[0]:  # a sampling step (prefills ask for no logits)
            steps.append([b.seq_id[k][0] for k in range(b.n_tokens)])
        decode()

    monkeypatch.setattr(llama_engine, "_decode", record)
    assert llama_engine.sample_tokens(smol.prompts, greedy) == alone
    sampled = llama_engine.sample_tokens(smol.prompts, params(n=3, temperature=1.0, max_tokens=24))
    assert any(len(s) < 4 for s in steps) and all(s == list(range(len(s))) for s in steps)
    one = LlamaCppEngine(smol.source.gguf_path, smol.tok, threads=LLAMA_THREADS, parallel=1)
    try:  # one slot: no batch-mates, nothing to compact
        assert one.sample_tokens(smol.prompts, params(n=3, temperature=1.0, max_tokens=24)) == sampled
    finally:
        one.close()


def test_llama_cpp_compact_moves_live_sequences_down():
    """At the tail, live sequences move (one KV stream copy each) into the lowest free slots."""
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine

    calls = []
    engine = LlamaCppEngine("unused.gguf", None, parallel=6)
    engine.mem = "mem"
    engine.ll = SimpleNamespace(llama_memory_seq_cp=lambda m, a, b, p0, p1: calls.append(("cp", a, b)),
                                llama_memory_seq_rm=lambda m, a, p0, p1: calls.append(("rm", a)))
    live, free = {1: "a", 4: "b", 5: "c"}, [0, 2, 3]
    engine._compact(live, free)
    assert live == {0: "c", 1: "a", 2: "b"} and sorted(free) == [3, 4, 5]
    assert calls == [("cp", 5, 0), ("rm", 5), ("cp", 4, 2), ("rm", 4)]


@pytest.fixture(scope="module")
def llama_server(smol):
    pytest.importorskip("llama_cpp.server.app", exc_type=ImportError)
    from rmx_local.engines.openai_engine import llama_cpp_server

    with llama_cpp_server(smol.source.gguf_path, threads=LLAMA_THREADS, n_ctx=512, startup_s=90) as url:
        yield url


def test_openai_engine_against_llama_cpp_server(smol, llama_engine, llama_server):
    engine = OpenAIEngine(llama_server, "smollm2", smol.tok, concurrency=2, timeout_s=60, retries=1)
    greedy = engine.sample(smol.prompts[:2], smol.ids[:2], params(n=2, temperature=0))
    raw = llama_engine.sample_tokens(smol.prompts[:2], params(n=2, temperature=0))
    assert greedy == [[smol.tok.encode(llama_engine.detokenize(c), add_special_tokens=False) for c in row] for row in raw]
    for ids, row in zip(smol.ids, greedy):
        assert smol.tok.decode(ids + row[0]).startswith(smol.tok.decode(ids))
    sampled = engine.sample(smol.prompts[:1], smol.ids[:1], params(n=3, temperature=1.0, max_tokens=8))
    assert len(sampled[0]) == 3 and all(0 < len(c) <= 8 for c in sampled[0]) and engine.send_n is False
    assert sampled == engine.sample(smol.prompts[:1], smol.ids[:1], params(n=3, temperature=1.0, max_tokens=8))
