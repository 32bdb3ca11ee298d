"""Export formats: exact round trips, the weight delta each file implies, export_run, and clear errors.

Tiny random adapters only (no model downloads, no runtimes); runtime checks are in test_export_runtimes.py.
"""

import json

import numpy as np
import pytest

from rmx_local.adapter import LoraAdapter, load_peft, save_peft
from rmx_local.errors import RmxError
from rmx_local.export import (OUTTYPES, export_run, read_gguf_adapter, read_mlx_adapter, write_gguf_adapter,
                              write_mlx_adapter)
from rmx_local.export.check import random_adapter

# GQA: 4 query heads, 2 kv heads, head_dim 8 -> k/v are (16, 32); MLP is (64, 32) / (32, 64)
CFG = dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
TOL = {"f32": 0.0, "f16": 2e-3, "bf16": 1e-2, "q8_0": 1e-2}  # max |error| relative to the tensor's max |value|


def make(arch="llama", **kw) -> LoraAdapter:
    return random_adapter(CFG, arch, base_model="tiny-base", rank=4, alpha=8.0, b_std=0.5, **kw)


def assert_same(back: LoraAdapter, ad: LoraAdapter, tol: float = 0.0):
    assert (back.rank, back.alpha, back.targets, back.base_model, back.architecture, back.model_config) == \
           (ad.rank, ad.alpha, ad.targets, ad.base_model, ad.architecture, ad.model_config)
    assert sorted(back.weights) == sorted(ad.weights)
    for m, (a, b) in ad.weights.items():
        ba, bb = back.weights[m]
        assert ba.shape == a.shape and bb.shape == b.shape, m
        if tol == 0:
            assert np.array_equal(ba, a) and np.array_equal(bb, b), m
        else:
            assert np.abs(ba - a).max() <= tol * np.abs(a).max(), m
            assert np.abs(bb - b).max() <= tol * np.abs(b).max(), m


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_gguf_round_trip(tmp_path, arch, outtype):
    ad = make(arch)
    back = read_gguf_adapter(write_gguf_adapter(ad, tmp_path / "a.gguf", outtype))
    assert_same(back, ad, TOL[outtype])


def test_mlx_and_peft_round_trip_exact(tmp_path):
    ad = make()
    assert_same(read_mlx_adapter(write_mlx_adapter(ad, tmp_path / "mlx")), ad)
    assert_same(load_peft(save_peft(ad, tmp_path / "peft")), ad)


def rope_rows(n_rows: int, n_head: int) -> np.ndarray:
    """GGUF row g holds HF row perm[g]: per head, HF halves [x0..x(d/2-1) | y0..] become pairs x0 y0 x1 y1 ..."""
    d = n_rows // n_head
    perm = []
    for h in range(n_head):
        for i in range(d // 2):
            perm += [h * d + i, h * d + d // 2 + i]
    return np.array(perm)


def peft_deltas(ad: LoraAdapter, tmp_path) -> dict[str, np.ndarray]:
    """Weight deltas as PEFT itself applies them: merged weight minus base weight on a tiny llama."""
    import torch
    from peft import PeftModel

    from tests.conftest import tiny_llama

    model = tiny_llama(64, num_hidden_layers=CFG["num_hidden_layers"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = PeftModel.from_pretrained(model, save_peft(ad, tmp_path / "peft")).merge_and_unload()
    with torch.no_grad():
        after = dict(merged.named_parameters())
        return {m: (after[m + ".weight"] - before[m + ".weight"]).double().numpy() for m in ad.weights}


def test_every_file_implies_the_peft_delta(tmp_path):
    """Read raw tensors (not through our readers) and rebuild (alpha/r)·B·A in each format's own convention."""
    import gguf

    ad = make()
    ref = peft_deltas(ad, tmp_path)
    for m in ad.weights:
        assert np.allclose(ad.delta(m), ref[m], atol=1e-5)
    # GGUF: ne [in, r] / [r, out] untransposed; q/k rows rope-permuted (k with the kv head count)
    reader = gguf.GGUFReader(str(write_gguf_adapter(ad, tmp_path / "a.gguf", "f32")))
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    assert reader.fields["general.type"].contents() == "adapter" and reader.fields["adapter.type"].contents() == "lora"
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for m in ad.weights:
        layer, kind = int(m.split(".")[2]), m.rsplit(".", 1)[1]
        name = f"blk.{layer}.{short[kind]}.weight"
        a, b = raw[name + ".lora_a"], raw[name + ".lora_b"]
        rank = a.shape[0]
        delta = alpha / rank * b.astype(np.float64) @ a
        expect = ref[m]
        if kind == "q_proj":
            expect = expect[rope_rows(expect.shape[0], CFG["num_attention_heads"])]
        if kind == "k_proj":
            expect = expect[rope_rows(expect.shape[0], CFG["num_key_value_heads"])]
        assert delta.shape == expect.shape and np.allclose(delta, expect, atol=1e-5), m
    # MLX: lora_a (in, r), lora_b (r, out); y += scale * x @ a @ b, so dW = scale * (a @ b).T
    from safetensors.numpy import load_file

    folder = write_mlx_adapter(ad, tmp_path / "mlx")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapters.safetensors"))
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == CFG["num_hidden_layers"]
    assert sorted(config["lora_parameters"]["keys"]) == sorted(
        [f"self_attn.{c}_proj" for c in "qkvo"] + [f"mlp.{c}_proj" for c in ("gate", "up", "down")])
    scale = config["lora_parameters"]["scale"]
    for m in ad.weights:
        delta = scale * (tensors[m + ".lora_a"].astype(np.float64) @ tensors[m + ".lora_b"]).T
        assert np.allclose(delta, ref[m], atol=1e-5), m


def test_qwen2_rows_are_not_permuted(tmp_path):
    import gguf

    ad = make("qwen2")
    reader = gguf.GGUFReader(str(write_gguf_adapter(ad, tmp_path / "q.gguf", "f32")))
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert np.array_equal(raw["blk.0.attn_q.weight.lora_b"], ad.weights["model.layers.0.self_attn.q_proj"][1])


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and isinstance(excinfo.value, RmxError)
    return text


def test_bad_inputs_give_one_clear_line(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(RmxError) as e:
        export_run(tmp_path / "run", ["gguf"])
    assert "no adapter/" in one_line(e)
    with pytest.raises(RmxError) as e:
        write_gguf_adapter(make("gpt2"), tmp_path / "x.gguf")
    assert "model architecture 'gpt2' is not in rmx-local's table" in one_line(e) and "peft" in str(e.value)
    with pytest.raises(RmxError) as e:
        write_mlx_adapter(make("gpt_neox"), tmp_path / "x")
    assert "'gpt_neox' is not in" in one_line(e)
    bad = make()  # rank mismatch: A has 3 rows for rank 4
    a, b = bad.weights["model.layers.0.self_attn.q_proj"]
    bad.weights["model.layers.0.self_attn.q_proj"] = (a[:3], b)
    with pytest.raises(RmxError) as e:
        write_gguf_adapter(bad, tmp_path / "x.gguf")
    assert "inconsistent with rank 4" in one_line(e)
    bad = make()  # shape mismatch: k_proj sized as if it had 4 kv heads
    bad.weights["model.layers.1.self_attn.k_proj"] = (a, np.zeros((32, 4), np.float32))
    with pytest.raises(RmxError) as e:
        write_mlx_adapter(bad, tmp_path / "x")
    assert "k_proj" in one_line(e) and "(16, 32)" in str(e.value)
    for module, words in (("lm_head", "embeddings / lm_head"), ("model.embed_tokens", "embeddings / lm_head"),
                          ("model.layers.0.self_attn.rotary_emb", "is not a block projection")):
        bad = make()
        bad.weights[module] = (np.zeros((4, 32), np.float32), np.zeros((64, 4), np.float32))
        for writer in (write_gguf_adapter, write_mlx_adapter):
            with pytest.raises(RmxError) as e:
                writer(bad, tmp_path / "y")
            assert words in one_line(e)
    with pytest.raises(RmxError) as e:
        write_gguf_adapter(make(), tmp_path / "x.gguf", "q4_0")
    assert "outtype" in one_line(e)
    with pytest.raises(RmxError) as e:
        read_gguf_adapter(tmp_path / "missing.gguf")
    one_line(e)
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob(".x*"))  # nothing half-written


def tiny_base_gguf(path):
    """A metadata-only base GGUF (chat template + vocab) standing in for the base model in Ollama tests."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if loop %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}")
    w.add_token_list(["<unk>", "<|im_start|>", "<|im_end|>"])
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_export_run_all_formats(tmp_path):
    run = tmp_path / "run"
    ad = make()
    save_peft(ad, run / "adapter")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", **CFG}))
    tiny_base_gguf(base / "tiny.gguf")
    (run / "recipe.toml").write_text(f'model = "{base}"\n')
    (run / "summary.json").write_text(json.dumps({"recipe_hash": "abc123", "gated_fraction": 0.05, "tau": 1.4,
                                                  "train_problems": 50, "eval": {"base": 0.31, "adapted": 0.42}}))
    out = export_run(run, ["all"], outtype="f32")
    assert sorted(out) == ["gguf", "mlx", "ollama", "peft"]
    assert_same(read_gguf_adapter(out["gguf"] / "adapter.gguf"), ad)
    assert_same(read_mlx_adapter(out["mlx"]), ad)
    assert_same(load_peft(out["peft"]), ad)
    modelfile = (out["ollama"] / "Modelfile").read_text()
    assert f"FROM {(base / 'tiny.gguf').resolve()}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" in modelfile and "{{ .Content }}" in modelfile
    assert (out["ollama"] / "adapter.gguf").read_bytes() == (out["gguf"] / "adapter.gguf").read_bytes()
    card = (out["ollama"] / "README.md").read_text()
    for fact in ("abc123", "0.05", "1.4", "50", "31.0%", "42.0%", "tiny-base"):
        assert fact in card
    assert export_run(run, "peft,mlx") == {"peft": run / "export" / "peft", "mlx": run / "export" / "mlx"}
    with pytest.raises(RmxError) as e:
        export_run(run, ["onnx"])
    assert "unknown format onnx" in one_line(e)
