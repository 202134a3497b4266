"Unit tests of llmbook.foundations: the calculator against real models, the spec, the risk register."

import math

import pytest
import torch

from llmbook.book import CHAPTERS, PRESETS
from llmbook.foundations import (
    LICENSE_POLICY,
    ModelShape,
    activation_elements_per_token,
    flops_per_token,
    kv_cache_bytes,
    license_allowed,
    measure_saved_activation_bytes,
    parameter_counts,
    preset_shape,
    reference_model,
    risk_register,
    serving_estimate,
    success_metrics,
    training_estimate,
    training_memory,
)


@pytest.mark.parametrize("depth", range(1, 25))
def test_shape_from_depth_is_valid(depth):
    s = ModelShape.from_depth(depth, 1000, 64)
    assert s.n_embd == 64 * depth and s.n_head * s.head_dim == s.n_embd
    assert s.n_head % s.n_kv_head == 0 and s.ffn_hidden % 64 == 0 and s.ffn_hidden >= 8 * s.n_embd / 3


@pytest.mark.parametrize(
    "depth, vocab, tied, qk_norm",
    [(1, 300, True, True), (3, 1000, False, True), (4, 777, True, True), (5, 512, False, True)],
)
def test_parameter_count_equals_reference(depth, vocab, tied, qk_norm):
    s = ModelShape(**{**ModelShape.from_depth(depth, vocab, 32).__dict__, "tied_embeddings": tied, "qk_norm": qk_norm})
    model = reference_model(s)
    assert parameter_counts(s)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_follow_the_usual_rules():
    s = ModelShape.from_depth(6, 4096, 256)
    f = flops_per_token(s)
    n = parameter_counts(s)
    # matmul weights = everything but norms and the embedding lookup (the tied head counts once as a matmul)
    assert f["matmul"] == 2 * (n["total"] - n["norms"] - 2 * s.n_layer * s.head_dim)
    assert f["train"] == 3 * f["forward"]
    # causal attention sees (T+1)/2 keys on average; without the mask, T
    full = flops_per_token(s, causal=False)["attention"]
    assert math.isclose(f["attention"] / full, (s.seq_len + 1) / 2 / s.seq_len)


def test_kv_cache_formula_matches_transformers_cache():
    s = ModelShape.from_depth(2, 500, 40)
    model = reference_model(s)
    model.config.use_cache = True
    ids = torch.randint(0, 500, (3, 40))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert sum(t.numel() * t.element_size() for t in tensors) == kv_cache_bytes(s, 3 * 40, "fp32")


def test_activation_formula_matches_saved_tensors():
    s = ModelShape.from_depth(3, 1000, 64)
    ids = torch.randint(0, 1000, (4, 64))
    measured = measure_saved_activation_bytes(reference_model(s), ids)
    predicted = 4 * activation_elements_per_token(s) * ids.numel()
    assert 0.9 <= measured / predicted <= 1.15


def test_memory_and_estimates_are_consistent():
    s = preset_shape(PRESETS["cpu"])
    fp32, pure = training_memory(s, 16, "fp32"), training_memory(s, 16, "bf16 pure")
    assert fp32["weights"] == 4 * parameter_counts(s)["total"] and pure["weights"] * 2 == fp32["weights"]
    est = training_estimate(s, 1_000_000, 1e11, 0.5, 2.0)
    assert math.isclose(est["hours"], flops_per_token(s)["train"] * 1e6 / 5e10 / 3600)
    assert math.isclose(est["usd"], 2.0 * est["hours"])
    limits = dict(matmul_flops_fp32=1e11, matmul_flops_bf16=1e11, memory_bytes_per_s=1e10)
    one, many = (
        serving_estimate(s, limits, 0.5, 1.0, batch_size=1),
        serving_estimate(s, limits, 0.5, 1.0, batch_size=64),
    )
    assert one["bound"] == "memory" and many["tokens_per_s"] > one["tokens_per_s"]
    assert many["usd_per_million_tokens"] < one["usd_per_million_tokens"]


def test_spec_and_risks_are_consistent():
    metrics = {m.name: m for m in success_metrics()}
    assert all(set(m.targets) == set(PRESETS) for m in metrics.values())
    chapters = {c.number for c in CHAPTERS} | {0}
    for risk in risk_register():
        assert risk.measured_by in metrics and risk.chapter in chapters
    assert metrics["raw_text_mb"].targets["cpu"] >= 50


def test_license_policy():
    assert license_allowed("MIT") and license_allowed(LICENSE_POLICY["release_license"])
    assert not license_allowed("GPL-3.0-or-later") and not license_allowed("NOASSERTION")
    assert not license_allowed("MPL-2.0")
