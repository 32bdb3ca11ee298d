"""The architecture table (rmx_local/archs.py), proven per row: a tiny random model of each family, its base GGUF
made by llama.cpp's own converter, our GGUF LoRA in llama.cpp and our MLX adapter in mlx-lm, each against
PyTorch + PEFT; a run and `export --format all` on each; shapes where head_dim != hidden / heads."""

import json
import os

import numpy as np
import pytest

import rmx_local.stages.select as select_stage
from rmx_local import archcheck, archs
from rmx_local.errors import RmxError
from rmx_local.export import export_run
from rmx_local.export.check import random_adapter
from rmx_local.export.common import check_fits
from rmx_local.pipeline import run_pipeline
from rmx_local.recipe import load_recipe
from rmx_local.ui import UI
from rmx_local.verify import Verdict


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """{model_type: (model, base gguf)} for every row of the table, built once per test session."""
    if archcheck.converter() is None:
        if os.environ.get("CI"):
            pytest.fail("llama.cpp's converter is missing: scripts/setup.sh dev unpacks it")
        pytest.skip("llama.cpp's converter is not unpacked (scripts/setup.sh dev)")
    pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("archs")
    models = [archcheck.tiny_model(m, root) for m in archcheck.TINY]
    ggufs = archcheck.convert(models)
    return {m["model_type"]: (m, ggufs[m["model_type"]]) for m in models}


def test_every_table_row_has_a_tiny_model_and_back():
    assert set(archcheck.TINY) == set(archs.ARCHS)


@pytest.mark.parametrize("model_type", list(archs.ARCHS))
def test_exports_match_peft_in_their_runtimes(matrix, model_type, tmp_path):
    model, base_gguf = matrix[model_type]
    row = archcheck.check(model, base_gguf, tmp_path)
    assert row["base"]["corr"] > 0.9999, row["base"]  # the converted base is the very model transformers runs
    assert row["gguf_read_back_max_diff"] < 1e-6
    assert row["ref_max_abs"] > 0.01, "the random adapter must move the logits"
    assert archcheck.passes(row["gguf"]), row["gguf"]
    if isinstance(row["mlx"], dict):
        assert archcheck.passes(row["mlx"]), row["mlx"]
    else:
        assert os.environ.get("CI") is None, row["mlx"]  # mlx-lm is part of the dev set-up
    assert row["ollama"][1] == f"ADAPTER ./{model_type}.gguf"


def test_the_llama_cpp_check_fails_without_the_rope_permutation(matrix, tmp_path, monkeypatch):
    """The check is not circular: written without llama's q/k row permutation, the adapter disagrees in llama.cpp."""
    model, base_gguf = matrix["llama"]
    qk = ("q_proj", "k_proj")  # v/o/mlp deltas would hide the q/k rows; a large B makes the q/k delta visible
    right = archcheck.check(model, base_gguf, tmp_path, runtimes=("gguf",), targets=qk, b_std=3.0)
    assert archcheck.passes(right["gguf"]), right["gguf"]
    monkeypatch.setitem(archs.ARCHS, "llama", archs.Arch("llama", "llama", permute_qk=False))
    row = archcheck.check(model, base_gguf, tmp_path, runtimes=("gguf",), targets=qk, b_std=3.0)
    assert not archcheck.passes(row["gguf"]) and row["gguf"]["corr"] < 0.99, row["gguf"]


def alternate(texts, golds, timeout_s=5.0):
    return [Verdict(correct=i % 2 == 0, parsed="1") for i in range(len(texts))]


@pytest.mark.parametrize("model_type", list(archs.ARCHS))
def test_run_then_export_all(matrix, model_type, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(select_stage, "verify_many", alternate)
    model, _ = matrix[model_type]
    run = tmp_path / "run"
    recipe = load_recipe(None, [f"model={json.dumps(str(model['hf']))}", f"run_dir={json.dumps(str(run))}",
                                "task.train_size=4", "task.eval_size=1", "rollout.n=2", "rollout.max_tokens=4",
                                "eval.max_tokens=2", "eval.n_samples=0", "train.grad_accum=2", "train.warmup_steps=1",
                                "train.lora_rank=4", "gate.fraction=0.25", "report=false"])
    run_pipeline(recipe, UI(rich=False))
    said = capsys.readouterr().out
    targets = json.loads((run / "adapter" / "adapter_config.json").read_text())["target_modules"]
    expected = ["o_proj", "qkv_proj"] if model_type == "phi3" else ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert targets == expected
    assert ("are o_proj" not in said) if model_type != "phi3" else ("are qkv_proj,o_proj in this architecture" in said)
    skipped: dict = {}
    written = export_run(run, "all", skipped=skipped)
    assert sorted(written) == ["gguf", "mlx", "peft"] and list(skipped) == ["ollama"]  # no GGUF base to name in FROM
    assert "no" in skipped["ollama"][0] and "convert_hf_to_gguf" in skipped["ollama"][1]
    with pytest.raises(RmxError, match="export ollama: Ollama needs the base as a GGUF"):
        export_run(run, "ollama")


QWEN3_06B = dict(model_type="qwen3", hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072, num_hidden_layers=28)


def test_shape_reads_head_dim_not_hidden_over_heads():
    shape = archs.Shape.from_config(QWEN3_06B)
    assert shape.linear("self_attn.q_proj") == (2048, 1024) and shape.linear("self_attn.o_proj") == (1024, 2048)
    assert shape.linear("self_attn.k_proj") == (1024, 1024)
    assert archs.Shape.from_config({**QWEN3_06B, "head_dim": None}).head_dim == 64  # only without a head_dim
    phi = archs.Shape.from_config(dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                                       intermediate_size=8192, num_hidden_layers=32))
    assert phi.linear("self_attn.qkv_proj") == (9216, 3072) and phi.linear("mlp.gate_up_proj") == (16384, 3072)


def test_one_fits_check_accepts_the_real_shape_and_refuses_a_guess():
    adapter = random_adapter(QWEN3_06B, "qwen3", rank=2, targets=("q_proj", "o_proj"), layers=[0, 27])
    assert len(check_fits(adapter, "export", QWEN3_06B)) == 4
    guessed = dict(adapter.weights)
    a, b = guessed["model.layers.0.self_attn.q_proj"]
    guessed["model.layers.0.self_attn.q_proj"] = (a, b[:1024])  # hidden // heads * heads rows
    adapter.weights = guessed
    with pytest.raises(RmxError, match=r"q_proj is A\(2, 1024\) B\(1024, 2\).*\(2048, 1024\)"):
        check_fits(adapter, "export", QWEN3_06B)
    with pytest.raises(RmxError, match="adapter made for a qwen3 model, but .* is 'llama'"):
        check_fits(adapter, "eval", {**QWEN3_06B, "model_type": "llama"})


def test_fused_targets_and_unknown_architectures():
    assert archs.lora_targets("phi3", ["q_proj", "k_proj", "v_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    assert archs.lora_targets("phi3", ["up_proj", "down_proj"]) == ["gate_up_proj", "down_proj"]
    assert archs.lora_targets("llama", ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert archs.lora_targets("gpt_neox", ["query_key_value"]) == ["query_key_value"]  # not in the table: as written
    with pytest.raises(RmxError) as e:
        archs.lookup("gpt_neox")
    assert "'gpt_neox' is not in rmx-local's table" in str(e.value) and "--format peft" in str(e.value)
    assert archs.by_gguf("llama").model_type == "llama" and archs.by_gguf("gemma3").model_type == "gemma3_text"
    assert np.all([a.linears[0].startswith("self_attn.") for a in archs.ARCHS.values()])


@pytest.mark.slow
def test_real_gemma_3_270m_exports_match_peft(tmp_path):
    """The second embedded model (gemma3_text, head_dim 256 on a 640-wide model, 262k vocabulary): our GGUF LoRA in
    llama.cpp on an F32 copy of its base and our MLX adapter in mlx-lm, against PEFT (~90 s)."""
    from rmx_local.export import write_gguf_adapter, write_mlx_adapter
    from rmx_local.export.check import logit_agreement, base_setup, llama_cpp_logits, mlx_logits, peft_logits
    from rmx_local.export.gguf_base import f32_base_gguf

    setup = base_setup("embedded:gemma-3-270m")
    assert setup["architecture"] == "gemma3_text" and setup["model_config"]["head_dim"] == 256
    adapter = random_adapter(setup["model_config"], setup["architecture"], setup["spec"], rank=8, alpha=16.0)
    base, adapted = peft_logits(setup["hf_path"], adapter, setup["tokens"])
    f32 = f32_base_gguf(setup["gguf_path"])
    cpp_base, _ = llama_cpp_logits(f32, None, setup["tokens"])
    assert logit_agreement(cpp_base, base)["corr"] > 0.9999
    cpp_adapted, _ = llama_cpp_logits(f32, write_gguf_adapter(adapter, tmp_path / "a.gguf", "f16"), setup["tokens"])
    assert archcheck.passes(fit := logit_agreement(cpp_adapted - cpp_base, adapted - base)), fit
    folder = write_mlx_adapter(adapter, tmp_path / "mlx")
    mlx_base, _ = mlx_logits(setup["hf_path"], None, setup["tokens"])
    mlx_adapted, _ = mlx_logits(setup["hf_path"], folder, setup["tokens"])
    assert archcheck.passes(fit := logit_agreement(mlx_adapted - mlx_base, adapted - base)), fit


def test_llama_cpp_puts_bos_first_where_the_gguf_asks_for_it(matrix):
    """Gemma's GGUF asks for a BOS (and answers nonsense without it): the llama.cpp engine adds it once, as the torch
    path does for the raw template; a vocabulary that asks for none (the embedded SmolLM2) gets none."""
    from rmx_local.engines.llama_cpp_engine import LlamaCppEngine
    from rmx_local.models import embedded_gguf
    from rmx_local.tiny import char_tokenizer

    gemma = LlamaCppEngine(str(matrix["gemma3_text"][1]), char_tokenizer(), threads=1, parallel=1)
    ids = gemma.tokenize("what is")
    assert ids[0] == 1 and ids.count(1) == 1 and gemma.tokenize("<s>what is") == ids  # never doubled
    smol = LlamaCppEngine(str(embedded_gguf("smollm2-135m-instruct")), char_tokenizer(), threads=1, parallel=1)
    assert smol.tokenize("what is") == [5588, 314]
    gemma.close(), smol.close()
