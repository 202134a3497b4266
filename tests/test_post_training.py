"""Chapter 5, post-training (first half): instruction data and its splits, the SFT and DPO losses against TRL on the
same batch, the DPO loss on a hand-checked example, the reward model, and GRPO's reward and update direction."""
import copy
import math
import os

import pytest
import torch

from llmbook import modeling as M
from llmbook import post_training as P

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    text = " ".join(P.QUESTIONS["summary"] + P.QUESTIONS["expression"] + [P.REFUSAL, "json.dumps (obj, *, indent=None) 12 + 30 = 42"])
    return M.BPETokenizer(M.train_bpe(M.count_chunks([text * 20]), 60))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return M.Transformer(M.ModelConfig.from_depth(1, tok.vocab_size, 128)).eval()


ENTRIES = [dict(name=f"pkg.mod{i}.func{i}", signature=f"(x, y={i})", summary=f"Return x plus {i}.", module=f"pkg.mod{i}",
                short=f"func{i}") for i in range(40)]


def conversations(n=6):
    tasks = P.instruction_tasks(ENTRIES[:3], n_expressions=n)
    return [P.chat(t["question"], t["answer"]) for t in tasks[:n]]


def test_instruction_tasks_and_splits():
    tasks = P.instruction_tasks(ENTRIES, n_expressions=300, seed=1)
    kinds = {t["kind"] for t in tasks}
    assert kinds == {"summary", "signature", "module", "expression", "refusal"}
    for t in tasks:
        if t["kind"] == "expression": assert str(eval(t["key"])) == t["answer"]
        if t["kind"] == "module": assert t["answer"] == t["key"].rsplit(".", 1)[0]
    train = {t["key"] for t in tasks if not P.is_eval_task(t)}
    held = {t["key"] for t in tasks if P.is_eval_task(t)}
    assert train and held and not train & held                      # a function's three questions never straddle the split
    from llmbook.data import expression_heldout
    assert all(expression_heldout(t["key"]) == P.is_eval_task(t) for t in tasks if t["kind"] == "expression")
    sample = P.evaluation_sample(tasks, per_kind=5)
    assert len(sample) == 25 and sample == P.evaluation_sample(tasks, per_kind=5)


def test_chat_batch_trains_only_the_assistant(tok):
    x, y = P.chat_batch(tok, [P.chat("What is `a`?", "b"), P.chat("Compute `1 + 1`.", "2")])
    assert x.shape == y.shape
    for row, (question, answer) in zip(y, [("What is `a`?", "b"), ("Compute `1 + 1`.", "2")]):
        assert tok.decode(row[row != -100].tolist()) == answer + M.END_OF_TURN


def test_sft_loss_equals_trl(tok, model, tmp_path):
    result = P.sft_parity(model, tok, conversations(), tmp_path)
    assert result["same_tokens"] and result["difference"] < 1e-5, result


def test_dpo_loss_on_a_hand_checked_example():
    loss, margin = P.dpo_loss(torch.tensor([-3.0, -1.0]), torch.tensor([-5.0, -1.0]), torch.tensor([-4.0, -1.0]),
                              torch.tensor([-4.0, -1.0]), beta=0.5)
    assert margin.tolist() == [1.0, 0.0]
    assert abs(loss.item() - (math.log1p(math.exp(-1.0)) + math.log(2)) / 2) < 1e-6


def test_dpo_loss_equals_trl(tok, model, tmp_path):
    pairs = P.preference_pairs(P.instruction_tasks(ENTRIES[:4], n_expressions=4, seed=2), seed=0)[:6]
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters(): p.add_(torch.randn_like(p) * 0.02)
    result = P.dpo_parity(policy, model, tok, pairs, tmp_path)
    assert result["max_logits_difference"] < 1e-4 and result["difference"] < 1e-5, result
    assert abs(result["our_loss"] - math.log(2)) > 1e-3


def test_preference_pairs_are_plausibly_wrong():
    tasks = P.instruction_tasks(ENTRIES, n_expressions=50)
    for pair in P.preference_pairs(tasks):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen != rejected
        if pair["kind"] == "expression": assert abs(int(chosen) - int(rejected)) == 1
        if pair["kind"] == "refusal": assert chosen == P.REFUSAL and rejected.startswith("Return x plus")


def test_reward_model_reads_the_last_token(tok, model):
    rm = P.RewardModel(copy.deepcopy(model))
    torch.nn.init.normal_(rm.score.weight)
    x, lengths = P.reward_inputs(tok, [P.chat("What is `a`?", "b"), P.chat("What is `abc`?", "a longer answer")])
    padded = torch.cat([x, torch.full((2, 5), tok.special_tokens[M.ENDOFTEXT])], dim=1)
    torch.testing.assert_close(rm(x, lengths), rm(padded, lengths))
    alone = rm(*P.reward_inputs(tok, [P.chat("What is `a`?", "b")]))
    torch.testing.assert_close(alone, rm(x, lengths)[:1])


def test_completion_reward(tok):
    end = tok.special_tokens[M.END_OF_TURN]
    assert P.completion_reward(tok, tok.encode_ordinary("42") + [end], "42") == 1.0
    assert P.completion_reward(tok, tok.encode_ordinary(" 42 ") + [end], "42") == 1.0
    assert P.completion_reward(tok, tok.encode_ordinary("42"), "42") == 0.0          # never stopped
    assert P.completion_reward(tok, tok.encode_ordinary("43") + [end], "42") == 0.0
    assert P.first_stop([5, 6, end, 7], {end}) == [5, 6] and P.first_stop([5, 6], {end}) == [5, 6]


def test_grpo_step_favours_the_rewarded_answer(tok, model):
    prompt = M.render_chat(tok, [dict(role="user", content="Compute `1 + 1`.")], add_generation_prompt=True)[0]
    end = tok.special_tokens[M.END_OF_TURN]
    good, bad = tok.encode_ordinary("2") + [end], tok.encode_ordinary("3") + [end]
    x, y = P.sequences_batch(tok, [prompt, prompt], [good, bad])
    policy = copy.deepcopy(model).train()
    before = P.sequence_logps(policy, x, y).tolist()
    loss, kl = P.grpo_loss(policy, model, x, y, torch.tensor([1.0, -1.0]), beta=0.04)
    assert abs(kl) < 1e-6                                         # policy = reference
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters(): p -= 0.05 * p.grad
    after = P.sequence_logps(policy, x, y).tolist()
    assert after[0] > before[0] and after[1] < before[1]


def test_sft_lowers_the_loss(tok, model):
    trained = copy.deepcopy(model)
    log = P.sft(trained, tok, conversations(8), steps=30, post=P.PostTrainingRecipe(batch_size=8))
    assert log[-1]["loss"] < log[0]["loss"] * 0.7
