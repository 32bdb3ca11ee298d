"""Several OpenAI-compatible servers behind one engine (`rollout.urls`): the same completions as one server, work
shared out, a dead or failing server skipped, one error line when all fail, and stage hashes that do not see the
servers. Scripted local servers here; two real llama.cpp servers in the slow test and benchmarks/endpoints.py."""

from __future__ import annotations

import socket
import time

import pytest
from test_engines import Script, client, fake, params  # noqa: F401  (fake is a fixture)

from rmx_local.engines import derive_seed
from rmx_local.engines.openai_engine import OpenAIEngine
from rmx_local.errors import RmxError
from rmx_local.recipe import Recipe

PROMPTS, IDS = [f"p{i}" for i in range(6)], [[5 + i] for i in range(6)]


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_two_servers_share_the_work_and_sample_what_one_does(fake, tokenizer):
    one = client(fake(Script()), tokenizer, concurrency=2).sample(PROMPTS, IDS, params(n=3))
    a, b = Script(), Script()
    engine = client([fake(a), fake(b)], tokenizer, concurrency=2)
    assert engine.sample(PROMPTS, IDS, params(n=3)) == one
    assert len(a.bodies) > 0 and len(b.bodies) > 0
    seeds = sorted(body["seed"] for body in a.bodies + b.bodies)  # each completion asked for once, on one server
    assert seeds == sorted(derive_seed(0, i, j) for i in range(6) for j in range(3))
    assert [e.used for e in engine.fleet.endpoints] == [len(a.bodies), len(b.bodies)]


def test_a_dead_server_is_skipped_at_once(fake, tokenizer):
    one = client(fake(Script()), tokenizer).sample(PROMPTS, IDS, params(n=2))
    live = Script()
    engine = client([dead_url(), fake(live)], tokenizer, concurrency=2, retries=3, backoff_s=5.0)
    start = time.monotonic()
    assert engine.sample(PROMPTS, IDS, params(n=2)) == one
    assert time.monotonic() - start < 4.0  # no 5 s backoff: refused connections move on at once
    dead = engine.fleet.endpoints[0]
    # concurrency 2: both first requests may reach it before the first refusal marks it down
    assert 1 <= dead.failed <= 2 and "not reachable" in dead.last_error and dead.in_flight == 0
    assert engine.fleet.endpoints[1].used == len(live.bodies) >= 12


def test_a_failing_server_is_dropped_after_its_retries(fake, tokenizer):
    one = client(fake(Script()), tokenizer).sample(PROMPTS, IDS, params(n=1))
    bad = Script(default=(500, {"error": "boom"}, {}))
    engine = client([fake(bad), fake(Script())], tokenizer, retries=2)
    assert engine.sample(PROMPTS, IDS, params(n=1)) == one
    assert len(bad.bodies) == 3 and engine.fleet.endpoints[0].failed == 1  # 1 + 2 retries, then marked down


def test_all_servers_down_is_one_error_naming_each(fake, tokenizer):
    urls = [dead_url(), dead_url()]
    engine = client(urls, tokenizer, retries=1)
    with pytest.raises(RmxError) as e:
        engine.sample(PROMPTS[:2], IDS[:2], params(n=1))
    msg = str(e.value)
    assert "all 2 servers failed" in msg and all(u in msg for u in (x + "/completions" for x in urls))
    assert msg.count("not reachable") == 2 and "start the server" in e.value.fix


def test_recipe_urls_checks_and_hashes(tokenizer):
    r = Recipe()
    # the stage keys the version before `urls` (and `[sweep]`) wrote: old run folders still resume
    assert r.section_hash("model", "task", "rollout", "select", "gate", "train", "seed") == "9cb72354a700a0e1"
    assert r.section_hash("model", "task", "rollout", "seed") == "422da66cc358755f"
    r.rollout.engine, r.rollout.urls = "openai", ["http://a:8000/v1", "http://b:8000"]
    engine = OpenAIEngine.from_recipe(r, tokenizer)
    assert [e.url for e in engine.fleet.endpoints] == ["http://a:8000/v1/completions", "http://b:8000/v1/completions"]
    keys = {r.section_hash("model", "task", "rollout", "seed")}
    for urls, base, conc in ([["http://a:8000/v1"]], "", 8), ([], "http://a:8000/v1", 64), ([], "", 8):
        r.rollout.urls, r.rollout.base_url, r.rollout.concurrency = urls, base, conc
        keys.add(r.section_hash("model", "task", "rollout", "seed"))
    assert len(keys) == 1
    r.rollout.n = 4  # what is sampled does count
    assert r.section_hash("model", "task", "rollout", "seed") not in keys
    r.rollout.urls, r.rollout.base_url = ["http://a"], "http://b"
    with pytest.raises(RmxError, match="both base_url and urls"):
        OpenAIEngine.from_recipe(r, tokenizer)
    r.rollout.urls, r.rollout.base_url = ["http://a", "http://a"], ""
    with pytest.raises(RmxError, match="lists a server twice"):
        OpenAIEngine.from_recipe(r, tokenizer)


@pytest.mark.slow
def test_two_llama_cpp_servers_equal_one_and_survive_a_kill():
    """Two real llama.cpp servers (benchmarks/endpoints.py): the same completions as one, token for token, with and
    without the second server SIGKILLed mid-call."""
    pytest.importorskip("llama_cpp.server.app", exc_type=ImportError)
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "endpoints.py"
    spec = importlib.util.spec_from_file_location("endpoints_bench", path)
    bench = sys.modules["endpoints_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {r["row"]: r for r in bench.run_rows(prompts=4, n=4, max_tokens=32, log=lambda s: None)}
    assert all(r["same"] for r in rows.values()), {k: r["differ"] for k, r in rows.items()}
    assert min(rows["2 servers"]["used"]) >= 4  # both servers took a share
    killed = rows["2 servers, 2nd killed"]
    assert killed["down"][1] >= 1 and killed["down"][0] == 0 and killed["tokens"] == rows["1 server"]["tokens"]
