"""Each exported adapter, proven in its real runtime on the embedded SmolLM2-135M (30 layers, 9 heads, 3 kv
heads): logits(with adapter) - logits(without) there must match the same difference in PyTorch + PEFT.
Plus the chat / generate UI (fake engines, and one real llama.cpp and mlx generation).
"""

import io
import json

import pytest
from rich.console import Console

from rmx_local.adapter import save_peft
from rmx_local.chat import Streamer, chat_loop, generate
from rmx_local.export import write_gguf_adapter, write_mlx_adapter
from rmx_local.export.check import logit_agreement, base_setup, llama_cpp_logits, mlx_logits, peft_logits, random_adapter


@pytest.fixture(scope="module")
def smol():
    from rmx_local.errors import RmxError
    from rmx_local.models import embedded_gguf

    try:
        embedded_gguf("smollm2-135m-instruct")
    except RmxError as e:
        pytest.skip(str(e))
    setup = base_setup()
    adapter = random_adapter(setup["model_config"], setup["architecture"], setup["spec"], rank=8, alpha=16.0)
    base, adapted = peft_logits(setup["hf_path"], adapter, setup["tokens"])
    return {**setup, "adapter": adapter, "base": base, "ref": adapted - base}


def test_llama_cpp_delta_matches_peft(smol, tmp_path):
    pytest.importorskip("llama_cpp")
    from rmx_local.export.gguf_base import f32_base_gguf

    f32 = f32_base_gguf(smol["gguf_path"])
    base, _ = llama_cpp_logits(f32, None, smol["tokens"])
    assert logit_agreement(base, smol["base"])["corr"] > 0.9999  # the F32 copy is the very model PyTorch runs
    for outtype in ("f32", "q8_0"):  # q8_0 also covers a mixed file (rank-long lora_b rows fall back to f16)
        path = write_gguf_adapter(smol["adapter"], tmp_path / f"a-{outtype}.gguf", outtype)
        adapted, _ = llama_cpp_logits(f32, path, smol["tokens"])
        fit = logit_agreement(adapted - base, smol["ref"])
        assert fit["ref_max_abs"] > 0.5, "the random adapter must visibly move the logits"
        assert fit["corr"] >= 0.999 and fit["max_abs_diff"] < 0.05 * fit["ref_max_abs"], (outtype, fit)
    # On the shipped Q4_1 base, activation quantization adds noise: benchmarks/export.py reports that figure.


def test_mlx_delta_matches_peft(smol, tmp_path):
    pytest.importorskip("mlx_lm")
    config = json.loads(open(f"{smol['hf_path']}/config.json").read())
    assert config.get("rope_theta") == config["rope_parameters"]["rope_theta"], "mlx-lm needs a top-level rope_theta"
    folder = write_mlx_adapter(smol["adapter"], tmp_path / "mlx")
    base, _ = mlx_logits(smol["hf_path"], None, smol["tokens"])
    adapted, _ = mlx_logits(smol["hf_path"], folder, smol["tokens"])
    fit = logit_agreement(adapted - base, smol["ref"])
    assert fit["corr"] >= 0.9999 and fit["max_abs_diff"] < 0.01 * fit["ref_max_abs"], fit


# ---- chat / generate UI ---------------------------------------------------------------------------

def fake(name, words):
    def stream(messages, max_tokens, temperature):
        assert messages[-1]["role"] == "user"
        yield from [w + " " for w in words[:max_tokens]]
    return Streamer(name, stream, f"fake {name}")


def test_generate_compare_plain_when_not_a_tty():
    out = io.StringIO()
    answers = generate("unused", "2+2?", compare=True, console=Console(file=out),
                       streamers=[fake("base", ["five"]), fake("adapted", ["four", "!"])])
    assert answers == {"base": "five ", "adapted": "four ! "}
    assert out.getvalue() == "### base\nfive \n\n### adapted\nfour ! \n\n"


def test_generate_compare_side_by_side_on_a_tty():
    out = io.StringIO()
    generate("unused", "2+2?", compare=True, console=Console(file=out, force_terminal=True, width=80),
             streamers=[fake("base", ["five"]), fake("adapted", ["four"])])
    last = out.getvalue()
    row = next(line for line in last.splitlines() if "five" in line)
    assert "four" in row  # one row holds both answers: the panels sit side by side


def test_chat_loop_keeps_history_and_resets():
    seen = []

    def stream(messages, max_tokens, temperature):
        seen.append(len(messages))
        yield "ok"

    lines = iter(["hi", "again", "/reset", "fresh", "/exit", "never"])
    turns = chat_loop("unused", console=Console(file=io.StringIO()), streamers=[Streamer("adapted", stream)],
                      read_line=lambda prompt: next(lines), system="Be brief.")
    assert turns == 3 and seen == [2, 4, 2]


def test_generate_bad_targets_are_one_clear_line(tmp_path):
    from rmx_local.errors import RmxError

    for target, runtime, words in ((tmp_path / "nothing", "llama_cpp", "not a run folder"),
                                   (tmp_path, "onnx", "unknown runtime")):
        with pytest.raises(RmxError) as e:
            generate(str(target), "hi", runtime=runtime, console=Console(file=io.StringIO()))
        assert "\n" not in str(e.value) and (words in str(e.value) or "not installed" in str(e.value))


def make_run(tmp_path, smol):
    run = tmp_path / "run"
    small = random_adapter(smol["model_config"], smol["architecture"], smol["spec"], rank=4, alpha=8.0, layers=[0, 29])
    save_peft(small, run / "adapter")
    (run / "recipe.toml").write_text(f'model = "{smol["spec"]}"\n')
    return run


def test_generate_real_llama_cpp_compare(smol, tmp_path):
    pytest.importorskip("llama_cpp")
    out = io.StringIO()
    answers = generate(str(make_run(tmp_path, smol)), "What is 2 + 3?", compare=True, max_tokens=6,
                       console=Console(file=out))
    assert set(answers) == {"base", "adapted"} and all(answers.values())
    assert (tmp_path / "run" / "export" / "gguf" / "adapter.gguf").is_file()
    assert "### adapted" in out.getvalue()
    adapter_file = tmp_path / "run" / "export" / "gguf" / "adapter.gguf"  # the file alone names its base
    assert generate(str(adapter_file), "Hi", max_tokens=2, console=Console(file=io.StringIO()))["adapted"]


def test_generate_real_mlx(smol, tmp_path):
    pytest.importorskip("mlx_lm")
    answers = generate(str(make_run(tmp_path, smol)), "What is 2 + 3?", runtime="mlx", max_tokens=4,
                       console=Console(file=io.StringIO()))
    assert list(answers) == ["adapted"] and answers["adapted"]
