"""Rollouts from any OpenAI-compatible `/v1/completions` server: vLLM, llama.cpp's servers, hosted APIs.

Recipe (`[rollout]`): engine = "openai", base_url (".../v1"; a bare "http://host:port" gets "/v1" added) or
urls = [several such URLs] (engines/endpoints.py: requests shared out, a failed server skipped), api_model (default:
the recipe's `model`), api_key_env (the variable holding a bearer key; unset is fine for local servers),
concurrency (requests in flight per server), timeout_s (per socket operation of one request), retries.

What is sent per request: the chat-templated prompt *text*, max_tokens, temperature, top_p, seed, stop = the
training tokenizer's EOS text, `n` when several completions are wanted, and a few optional fields that make
llama.cpp servers sample plainly (top_k=0, min_p=0, repeat_penalty=1; their defaults are 40 / 0.05 / 1.1),
plus vLLM's `return_token_ids` (the sampled ids come back) and `add_special_tokens=false` (the prompt text is
taken as it is: a chat template's text already holds any BOS). Servers ignore fields they do not know. A server that refuses the optional fields or `n`
(HTTP 400/422) is asked again without them, once, and not sent them again. A server that answers `n` with fewer
choices (llama-cpp-python ignores `n`), or with n identical ones (seeded `n` bugs of some vLLM versions), gets
the missing completions as single requests, each with its own seed.
Returned ids are used only when they decode exactly to the returned text; otherwise the text is re-tokenized
with the training tokenizer (`add_special_tokens=False`).

Failures: connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with exponential backoff
(Retry-After honoured, capped at 60 s); then, or at once for other HTTP errors, one `RmxError` names the URL and
the fix. With several servers, a server that refuses connections (while another is live) or exhausts its retries
is marked down and the request goes to another one; the call fails only when all are down. The fleet is treated
as one server for the fallbacks below (one server refusing the optional fields or `n` drops them for all).
Nothing partial is returned: the call raises and the caller's journal keeps what finished before.

vLLM (one or several GPUs), e.g. on a GPU box:
    vllm serve Qwen/Qwen2.5-1.5B-Instruct --generation-config vllm --tensor-parallel-size 2
    # or --data-parallel-size 4 for a small model on 4 GPUs (one replica each; best throughput)
and in the recipe:
    [rollout]
    engine = "openai"
    base_url = "http://gpu-box:8000/v1"
    api_model = "Qwen/Qwen2.5-1.5B-Instruct"   # the name vLLM serves (its --served-model-name)
    concurrency = 64                             # vLLM batches concurrent requests itself
`--generation-config vllm` stops vLLM from applying the model's own top_k / repetition_penalty defaults, which
would silently change the sampling distribution (vLLM rejects top_k=0 in some versions; the fallback above then
drops it). The served model must be the recipe's base model: its tokenizer is assumed to equal the training one.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from rmx_local.backends import Progress, SampleParams
from rmx_local.engines.base import derive_seed, eos_texts, retokenize
from rmx_local.engines.endpoints import Endpoint, Fleet
from rmx_local.errors import RmxError

# llama.cpp servers: plain sampling (their defaults are top_k 40, min_p 0.05, repeat_penalty 1.1);
# vLLM: return the sampled ids, and do not add a BOS to a prompt text that already carries the template's own.
OPTIONAL_FIELDS = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "return_token_ids": True, "add_special_tokens": False}
MAX_BACKOFF_S = 60.0


class _Refused(Exception):
    """A non-retryable HTTP answer (4xx other than 429)."""

    def __init__(self, code: int, body: str, url: str = ""):
        super().__init__(f"HTTP {code}: {body}")
        self.code, self.body, self.url = code, body, url


class _Down(Exception):
    """One server gave up (retries exhausted, or a refused connection while another server is live)."""

    def __init__(self, cause: Exception | None):
        super().__init__(_describe(cause))
        self.cause = cause


def completions_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RmxError(f"rollout.base_url = {base_url!r} is not an http(s) URL", fix='write e.g. base_url = "http://127.0.0.1:8000/v1"')
    if url.endswith("/completions"):
        return url
    return url + ("/v1" if parsed.path in ("", "/") else "") + "/completions"


class OpenAIEngine:
    name = "openai"

    def __init__(self, base_url: str | list[str], model: str, tokenizer: Any, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 120.0, retries: int = 4, backoff_s: float = 1.0, api_key_env: str = "OPENAI_API_KEY"):
        self.fleet = Fleet([completions_url(u) for u in ([base_url] if isinstance(base_url, str) else base_url)])
        self.url = ", ".join(e.url for e in self.fleet.endpoints)
        self.model, self.tokenizer, self.api_key, self.api_key_env = model, tokenizer, api_key, api_key_env
        self.concurrency, self.timeout_s = max(1, concurrency), timeout_s
        self.retries, self.backoff_s = max(0, retries), backoff_s
        self.stops = eos_texts(tokenizer)
        self.send_n = True  # False once the server answered `n` with fewer choices or refused it
        self.optional = dict(OPTIONAL_FIELDS)  # emptied once the server refused them
        self.requests = 0  # HTTP attempts made (for tests and logs)

    @classmethod
    def from_recipe(cls, recipe: Any, tokenizer: Any) -> "OpenAIEngine":
        r = recipe.rollout
        if r.base_url and r.urls:
            raise RmxError("rollout: both base_url and urls are set", fix="list every server in rollout.urls and remove base_url")
        if not (r.base_url or r.urls):
            raise RmxError('rollout.engine = "openai" needs rollout.base_url', fix='set base_url = "http://127.0.0.1:8000/v1" under [rollout]'
                           ' (or urls = [...] for several servers)')
        if len(set(r.urls)) < len(r.urls):
            raise RmxError(f"rollout.urls lists a server twice: {r.urls}", fix="list each server once (raise rollout.concurrency instead)")
        key = os.environ.get(r.api_key_env) if r.api_key_env else None
        return cls(r.urls or r.base_url, r.api_model or recipe.model, tokenizer, key, r.concurrency, r.timeout_s, r.retries,
                   api_key_env=r.api_key_env)

    # ---- sampling ---------------------------------------------------------------------------------
    def sample(self, prompts: list[str], prompt_ids: list[list[int]], params: SampleParams,
               progress: Progress | None = None) -> list[list[list[int]]]:
        greedy = params.temperature == 0
        n = 1 if greedy else params.n
        results: list[list[list[int] | None]] = [[None] * n for _ in prompts]
        pool = ThreadPoolExecutor(max_workers=self.concurrency * len(self.fleet))
        jobs: dict[Future, tuple[int, int, int]] = {}
        abort = threading.Event()  # set when the call fails: in-flight requests stop retrying

        def submit(i: int, first: int, count: int) -> None:
            seed = derive_seed(params.seed, i, first)
            jobs[pool.submit(self._complete, prompts[i], params, count, seed, abort)] = (i, first, count)

        try:
            for i in range(len(prompts)):
                if self.send_n or n == 1:
                    submit(i, 0, n)
                else:
                    for j in range(n):
                        submit(i, j, 1)
            while jobs:
                done, _ = wait(list(jobs), return_when=FIRST_COMPLETED)
                for future in done:
                    i, first, count = jobs.pop(future)
                    completions = future.result()[:count]
                    if count > 1 and len(completions) == count and all(c == completions[0] for c in completions[1:]):
                        completions = completions[:1]  # n copies of one sample (a seeded-`n` bug): treat as no `n`
                    for k, ids in enumerate(completions):
                        results[i][first + k] = ids
                        if progress:
                            progress(len(ids))
                    if len(completions) < count:  # the server ignores `n`: ask for the rest one by one
                        self.send_n = False
                        for j in range(first + len(completions), first + count):
                            submit(i, j, 1)
        finally:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)
        assert all(ids is not None for row in results for ids in row)
        if greedy and params.n > 1:
            return [[list(row[0]) for _ in range(params.n)] for row in results]  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _complete(self, prompt: str, params: SampleParams, count: int, seed: int,
                  abort: threading.Event | None = None) -> list[list[int]]:
        greedy = params.temperature == 0
        body = {"model": self.model, "prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_p": 1.0 if greedy else params.top_p, "seed": seed, "stop": self.stops}
        extras = dict(self.optional, **({"n": count} if count > 1 else {}))
        try:
            data = self._post({**body, **extras}, abort)
        except _Refused as e:
            if not extras or e.code not in (400, 422):
                raise self._error(f"refused the request ({e})", e, e.url) from None
            self.optional, self.send_n = {}, False  # retry plainly, once; later requests stay plain
            data = self._post(body, abort)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
            raise RmxError(f"rollout engine openai: {self.url} answered without completion choices: {str(data)[:200]}",
                           fix="point rollout.base_url at an OpenAI-compatible server's /v1 (completions, not chat)")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [self._ids(c) for c in choices]

    def _ids(self, choice: dict) -> list[int]:
        """Training-tokenizer ids of one choice: the server's ids when they decode to its text, else re-tokenized."""
        text = choice["text"]
        for stop in self.stops:
            text = text[: -len(stop)] if stop and text.endswith(stop) else text
        ids = choice.get("token_ids")
        if isinstance(ids, list) and all(isinstance(t, int) for t in ids):
            eos = {self.tokenizer.eos_token_id}
            while ids and ids[-1] in eos:
                ids = ids[:-1]
            if self.tokenizer.decode(ids) == text:
                return ids
        return retokenize(self.tokenizer, text)

    # ---- HTTP with retries and failover --------------------------------------------------------------
    def _post(self, body: dict, abort: threading.Event | None = None) -> Any:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        avoid: Endpoint | None = None
        cause: Exception | None = None
        while True:
            endpoint = self.fleet.acquire(avoid)
            if endpoint is None:  # every server is down
                raise self._error(f"failed: {self.fleet.describe()}", cause, f"all {len(self.fleet)} servers")
            try:
                return self._post_to(endpoint, data, headers, abort)
            except _Down as e:
                if len(self.fleet) == 1:
                    raise self._error(f"failed after {self.retries + 1} attempts ({e})", e.cause, endpoint.url) from None
                self.fleet.mark_down(endpoint, str(e))
                cause, avoid = e.cause, endpoint
            finally:
                self.fleet.release(endpoint)

    def _post_to(self, endpoint: Endpoint, data: bytes, headers: dict, abort: threading.Event | None) -> Any:
        """One server, `retries` retries with backoff; `_Down` when it gives up."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if abort is not None and abort.is_set():
                raise RmxError(f"rollout engine openai: {endpoint.url}: request abandoned, another one failed")
            self.requests += 1
            delay = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S) * random.uniform(1.0, 1.2)
            try:
                with urlopen(Request(endpoint.url, data=data, headers=headers, method="POST"), timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except HTTPError as e:
                text = e.read().decode("utf-8", "replace")[:300].strip()
                if e.code != 429 and e.code < 500:
                    raise _Refused(e.code, text, endpoint.url) from None
                last = e
                after = e.headers.get("Retry-After") if e.headers else None
                if after and after.strip().replace(".", "", 1).isdigit():
                    delay = min(float(after), MAX_BACKOFF_S)
            except (URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timeout, truncated
                last = e
                if _is_refused(e) and self.fleet.others_live(endpoint):
                    raise _Down(e) from None  # nobody listens there: go elsewhere now, not after the backoffs
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise RmxError(f"rollout engine openai: {endpoint.url} answered with something that is not JSON: {raw[:120]!r}",
                                   fix="point rollout.base_url at an OpenAI-compatible server's /v1") from None
            if attempt < self.retries:
                if abort is not None:
                    abort.wait(delay)
                else:
                    time.sleep(delay)
        raise _Down(last)

    def _error(self, what: str, e: Exception | None, url: str | None = None) -> RmxError:
        code = getattr(e, "code", None)
        if code in (401, 403):
            fix = f"put a valid API key in ${self.api_key_env} (rollout.api_key_env)"
        elif code == 404:
            fix = f"check rollout.base_url (should end in /v1) and rollout.api_model ({self.model!r}: the name the server serves)"
        elif code == 429:
            fix = "lower rollout.concurrency or raise rollout.retries"
        elif code is not None and code >= 500:
            fix = "check the server's log; raise rollout.retries if it is only overloaded"
        elif code is not None:
            fix = "check rollout.api_model and the server's supported request fields"
        elif _is_timeout(e):
            fix = "raise rollout.timeout_s, or lower rollout.concurrency / rollout.max_tokens"
        else:
            fix = ("start the server (e.g. `python -m llama_cpp.server --model MODEL.gguf --port 8000`, or `vllm serve MODEL`)"
                   " or correct rollout.base_url")
        return RmxError(f"rollout engine openai: {url or self.url} {what}", fix=fix)


def _is_refused(e: Exception | None) -> bool:
    """Nobody listens (or the connection was reset): a server that is down, not one that is slow."""
    reason = getattr(e, "reason", e)
    return isinstance(reason, (ConnectionRefusedError, ConnectionResetError))


def _is_timeout(e: Exception | None) -> bool:
    return isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)


def _describe(e: Exception | None) -> str:
    if isinstance(e, HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if _is_timeout(e):
        return "timed out"
    reason = getattr(e, "reason", None) if isinstance(e, URLError) else e
    return f"not reachable: {reason}" if isinstance(e, URLError) else f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def llama_cpp_server(gguf_path: str, threads: int = 0, n_ctx: int = 2048, startup_s: float = 120.0,
                     on_start: Callable[[subprocess.Popen], None] | None = None, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run llama-cpp-python's OpenAI server on a free 127.0.0.1 port for the block and yield its base URL.

    For tests and benchmarks (needs `pip install "llama-cpp-python[server]"`). Threads default to all cores
    (the server's own default is half); per-token logits are off (the server's default keeps them all).
    `on_start` gets the server's process once it answers (tests kill it with it); `extra`: more server flags.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
           "--logits_all", "False", "--verbose", "False", *extra]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                try:
                    with urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                        break
                except (URLError, OSError):
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-600:].decode("utf-8", "replace").strip()
                    raise RmxError(f"llama_cpp.server did not start within {startup_s:.0f}s: {tail}",
                                   fix='pip install "llama-cpp-python[server]"')
                time.sleep(0.25)
            if on_start is not None:
                on_start(proc)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
