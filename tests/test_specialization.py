"""Chapter 6, long context: RoPE scaling (linear, dynamic NTK, YaRN) against transformers, reloading a scaled model,
chunked prefill against one pass, and the KV cache against Chapter 1's calculator."""

import pytest
import torch

from llmbook import modeling as M
from llmbook import specialization as S
from llmbook.foundations import kv_cache_bytes


def trained(seq_len=32):
    torch.manual_seed(0)
    return M.Transformer(M.ModelConfig.from_depth(2, 300, seq_len)).eval()


@pytest.mark.parametrize("method", S.ROPE_METHODS)
def test_scaled_rope_equals_transformers_at_four_times_the_context(method):
    long = S.scaled_model(trained(), method, 4)
    hf = M.to_hf(long)
    assert hf.config.rope_parameters["rope_type"] == {"none": "default"}.get(method, method)
    x = torch.randint(0, 300, (2, 128))
    with torch.no_grad():
        ours, theirs, again = long(x), hf(input_ids=x).logits, S.from_hf_long(hf)(x)
    assert (ours - theirs).abs().max() <= 1e-5
    assert torch.equal(ours, again)


def test_no_scaling_is_chapter_3s_model_and_from_hf_refuses_a_scaled_one():
    model = trained()
    x = torch.randint(0, 300, (1, 96))
    with torch.no_grad():
        assert torch.equal(S.scaled_model(model, "none", 4)(x), model(x))
    with pytest.raises(ValueError, match="from_hf_long"):
        M.from_hf(M.to_hf(S.scaled_model(model, "yarn", 4)))


def test_yarn_keeps_fast_pairs_and_interpolates_slow_ones():
    s = S.RopeScaling("yarn", 4.0, 4096)  # pairs 0-9 turn more than 32 times over 4,096 tokens, 30-31 less than once
    rates = S.yarn_frequencies(s, 64, 10000.0) / M.rope_frequencies(64, 10000.0)
    assert torch.equal(rates[:10], torch.ones(10)) and torch.allclose(rates[-2:], torch.full((2,), 0.25))
    assert (rates[1:] <= rates[:-1] + 1e-7).all()  # the ramp only slows down
    with pytest.raises(ValueError, match="not one of"):
        S.RopeScaling("ntk", 4.0, 256)


def test_dynamic_ntk_changes_nothing_within_the_trained_context():
    s = S.RopeScaling("dynamic", 1.0, 64)
    assert torch.equal(S.scaled_frequencies(s, 64, 10000.0, 40)[0], M.rope_frequencies(64, 10000.0))
    assert (S.scaled_frequencies(s, 64, 10000.0, 256)[0][1:] < M.rope_frequencies(64, 10000.0)[1:]).all()


def test_chunked_prefill_equals_one_pass_and_the_cache_is_the_calculators():
    long = S.scaled_model(trained(), "yarn", 4)
    x = torch.randint(0, 300, (1, 100))
    one, cache = S.prefill(long, x, room=5)
    chunked, _ = S.prefill(long, x, chunk=32)
    assert (one - chunked).abs().max() <= 1e-5
    assert cache.k.nbytes + cache.v.nbytes == kv_cache_bytes(long.config, 105, "fp32")
    (_, _), peak_one = S.peak_bytes(lambda: S.prefill(long, x))
    (_, _), peak_chunked = S.peak_bytes(lambda: S.prefill(long, x, chunk=16))
    assert 0 < peak_chunked < peak_one
