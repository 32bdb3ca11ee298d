"""`rmx-local eval`: statistics against hand-computed values, every TARGET kind on a tiny random model, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from rmx_local.adapter import save_peft
from rmx_local.backends import SampleParams
from rmx_local.errors import RmxError
from rmx_local.data import load_problems
from rmx_local.eval import EvalOptions, few_shot_examples, parse_runtimes, run_eval
from rmx_local.scoring import ProblemRecord, Prompt, majority_correct, metrics, paired, pass_at_k, score_problems
from rmx_local.export.check import random_adapter
from rmx_local.export.gguf_adapter import write_gguf_adapter
from rmx_local.targets import resolve_target, resolve_targets
from rmx_local.tasks import Problem, arith_problems
from rmx_local.ui import UI
from conftest import char_tokenizer, tiny_llama

pytest.importorskip("datasets")


def _record(correct: list[bool], parsed: list[str | None] | None = None) -> ProblemRecord:
    parsed = parsed or ["1"] * len(correct)
    return ProblemRecord("p", "q", "1", ["x"] * len(correct), parsed, correct, [3] * len(correct))


# ---------------------------------------------------------------- statistics

def test_pass_at_k_matches_hand_computed_values() -> None:
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k: some sample of any k is right
    assert pass_at_k(8, 1, 4) == pytest.approx(0.5)  # 1 - C(7,4)/C(8,4) = 1 - 35/70


def test_majority_vote() -> None:
    assert majority_correct(_record([True, False, False, False], ["3", "5", "5", None])) is False
    assert majority_correct(_record([False, True, True, False], ["3", "5", "5", None])) is True
    assert majority_correct(_record([True, False], ["3", "5"])) is True  # a tie goes to the earliest answer
    assert majority_correct(_record([False, False], [None, None])) is False


def test_metrics_and_paired_difference() -> None:
    first = [_record([True, True, False, False]), _record([False] * 4), _record([True] * 4)]
    other = [_record([True] * 4), _record([False, False, False, True], ["2", None, None, "1"]), _record([True] * 4)]
    m = metrics(other)
    scores = [1.0, 0.25, 1.0]
    mean = sum(scores) / 3
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / 2 / 3)
    assert m["accuracy"] == pytest.approx(mean) and m["se"] == pytest.approx(se)
    assert m["unparseable"] == pytest.approx(2 / 12) and m["mean_tokens"] == 3
    assert m["pass@k"]["1"] == pytest.approx(mean) and m["pass@k"]["4"] == pytest.approx(1.0)
    assert m["pass@k"]["2"] == pytest.approx((1 + (1 - 3 / 6) + 1) / 3)
    assert m["maj@k"] == pytest.approx(2 / 3)  # problem 2: "2" and "1" tie, the earliest ("2") is wrong
    d = paired(first, other)
    diffs = [0.5, 0.25, 0.0]
    dse = math.sqrt(sum((x - 0.25) ** 2 for x in diffs) / 2 / 3)
    assert d["diff"] == pytest.approx(0.25) and d["se"] == pytest.approx(dse) and d["z"] == pytest.approx(0.25 / dse)
    assert paired(first, first)["z"] is None


class ScriptedBackend:
    """A backend whose completions are fixed texts: the scorer's grading, grouping and counting, exactly."""

    def __init__(self, texts: list[str]):
        self.tokenizer = char_tokenizer()
        self.texts, self.calls = texts, []

    def generate(self, prompts, params, progress=None):
        self.calls.append(len(prompts))
        start = sum(self.calls[:-1])
        return [[self.tokenizer.encode(self.texts[start + i], add_special_tokens=False)] * params.n for i in range(len(prompts))]


def test_score_problems_grades_counts_and_groups() -> None:
    problems = [Problem(f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(5)]
    backend = ScriptedBackend(["The answer is 1.", "so 3", "no idea", "\\boxed{4}", "The answer is 5"])
    records = score_problems(backend, problems, Prompt("chat", "Answer."), SampleParams(1, 0.0, 1.0, 8, 0), batch_size=2)
    assert backend.calls == [2, 2, 1]
    assert [r.correct[0] for r in records] == [True, False, False, True, True]
    assert [r.parsed[0] for r in records] == ["1", "3", None, "4", "5"]
    assert records[0].tokens == [16] and records[0].gold == "1" and records[2].completions == ["no idea"]


def test_few_shot_scoring_grades_up_to_the_next_question() -> None:
    problems = [Problem("p0", "What is 1 + 1?", "2"), Problem("p1", "What is 2 + 2?", "4")]
    texts = ["1 + 1 = 2. The answer is 2.\n\nQuestion: What is 3 + 3?\nAnswer: The answer is 6.", "The answer is 4."]
    shots = tuple(arith_problems("single", 2, seed=0))
    records = score_problems(ScriptedBackend(texts), problems, Prompt("raw", "Answer.", shots), SampleParams(1, 0.0, 1.0, 99, 0))
    assert [r.correct[0] for r in records] == [True, True] and records[0].completions == ["1 + 1 = 2. The answer is 2."]
    assert records[0].prompt_ids[:20] == char_tokenizer().encode(f"Question: {shots[0].question}", add_special_tokens=False)[:20]
    zero_shot = score_problems(ScriptedBackend(texts), problems, Prompt("raw", "Answer."), SampleParams(1, 0.0, 1.0, 99, 0))
    assert [r.correct[0] for r in zero_shot] == [False, True]  # the last answer, 6, without the cut


def test_few_shot_examples_are_training_problems() -> None:
    held_out = load_problems("arith:single", limit=200, seed=3)
    shots = few_shot_examples("arith:single", held_out, 3, seed=3)
    assert shots == tuple(arith_problems("single", 3, seed=3)) and few_shot_examples("arith:single", held_out, 0, 3) == ()
    assert not {p.question for p in shots} & {p.question for p in held_out}
    with pytest.raises(RmxError, match="exceed the 255 distinct"):
        few_shot_examples("arith:single", load_problems("arith:single", limit=254, seed=3), 3, seed=3)
    with pytest.raises(RmxError, match="--shots 3 with --data d.jsonl"):
        few_shot_examples("d.jsonl", held_out, 3, seed=3)


# ---------------------------------------------------------------- targets on a tiny random model

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny model folder, a second one of another shape, a PEFT adapter, a run folder, a GGUF adapter."""
    root = tmp_path_factory.mktemp("eval-models")
    tok = char_tokenizer()
    for name, kw in (("tiny", {}), ("wide", {"hidden_size": 48, "num_attention_heads": 4})):
        tiny_llama(len(tok), **kw).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    cfg = json.loads((root / "tiny" / "config.json").read_text())
    adapter = random_adapter(cfg, "llama", base_model=str(root / "tiny"), rank=4, b_std=0.5, targets=("q_proj", "v_proj"))
    save_peft(adapter, root / "peft")
    run = root / "run"
    save_peft(adapter, run / "adapter")
    (run / "recipe.toml").write_text(f'model = {json.dumps(str(root / "tiny"))}\n[task]\ntemplate = "raw"\n'
                                     'instruction = "Reply with a number."\n[eval]\nmax_tokens = 5\n')
    write_gguf_adapter(adapter, root / "adapter.gguf", "f32")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    return root


def test_every_target_kind_resolves(models: Path) -> None:
    tiny = str(models / "tiny")
    run = resolve_target(str(models / "run"))
    assert (run.kind, run.base_spec, run.template, run.instruction, run.max_tokens) == \
        ("run", tiny, "raw", "Reply with a number.", 5)
    peft = resolve_target(str(models / "peft"))
    assert (peft.kind, peft.base_spec, peft.template) == ("peft", tiny, None)
    inside = resolve_target(str(models / "run" / "adapter"))  # a run's own adapter folder takes the run's prompt
    assert (inside.kind, inside.instruction) == ("peft", "Reply with a number.")
    gguf = resolve_target(str(models / "adapter.gguf"))
    assert (gguf.kind, gguf.base_spec, gguf.gguf_adapter) == ("gguf_adapter", tiny, models / "adapter.gguf")
    for module, (a, b) in run.adapter.weights.items():  # read back from GGUF: the same LoRA (f32)
        assert abs(gguf.adapter.weights[module][1] - b).max() < 1e-6 and abs(gguf.adapter.weights[module][0] - a).max() < 1e-6
    assert resolve_target(tiny).kind == "model" and resolve_target("some-org/some-model").kind == "model"
    base, _ = resolve_targets(["base", str(models / "peft")])
    assert (base.kind, base.base_spec, base.adapter) == ("base", tiny, None)


def test_bad_targets_are_one_line(models: Path) -> None:
    with pytest.raises(RmxError, match="another base"):  # a GGUF adapter for the other base: shapes differ
        resolve_targets([str(models / "adapter.gguf")], base=str(models / "wide"))
    with pytest.raises(RmxError, match="no adapter target names a base model"):
        resolve_targets(["base"])
    with pytest.raises(RmxError, match="needs another target"):
        resolve_target("base")
    with pytest.raises(RmxError, match="not an embedded model"):
        resolve_target(str(models / "nothing-here"))


def test_base_refuses_adapters_of_different_bases(models: Path, tmp_path: Path) -> None:
    cfg = json.loads((models / "wide" / "config.json").read_text())
    save_peft(random_adapter(cfg, "llama", base_model=str(models / "wide"), rank=2, targets=("q_proj",)), tmp_path / "w")
    with pytest.raises(RmxError, match="different bases"):
        resolve_targets(["base", str(models / "peft"), str(tmp_path / "w")])


def test_architecture_mismatch_is_refused(models: Path, tmp_path: Path) -> None:
    cfg = json.loads((models / "tiny" / "config.json").read_text())
    save_peft(random_adapter(cfg, "qwen2", base_model=str(models / "tiny"), rank=2, targets=("q_proj",)), tmp_path / "q")
    with pytest.raises(RmxError, match="made for a qwen2 model"):
        resolve_targets([str(tmp_path / "q")])


def test_runtime_not_installed_is_one_error(monkeypatch) -> None:
    import rmx_local.eval as ev

    monkeypatch.setattr(ev, "llama_cpp_importable", lambda: False)
    with pytest.raises(RmxError, match="needs llama-cpp-python"):
        parse_runtimes(["torch,llama_cpp"])
    with pytest.raises(RmxError, match="'mlx'"):
        parse_runtimes(["mlx"])
    assert parse_runtimes(["torch", "torch"]) == ["torch"]


def _opts(models: Path, **kw) -> EvalOptions:
    return EvalOptions(data=[str(models / "d.jsonl")], threads=1, batch_size=8, **kw)


def test_eval_scores_every_target_kind_and_writes_out(models: Path, tmp_path: Path) -> None:
    specs = ["base", str(models / "run"), str(models / "peft"), str(models / "adapter.gguf"), str(models / "tiny")]
    out = tmp_path / "out"
    summary = run_eval(specs, _opts(models, kl=True, out=str(out)), UI(rich=False))
    [entry] = summary["data"]
    results = entry["results"]["torch"]
    assert list(results) == ["base", *specs[1:]] and entry["problems"] == 4
    assert all(r["samples"] == 1 and 0 <= r["accuracy"] <= 1 and r["mean_tokens"] <= 5 for r in results.values())
    assert all(summary["targets"][i]["prompt"] == {"template": "raw", "instruction": "Reply with a number.", "shots": []}
               for i in range(len(specs)))  # the run's prompt for every target
    assert "vs_first" not in results["base"] and results[specs[4]]["vs_first"]["diff"] == 0.0  # the base model again
    kls = [results[s]["kl"] for s in specs[1:4]]
    assert kls[0] > 1e-4 and kls[0] == pytest.approx(kls[1], rel=1e-4) and kls[0] == pytest.approx(kls[2], rel=1e-3)
    assert "kl" not in results["base"] and "kl" not in results[specs[4]]
    lines = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and set(lines[0]["results"]) == {f"{s} [torch]" for s in ["base", *specs[1:]]}
    assert set(lines[0]["results"]["base [torch]"]) == {"completion", "parsed", "correct"}
    assert json.loads((out / "summary.json").read_text())["decoding"]["max_tokens"] == 5


def test_sampled_eval_reports_pass_at_k_and_maj(models: Path) -> None:
    summary = run_eval(["base", str(models / "peft")], _opts(models, n_samples=4, temperature=1.0, template="chat",
                                                            instruction="Go."), UI(rich=False))
    r = summary["data"][0]["results"]["torch"][str(models / "peft")]
    assert r["samples"] == 4 and set(r["pass@k"]) == {"1", "2", "4"} and "maj@k" in r
    assert r["pass@k"]["1"] == pytest.approx(r["accuracy"]) and r["pass@k"]["4"] >= r["pass@k"]["1"]
    assert summary["targets"][1]["prompt"] == {"template": "chat", "instruction": "Go.", "shots": []}


def test_failures_write_nothing(models: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(RmxError, match="no field"):
        run_eval(["base", str(models / "peft")], _opts(models, answer_field="gold", out=str(out)), UI(rich=False))
    import rmx_local.eval as ev

    def boom(*a, **k):
        raise RmxError("scoring failed")

    monkeypatch.setattr(ev, "score_problems", boom)
    with pytest.raises(RmxError, match="scoring failed"):
        run_eval(["base", str(models / "peft")], _opts(models, out=str(out)), UI(rich=False))
    assert not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(RmxError, match="not an earlier eval output"):
        run_eval(["base"], _opts(models, out=str(tmp_path / "busy"), base=str(models / "tiny")), UI(rich=False))
    with pytest.raises(RmxError, match="needs the torch runtime"):
        run_eval(["base"], _opts(models, kl=True, runtimes=["llama_cpp"]), UI(rich=False))


def test_cli_prints_a_table_and_one_line_errors(models: Path) -> None:
    from rmx_local.cli import main

    ok = CliRunner().invoke(main, ["eval", "base", str(models / "run"), "--data", str(models / "d.jsonl"), "--plain",
                                   "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert "4 problems, greedy, max 5 tokens" in ok.output and "prompt for base: template 'raw'" in ok.output
    bad = CliRunner().invoke(main, ["eval", str(models / "run"), "--data", "arith:hard", "--plain"])
    assert bad.exit_code == 2 and "unknown generator difficulty" in bad.output


def test_run_pipeline_uses_the_loader_for_task_path(models: Path, tmp_path: Path) -> None:
    """A recipe's task.path goes through rmx_local.data: here a parquet with the {input, target} layout."""
    import datasets

    from rmx_local.recipe import load_recipe
    from rmx_local.stages import RunContext
    from rmx_local.stages.rollouts import split_problems

    datasets.Dataset.from_list([{"input": f"What is {i} + 1?", "target": str(i + 1)} for i in range(10)]).to_parquet(
        str(tmp_path / "p.parquet"))
    recipe = load_recipe(None, ["task.name=data", f"task.path={json.dumps(str(tmp_path / 'p.parquet'))}",
                                "task.train_size=6", "task.eval_size=3", f"run_dir={json.dumps(str(tmp_path / 'run'))}"])
    splits = split_problems(RunContext(recipe, tmp_path / "run", UI(rich=False)))
    assert [len(splits[k]) for k in ("train", "val", "eval")] == [6, 0, 3]
    assert {p.id for p in splits["train"] + splits["eval"]} <= {f"p-{i}" for i in range(10)}


# ---------------------------------------------------------------- the embedded model in both runtimes (slow)

@pytest.mark.slow
def test_embedded_adapter_in_torch_and_llama_cpp(tmp_path: Path) -> None:
    """SmolLM2-135M with a LoRA that visibly changes it, scored in torch and in llama.cpp (GGUF base + adapter)."""
    pytest.importorskip("llama_cpp")
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine
    from rmx_local.export.check import base_setup, llama_cpp_model

    setup = base_setup()
    # b_std 0.1: large enough that the adapter changes the first greedy tokens (at 0.02 the first change comes
    # late, where Q4_1 numerics of two differently configured llama.cpp contexts already decide ties)
    adapter = random_adapter(setup["model_config"], setup["architecture"], base_model=setup["spec"], rank=8,
                             b_std=0.1, targets=("q_proj", "v_proj", "o_proj"))
    run = tmp_path / "run"
    save_peft(adapter, run / "adapter")
    (run / "recipe.toml").write_text('model = "embedded:smollm2-135m-instruct"\n[task]\n'
                                     'instruction = "Think briefly, then end with: The answer is N."\n[eval]\nmax_tokens = 24\n')
    specs = ["base", str(run), setup["gguf_path"]]  # the last: the base's own .gguf as a model spec
    opts = EvalOptions(data=["arith:single"], limit=16, runtimes=["torch", "llama_cpp"], threads=2, batch_size=16, kl=True)
    summary = run_eval(specs, opts, UI(rich=False))
    assert (run / "export" / "gguf" / "adapter.gguf").is_file()  # exported for llama.cpp on first use
    entry = summary["data"][0]
    torch_r, llama_r = entry["results"]["torch"], entry["results"]["llama_cpp"]
    assert torch_r[setup["gguf_path"]]["vs_first"] == {"diff": 0.0, "se": 0.0, "z": None}  # the same weights as `base`
    assert torch_r[str(run)]["kl"] > 1e-3 and all(r["mean_tokens"] > 2 for r in llama_r.values())
    assert entry["agreement"]["base"]["same_answer"] >= 0.5  # Q4_1 in llama.cpp vs its fp32 dequantization in torch

    # the engine's LoRA is llama-cpp-python's own: the same greedy tokens as Llama(lora_path=...)
    gguf_adapter = run / "export" / "gguf" / "adapter.gguf"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["hf_path"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 6?"}], tokenize=False,
                                           add_generation_prompt=True)
    ours, base = [], []
    for lora, out in ((str(gguf_adapter), ours), (None, base)):
        engine = LlamaCppEngine(setup["gguf_path"], tokenizer, threads=2, parallel=1, lora_path=lora)
        out += engine.sample_tokens([prompt], SampleParams(1, 0.0, 1.0, 16, 0))[0][0]
        engine.close()
    llm = llama_cpp_model(setup["gguf_path"], gguf_adapter)
    theirs = []
    for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), temp=0.0):
        if llm.token_eos() == t or len(theirs) == 16:
            break
        theirs.append(t)
    assert ours == theirs[: len(ours)] and len(ours) > 2 and ours[:4] != base[:4]
