"""The dry-run planner: parameter counts of known configs, memory estimates in the right range, the warning's knob."""

import pytest

from rmx_local.plan import Machine, ModelFacts, estimate, verdict
from rmx_local.recipe import load_recipe

GB = 2**30
# config.json fields of the real checkpoints, and their published parameter counts
CONFIGS = {
    "SmolLM2-135M": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), 134.5e6),
    "Qwen2.5-0.5B": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 494.0e6),
    "Llama-3.2-1B": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True), 1235.8e6),
    "Qwen2.5-1.5B": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True), 1543.7e6),
}
LAPTOP = Machine(flops=100e9, bandwidth=20e9, memory=16 * GB, device="cpu")


def facts(name: str) -> ModelFacts:
    return ModelFacts.from_config(CONFIGS[name][0])


def stages(recipe, name: str, prompt=50, completion=10.0, bytes_per=4):
    return {s.name: s for s in estimate(recipe, facts(name), LAPTOP, prompt, completion, bytes_per, 128 * 2**20)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_counts_match_the_published_ones(name):
    assert facts(name).params == pytest.approx(CONFIGS[name][1], rel=0.01)  # biases (Qwen's q/k/v) left out


def test_quickstart_estimate_is_a_few_gigabytes_and_a_few_minutes():
    r = load_recipe("recipes/quickstart.toml")
    s = stages(r, "SmolLM2-135M")
    peak = max(x.peak_bytes for x in s.values())
    assert 1.0 * GB < peak < 4.0 * GB
    assert max(s, key=lambda k: s[k].peak_bytes) == "rollouts"  # 440 rows of KV cache at once
    total = sum(x.seconds for x in s.values())
    assert 30 < total < 1800
    # KV cache of 440 rows x (50 + 64) tokens x 30 layers x 2 x 3 heads x 64 x 4 bytes = 2.3 GB over the weights
    assert s["rollouts"].peak_bytes - s["entropy"].peak_bytes == pytest.approx(2.3 * GB, rel=0.25)
    assert verdict(list(s.values()), LAPTOP.memory) is None


def test_paper_recipe_on_a_16gb_laptop_warns_and_names_the_knob():
    r = load_recipe("recipes/paper-qwen2.5-1.5b-gsm8k.toml", ["rollout.batch_size=256"])
    s = stages(r, "Qwen2.5-1.5B", prompt=150, completion=300.0)
    assert s["load model"].peak_bytes > 6 * GB  # 1.54B fp32 weights
    warning = verdict(list(s.values()), LAPTOP.memory)
    assert warning and "rollouts" in warning and "rollout.batch_size (now 256)" in warning
    smaller = stages(load_recipe("recipes/paper-qwen2.5-1.5b-gsm8k.toml", ["rollout.batch_size=16"]), "Qwen2.5-1.5B",
                     prompt=150, completion=300.0)
    assert smaller["rollouts"].peak_bytes < s["rollouts"].peak_bytes - 12 * GB  # 256 -> 16 rows of 1,174 tokens
    assert verdict(list(smaller.values()), LAPTOP.memory) is None
    # bf16 halves the weights and the cache
    half = stages(r, "Qwen2.5-1.5B", prompt=150, completion=300.0, bytes_per=2)
    assert half["rollouts"].peak_bytes < 0.6 * s["rollouts"].peak_bytes


def test_training_memory_is_bounded_by_passes_and_long_sequences_name_max_tokens():
    big = ["train.group_size=1", "rollout.batch_size=8", "eval.max_tokens=64"]
    s1 = stages(load_recipe("recipes/quickstart.toml", big + ["train.batch_size=8"]), "Qwen2.5-1.5B", prompt=150, completion=60.0)
    s64 = stages(load_recipe("recipes/quickstart.toml", big + ["train.batch_size=64"]), "Qwen2.5-1.5B", prompt=150, completion=60.0)
    assert s64["train"].peak_bytes == pytest.approx(s1["train"].peak_bytes, rel=0.01)  # cut into passes
    long = load_recipe("recipes/quickstart.toml", big + ["rollout.max_tokens=4096"])
    warning = verdict(list(stages(long, "Qwen2.5-1.5B", prompt=150, completion=500.0).values()), LAPTOP.memory)
    assert warning and warning.startswith("will not fit: train") and "rollout.max_tokens (now 4096" in warning


def test_time_grows_with_the_work():
    r1 = load_recipe("recipes/quickstart.toml")
    r2 = load_recipe("recipes/quickstart.toml", ["rollout.n=16"])
    a, b = stages(r1, "SmolLM2-135M"), stages(r2, "SmolLM2-135M")
    assert b["rollouts"].seconds == pytest.approx(2 * a["rollouts"].seconds, rel=0.3)
    assert stages(r1, "Qwen2.5-1.5B")["train"].seconds > 8 * a["train"].seconds


def test_a_shared_preamble_is_counted_once_in_the_sampling_cache():
    r = load_recipe("recipes/quickstart.toml")
    m = facts("SmolLM2-135M")
    copied = {s.name: s for s in estimate(r, m, LAPTOP, 51, 10.0, 4, 128 * 2**20)}
    held_once = {s.name: s for s in estimate(r, m, LAPTOP, 51, 10.0, 4, 128 * 2**20, shared_tokens=28)}
    per_token = 30 * 2 * 3 * 64 * 4  # layers x K,V x KV heads x head dim x fp32
    assert copied["rollouts"].peak_bytes - held_once["rollouts"].peak_bytes == (440 - 1) * 28 * per_token
    assert copied["eval base"].peak_bytes - held_once["eval base"].peak_bytes == (200 - 1) * 28 * per_token
    assert copied["train"].peak_bytes == held_once["train"].peak_bytes
