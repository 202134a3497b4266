"""Chapter 6, long context: RoPE scaling (linear, dynamic NTK, YaRN) against transformers, reloading a scaled model,
chunked prefill against one pass, and the KV cache against Chapter 1's calculator."""

import copy

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


def with_random_lora(model, settings=S.LoraSettings(rank=4, alpha=8.0)):
    "A LoRA copy of `model` whose B is not zero (a fresh adapter changes nothing)."
    adapted = S.add_lora(copy.deepcopy(model), settings)
    torch.manual_seed(1)
    for layer in S.lora_layers(adapted).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return adapted


def test_lora_starts_as_the_model_and_trains_only_its_updates():
    model = trained()
    adapted = S.add_lora(copy.deepcopy(model), S.LoraSettings(rank=4))
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert torch.equal(adapted(x), model(x))
    trainable, total = S.trainable_parameters(adapted)
    assert len(S.lora_layers(adapted)) == 7 * 2 and 0 < trainable < 0.25 * total
    assert all(("lora_" in n) == p.requires_grad for n, p in adapted.named_parameters())


def test_lora_merge_unmerge_and_peft_parity(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    model = trained()
    adapted = with_random_lora(model)
    x = torch.randint(0, 300, (2, 24))
    weights = {n: l.weight.detach().clone() for n, l in S.lora_layers(adapted).items()}
    with torch.no_grad():
        ours = adapted(x)
        for layer in S.lora_layers(adapted).values():
            layer.merge()
        assert (adapted(x) - ours).abs().max() <= 1e-5
        for layer in S.lora_layers(adapted).values():
            layer.unmerge()
    assert all((l.weight - weights[n]).abs().max() <= 1e-6 for n, l in S.lora_layers(adapted).items())
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8.0, target_modules=list(S.LORA_TARGETS))
    peft_model = get_peft_model(M.to_hf(model), config)
    assert not set_peft_model_state_dict(peft_model, S.adapter_state(adapted)).unexpected_keys
    S.save_adapter(adapted, S.LoraSettings(rank=4, alpha=8.0), tmp_path / "adapter")
    M.to_hf(model).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert (peft_model(input_ids=x).logits - ours).abs().max() <= 1e-5
        assert (loaded(input_ids=x).logits - ours).abs().max() <= 1e-5
        assert torch.equal(S.load_adapter(copy.deepcopy(model), tmp_path / "adapter")(x), ours)
    merged = S.merge_lora(adapted).state_dict()
    theirs = peft_model.merge_and_unload().state_dict()
    assert set(merged) == set(model.state_dict())
    assert max((theirs[f"model.{k}"] - v).abs().max().item() for k, v in merged.items() if k != "lm_head.weight") < 1e-6


def test_a_broken_adapter_is_refused_with_its_file(tmp_path):
    import json

    S.save_adapter(with_random_lora(trained()), S.LoraSettings(rank=4, alpha=8.0), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="weights of no layer"):
        S.load_adapter(trained(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    with pytest.raises(ValueError, match="adapter_config.json: peft_type 'IA3' is not LORA"):
        S.load_adapter(trained(), tmp_path / "a")


def test_replay_batches_mix_the_domain_and_general_data(tmp_path):
    meta = M.write_token_documents(
        tmp_path,
        {
            "train": [([1] + [7] * 40, "code", 40)] * 20,
            "domain_train": [([1] + [9] * 40, "prose", 40)] * 20,
        },
        300,
        "test",
    )
    assert meta["splits"]["domain_train"]["tokens"] == 820
    x, y = S.ReplayLoader(tmp_path, 16, 10, 0.2, seed=0).next_batch()
    assert x.shape == (10, 16) and (x[:8] != 7).all() and (x[8:] != 9).all()
    with pytest.raises(ValueError, match="no row for the domain"):
        S.ReplayLoader(tmp_path, 16, 4, 1.0)


def test_an_extended_tokenizer_keeps_every_old_id_and_starts_new_tokens_from_their_pieces():
    old = M.BPETokenizer(M.train_bpe(M.count_chunks(["general text about numbers and words"] * 20), 40))
    text = "Symbol Symbol Poly Poly subs(x, y) Symbol"
    new = S.extended_tokenizer(old, [text] * 10, 8)
    assert new.vocab[: len(old.vocab)] == old.vocab and new.vocab_size == old.vocab_size + 8
    assert len(new.encode_ordinary(text)) < len(old.encode_ordinary(text))
    assert new.decode(new.encode_ordinary(text)) == text
    model = M.Transformer(M.ModelConfig.from_depth(1, old.vocab_size, 16))
    grown = S.extended_model(model, old, new)
    e_old, e_new = model.embed_tokens.weight, grown.embed_tokens.weight
    assert torch.equal(e_new[: len(old.vocab)], e_old[: len(old.vocab)])
    assert torch.equal(e_new[new.special_tokens["<|end|>"]], e_old[old.special_tokens["<|end|>"]])
    first = len(old.vocab)
    assert torch.allclose(e_new[first], e_old[old._encode_chunk(new.vocab[first])].mean(0))


def test_int8_layers_equal_torchs_dynamic_quantization():
    "Our int8 linear layer gives torch's `quantize_dynamic` (per-channel int8) output exactly, inputs of any scale."
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    for scale in (0.1, 1.0, 30.0):
        layer = torch.nn.Linear(384, 96, bias=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = quantize_dynamic(
                torch.nn.Sequential(copy.deepcopy(layer)), {torch.nn.Linear: per_channel_dynamic_qconfig}
            )
        x = torch.randn(4, 64, 384) * scale
        with torch.no_grad():
            assert (S.DynamicInt8Linear(layer)(x) - theirs(x)).abs().max() <= 1e-6 * scale


def test_quantization_bytes_and_error_bounds():
    "RTN stays within half a step of each weight; GPTQ lowers a layer's output error on correlated inputs; bytes count."
    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.02
    inputs = torch.randn(2048, 16) @ torch.randn(16, 256) + 0.1 * torch.randn(2048, 256)
    for bits, group in ((8, None), (4, 32), (4, 128)):
        q = S.quantize_rtn(weight, bits, group)
        step = q.scale.repeat_interleave(q.group, 1)
        assert ((q.dequantize() - weight).abs() <= step / 2 * (1 + 1e-6)).all()
        assert q.nbytes() == 64 * 256 * bits // 8 + q.scale.numel() * 2
        assert torch.equal(q.scale, q.scale.half().float())  # the scales are stored in float16
    hessian = 2 * inputs.T @ inputs / len(inputs)
    error = lambda q: ((inputs @ (q.dequantize() - weight).T) ** 2).mean()
    assert error(S.gptq(weight, hessian, 4, 32)) < 0.5 * error(S.quantize_rtn(weight, 4, 32))
    with pytest.raises(ValueError, match="does not divide"):
        S.quantize_rtn(weight, 4, 96)
    model = trained()
    quantized, stored = S.quantize_model(model, 8)
    assert quantized.lm_head.weight is quantized.embed_tokens.weight  # a tied head stays tied, quantized once
    assert 3.8 < 4 * sum(p.numel() for p in model.parameters()) / stored < 4
