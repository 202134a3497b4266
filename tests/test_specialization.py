"""Chapter 6, long context: RoPE scaling (linear, dynamic NTK, YaRN) against transformers, reloading a scaled model,
chunked prefill against one pass, and the KV cache against Chapter 1's calculator. Domain adaptation: LoRA against
peft, replay, an extended tokenizer. Compression: int8 against torch, GGUF against gguf and transformers, pruning
against torch's, distillation's KL against TRL's."""

import copy

import numpy as np
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


def test_ggml_quantizers_pack_the_bytes_of_gguf():
    "Our Q8_0 and Q4_0 give gguf's bytes bit for bit (zero blocks, ties and signs included) and its values back."
    import gguf

    torch.manual_seed(0)
    weight = torch.randn(16, 128) * 0.02
    weight[0, :32] = 0  # a block of zeros: scale 0
    weight[1, :32] = 0.5  # a block of ties
    weight[2, 32:64] = torch.linspace(-1, 0.5, 32)  # its largest |w| negative
    for file_type, ours in S.GGML_QUANTIZERS.items():
        qtype = getattr(gguf.GGMLQuantizationType, file_type)
        packed = S.ggml_bytes(ours(weight))
        assert np.array_equal(packed, gguf.quants.quantize(weight.numpy(), qtype))
        assert np.array_equal(gguf.quants.dequantize(packed, qtype), ours(weight).dequantize().numpy())
        assert ours(weight).nbytes() == packed.nbytes
    with pytest.raises(ValueError, match="blocks of 32"):
        S.quantize_q8_0(torch.randn(4, 48))


def gguf_pair(n_layer=2):
    "A small tokenizer and an untrained model of its vocabulary."
    tok = M.BPETokenizer(M.train_bpe(M.count_chunks(["def add(x, y):\n    return x + y\n"] * 20), 40))
    torch.manual_seed(0)
    return tok, M.Transformer(M.ModelConfig.from_depth(n_layer, tok.vocab_size, 32)).eval()


def test_gguf_files_load_in_transformers_with_our_logits(tmp_path):
    "transformers reads each of our GGUF files as the model holding the file's values, and its tokenizer as ours."
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = gguf_pair()
    x = torch.randint(0, tok.vocab_size, (2, 24))
    for file_type in S.GGUF_FILE_TYPES:
        path = S.write_gguf(model, tok, tmp_path / f"m-{file_type}.gguf", file_type)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, config=M.hf_config(model.config))
        with torch.no_grad():
            assert (hf(input_ids=x).logits - S.gguf_model(model, file_type)(x)).abs().max() < 1e-4, file_type
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary file left
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m-F32.gguf")
    text = "def add(x, y):\n\n    return x + 12345  # héllo"
    assert theirs.encode(text, add_special_tokens=False) == tok.encode_ordinary(text)
    with pytest.raises(ValueError, match="GGUF file type"):
        S.write_gguf(model, tok, tmp_path / "m.gguf", "Q5_K")
    with pytest.raises(ValueError, match="token rows"):
        S.write_gguf(trained(), tok, tmp_path / "m.gguf")


def test_pruning_masks_and_held_zeros():
    "Magnitude = torch's l1_unstructured; Wanda prunes each row alike; 2:4 keeps 2 of 4; held weights stay zero."
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 16, bias=False)
    ours = S.magnitude_mask(layer.weight.detach(), 0.5)
    torch_prune.l1_unstructured(layer, "weight", amount=0.5)
    assert torch.equal(ours, layer.weight_mask.bool())
    weight, rms = torch.randn(16, 64), torch.rand(64) + 0.1
    rms[5] = 0  # an input that is never active: Wanda prunes its column in every row, magnitude does not know
    wanda = S.wanda_mask(weight, rms, 0.25)
    assert (wanda.sum(1) == 48).all() and not wanda[:, 5].any()
    two_four = S.two_four_mask(weight.abs())
    assert (two_four.view(16, 16, 4).sum(-1) == 2).all()
    model = trained()
    masks = {n: S.magnitude_mask(m.weight.detach(), 0.5) for n, m in S.block_linears(model).items()}
    pruned = S.masked_model(model, masks)
    hooks = S.hold_masks(pruned, masks)
    optimizer = torch.optim.AdamW(pruned.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        x = torch.randint(0, 300, (2, 16))
        pruned(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    for h in hooks:
        h.remove()
    layers = dict(pruned.named_modules())
    assert all(not layers[n].weight[~m].any() for n, m in masks.items())
    assert S.sparse_bytes(model, masks) < 4 * sum(p.numel() for p in model.parameters())


def test_structured_pruning_is_a_smaller_qwen3_that_transformers_loads():
    "Keeping every piece changes nothing; keeping half is a smaller config transformers loads with our logits."
    torch.manual_seed(0)
    model = M.Transformer(M.ModelConfig.from_depth(4, 300, 32)).eval()  # 4 heads in 2 KV groups
    batches = [torch.randint(0, 300, (2, 32)) for _ in range(2)]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hessians = S.input_hessians(model, batches, names)
    c = model.config
    whole = S.prune_structure(model, hessians, c.ffn_hidden, c.n_head)
    x = batches[0]
    with torch.no_grad():
        assert torch.allclose(whole(x), model(x), atol=1e-5)
    half = S.prune_structure(model, hessians, c.ffn_hidden // 2, c.n_head // 2)
    assert (half.config.ffn_hidden, half.config.n_head, half.config.n_kv_head) == (c.ffn_hidden // 2, 2, 1)
    with torch.no_grad():
        assert (M.to_hf(half)(input_ids=x).logits - half(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="whole KV groups"):
        S.prune_structure(model, hessians, c.ffn_hidden, 3)


def test_distillation_loss_and_half_depth():
    "The KL term equals TRL's forward KL; weight 0 is cross-entropy; the student takes every other layer."
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    targets = torch.randint(0, 40, (2, 6))
    targets[1, :3] = -100
    keep = targets != -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, targets, beta=0.0, temperature=2.0)
    torch.testing.assert_close(S.soft_targets_kl(student[keep], teacher[keep], 2.0), theirs, rtol=1e-6, atol=1e-7)
    hard = torch.nn.functional.cross_entropy(student[keep], targets[keep])
    torch.testing.assert_close(S.distillation_loss(student, None, targets, weight=0.0), hard)
    assert S.distillation_loss(teacher, teacher, targets, weight=1.0).abs() < 1e-6  # the teacher is its own target
    big = M.Transformer(M.ModelConfig.from_depth(2, 300, 32, n_layer=4))
    small = S.half_depth(big)
    assert small.config.n_layer == 2
    assert torch.equal(small.layers[1].mlp.up_proj.weight, big.layers[2].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="no half depth"):
        S.half_depth(M.Transformer(M.ModelConfig.from_depth(1, 300, 32)))


def test_answer_bits_per_byte_counts_the_assistants_tokens_only():
    "A model that knows nothing (uniform logits) spends log2(vocabulary) bits on each answer token and end of turn."
    from llmbook.post_training import chat, chat_batch

    tok, model = gguf_pair()
    torch.nn.init.zeros_(model.lm_head.weight)
    conversations = [chat("What is add?", "x + y"), chat("And 2 + 3?", "5")]
    _, targets = chat_batch(tok, conversations)
    answer_bytes = len("x + y") + len("5")
    expected = int((targets != -100).sum()) * np.log2(tok.vocab_size) / answer_bytes
    assert S.answer_bits_per_byte(model, tok, conversations) == pytest.approx(expected, rel=1e-5)
