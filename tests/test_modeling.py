"""Chapter 3, the model: counts against Chapter 1's calculator, the KV cache, parity with transformers (dense and
MoE), the optimizers and schedules, gradient accumulation, the scaling-law fit, and distributed equivalence."""

import numpy as np
import pytest
import torch

from llmbook import modeling as M
from llmbook.foundations import flops_per_token, parameter_counts


def small(**kw):
    return M.ModelConfig.from_depth(2, 300, 32, **kw)


@pytest.mark.parametrize("depth, tied", [(1, True), (2, False), (3, True)])
def test_parameter_count_is_the_calculators(depth, tied):
    c = M.ModelConfig(**{**M.ModelConfig.from_depth(depth, 500, 64).__dict__, "tied_embeddings": tied})
    assert sum(p.numel() for p in M.Transformer(c).parameters()) == parameter_counts(c)["total"]


def test_flop_count_is_the_calculators():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c = M.ModelConfig.from_depth(2, 500, 48)
    x = torch.randint(0, 500, (3, 48))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        M.Transformer(c)(x)
    assert counter.get_total_flops() == flops_per_token(c, causal=False)["forward"] * x.numel()


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = M.Transformer(small()).eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = M.KVCache(model.config, 2, 20)
        parts = [model(x[:, :7], cache=cache), model(x[:, 7:15], cache=cache)] + [
            model(x[:, i : i + 1], cache=cache) for i in range(15, 20)
        ]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache full"):
        model(x[:, :1], cache=cache)


@pytest.mark.parametrize("moe", [False, True])
def test_logits_match_transformers_both_ways(moe):
    torch.manual_seed(1)
    c = small(n_experts=4, experts_per_token=2, expert_hidden=32) if moe else small()
    ours = M.Transformer(c).eval()
    hf = M.to_hf(ours)
    back = M.from_hf(hf)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        a, b, c_ = ours(x), hf(input_ids=x).logits, back(x)
    assert (a - b).abs().max() <= 1e-5 and (b - c_).abs().max() <= 1e-5
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")


def test_saved_model_loads_and_generates_the_same(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = M.BPETokenizer(M.train_bpe(M.count_chunks(["def f(x): return x + 1\n" * 50]), 40))
    torch.manual_seed(2)
    model = M.Transformer(M.ModelConfig.from_depth(1, tok.vocab_size, 64))
    M.save_hf(model, tok, tmp_path / "m")
    hf, auto_tok = AutoModelForCausalLM.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = auto_tok("def f(x):", return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert torch.equal(
        hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None), M.generate(model, ids, 10)
    )


def test_balancing_loss_equals_transformers():
    "E·Σ fᵢPᵢ over all layers, as transformers' load_balancing_loss_func computes it — also for unbalanced routers."
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(4)
    for layers, experts, k, skew in ((1, 2, 1, 3.0), (3, 4, 2, 1.0), (2, 8, 2, 0.0)):
        logits = [torch.randn(50, experts) + skew * torch.arange(experts).flip(0) for _ in range(layers)]
        ours = M.load_balancing_loss(logits, experts, k)
        assert torch.allclose(ours, load_balancing_loss_func(tuple(logits), experts, k), atol=1e-6)


def test_moe_routes_and_trains_like_transformers():
    torch.manual_seed(3)
    model = M.Transformer(small(n_experts=4, experts_per_token=2, expert_hidden=16))
    x = torch.randint(0, 300, (4, 32))
    y = torch.cat([x[:, 1:], torch.full((4, 1), -100)], dim=1)
    _, loss = model(x, y)
    hf = M.to_hf(model)
    with torch.no_grad():
        theirs = hf(input_ids=x, labels=x, output_router_logits=True).loss  # cross-entropy + coef × balancing loss
    assert abs(loss.item() - theirs.item()) < 1e-5
    loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_newton_schulz_and_muon():
    g = torch.randn(64, 128)
    s = torch.linalg.svdvals(M.newton_schulz(g))
    assert 0.6 < s.min() and s.max() < 1.25
    torch.manual_seed(0)
    model = M.Transformer(small())
    optimizer = M.make_optimizer(model, M.Recipe(optimizer="muon"))
    assert {g["kind"] for g in optimizer.param_groups} == {"muon", "adamw"}
    x = torch.randint(0, 300, (4, 32))
    losses = [
        M.train_step(model, optimizer, [(x, x)], M.Recipe(optimizer="muon", warmup_frac=0), s, 20)["loss"]
        for s in range(20)
    ]
    assert losses[-1] < losses[0] - 1.0
    state = optimizer.state_dict()
    again = M.make_optimizer(model, M.Recipe(optimizer="muon"))
    again.load_state_dict(state)
    assert again.state_dict()["state"].keys() == state["state"].keys()


def test_adamw_matches_torch():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    ours = M.MuonAdamW([dict(params=list(a.parameters()), kind="adamw", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))])
    theirs = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(10):
        x = torch.randn(4, 8)
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_schedules():
    r = M.Recipe(warmup_frac=0.1, final_lr_frac=0.1)
    assert M.lr_multiplier(0, 100, r) == pytest.approx(0.1) and M.lr_multiplier(9, 100, r) == pytest.approx(1.0)
    assert M.lr_multiplier(99, 100, r) == pytest.approx(0.1, abs=0.01)
    wsd = M.Recipe(schedule="wsd", warmup_frac=0.1, decay_frac=0.3)
    assert M.lr_multiplier(50, 100, wsd) == 1.0 and M.lr_multiplier(99, 100, wsd) < 0.15


def test_accumulation_equals_a_bigger_batch():
    x = torch.randint(0, 300, (8, 32))
    grads = []
    for micro in ([(x, x)], [(x[:4], x[:4]), (x[4:], x[4:])]):
        torch.manual_seed(0)
        model = M.Transformer(small())
        for xb, yb in micro:
            (model(xb, yb)[1] / len(micro)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_scaling_fit_recovers_a_known_law():
    rng = np.random.default_rng(0)
    truth = dict(E=2.0, A=400.0, B=900.0, alpha=0.35, beta=0.3)
    n = np.repeat([1e5, 3e5, 1e6, 3e6], 4)
    d = np.tile([1e6, 3e6, 1e7, 3e7], 4)
    losses = M.predicted_loss(truth, n, d) * np.exp(rng.normal(0, 0.002, len(n)))
    fit = M.fit_scaling_law(n, d, losses)
    assert abs(fit["alpha"] - 0.35) < 0.05 and abs(fit["beta"] - 0.3) < 0.05 and abs(fit["E"] - 2.0) < 0.25
    assert np.abs(M.predicted_loss(fit, n, d) / losses - 1).max() < 0.01


def test_scaling_fit_stays_bounded_on_few_noisy_pilots():
    "Six noisy pilots on a narrow grid (the tiny preset's shape): exponents stay in bounds, E under every loss."
    rng = np.random.default_rng(1)
    truth = dict(E=3.0, A=60.0, B=300.0, alpha=0.3, beta=0.4)
    n, d = np.repeat([2e5, 4e5, 8e5], 2), np.tile([2e5, 6e5], 3)
    losses = M.predicted_loss(truth, n, d) * np.exp(rng.normal(0, 0.03, len(n)))
    fit = M.fit_scaling_law(n, d, losses)
    low, high = M.SCALING_EXPONENT_BOUNDS
    assert low <= fit["alpha"] <= high and low <= fit["beta"] <= high and fit["E"] < losses.min()
    left_out = M.leave_one_out(n, d, losses)
    assert len(left_out) == 6 and all(low <= r["alpha"] <= high for r in left_out)
    assert max(abs(r["error"]) for r in left_out) < 0.2


def _toy_tokens(tmp_path):
    import datasets

    tok = M.BPETokenizer(M.train_bpe(M.count_chunks(["alpha beta gamma delta " * 40]), 30))
    rng = np.random.default_rng(0)
    docs = [
        dict(text=" ".join(rng.choice(["alpha", "beta", "gamma", "delta"], rng.integers(20, 200))), domain="prose")
        for _ in range(80)
    ]
    corpus = datasets.DatasetDict(train=datasets.Dataset.from_list(docs), val=datasets.Dataset.from_list(docs[:5]))
    M.write_tokens(corpus, tok, tmp_path / "tokens", "digest")
    return tok, tmp_path / "tokens"


def test_distributed_equals_one_process(tmp_path):
    tok, tokens = _toy_tokens(tmp_path)
    sizes = dict(depth=1, vocab_size=tok.vocab_size, seq_len=32, batch_size=2, steps=3)
    losses = M.launch_distributed_check(tokens, tmp_path / "out", **sizes)
    reference, _ = M.single_process_reference(tokens, **sizes)
    for mode in ("ddp", "fsdp"):
        assert np.allclose(losses[mode], reference, rtol=1e-4), (mode, losses[mode], reference)


def test_bf16_training_reaches_fp32_loss(tmp_path):
    tok, tokens = _toy_tokens(tmp_path)
    config = M.ModelConfig.from_depth(1, tok.vocab_size, 32)
    check = M.precision_check(config, tokens, steps=200, batch_size=4)
    assert check["relative_gap"] <= check["allowed_gap"], check
    assert len(check["fp32"]) == len(check["bf16"]) == 3 and check["allowed_gap"] >= M.BF16_LOSS_TOLERANCE


def test_repeated_sequences_score_only_the_second_copy():
    x, y = M.repeated_sequences(64, 32, 100, torch.Generator().manual_seed(0), low=0)
    lengths = set()
    for row in range(64):
        scored = (y[row] != -100).nonzero().flatten()
        lengths.add(len(scored) + 1)
        assert scored[-1] == 31 and (y[row, scored] == x[row, scored + 1 - (len(scored) + 1)]).all()
    assert len(lengths) > 5 and min(lengths) >= 4 and max(lengths) <= 16  # lengths, and so offsets, vary


def test_copying_model_is_a_starting_point_for_pretraining(tmp_path):
    from llmbook.book import load_safetensors
    from llmbook.training import load_model_state

    tok, _ = _toy_tokens(tmp_path)
    weights = tmp_path / "depth-2.safetensors"
    run = M.copying_run(2, tok, M.Recipe(lr=0.02), 2e8, 4, weights=weights)
    assert 0 <= run["accuracy"] <= 1 and weights.exists()
    model = M.Transformer(M.ModelConfig.from_depth(2, tok.vocab_size, 128))  # the pretraining context, not the rows'
    load_model_state(model, load_safetensors(weights))
    assert model.lm_head.weight is model.embed_tokens.weight  # the tied head was saved once and is still tied
