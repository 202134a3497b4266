"""Chapter 5, post-training. First half: instruction data and its splits, the SFT, DPO, reward-model and GRPO losses
against TRL on the same batch, the DPO loss on a hand-checked example, the reward model, and GRPO's reward, advantages
and update direction. Second half: the sandbox against hostile expressions and against extreme arguments to every
allowed operation (its worker process killed and replaced at its limits), the tools, step-by-step reductions and their
labels, the process reward model's reading positions, the tool-call loop, BM25 against bm25s, RAFT data and
citations."""

import copy
import math
import os
import time

import pytest
import torch

from llmbook import modeling as M
from llmbook import post_training as P

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    text = " ".join(
        P.QUESTIONS["summary"]
        + P.QUESTIONS["expression"]
        + [P.REFUSAL, "json.dumps (obj, *, indent=None) 12 + 30 = 42"]
    )
    return M.BPETokenizer(M.train_bpe(M.count_chunks([text * 20]), 60))


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return M.Transformer(M.ModelConfig.from_depth(1, tok.vocab_size, 128)).eval()


ENTRIES = [
    dict(
        name=f"pkg.mod{i}.func{i}",
        signature=f"(x, y={i})",
        summary=f"Return x plus {i}.",
        module=f"pkg.mod{i}",
        short=f"func{i}",
    )
    for i in range(40)
]


def conversations(n=6):
    tasks = P.instruction_tasks(ENTRIES[:3], n_expressions=n)
    return [P.chat(t["question"], t["answer"]) for t in tasks[:n]]


def test_instruction_tasks_and_splits():
    tasks = P.instruction_tasks(ENTRIES, n_expressions=300, seed=1)
    kinds = {t["kind"] for t in tasks}
    assert kinds == {"summary", "signature", "module", "expression", "refusal"}
    for t in tasks:
        if t["kind"] == "expression":
            assert str(eval(t["key"])) == t["answer"]
        if t["kind"] == "module":
            assert t["answer"] == t["key"].rsplit(".", 1)[0]
    train = {t["key"] for t in tasks if not P.is_eval_task(t)}
    held = {t["key"] for t in tasks if P.is_eval_task(t)}
    assert train and held and not train & held  # a function's three questions never straddle the split
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
    loss, margin = P.dpo_loss(
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-5.0, -1.0]),
        torch.tensor([-4.0, -1.0]),
        torch.tensor([-4.0, -1.0]),
        beta=0.5,
    )
    assert margin.tolist() == [1.0, 0.0]
    assert abs(loss.item() - (math.log1p(math.exp(-1.0)) + math.log(2)) / 2) < 1e-6


@pytest.mark.parametrize("sft_weight", [0.0, 1.0])  # DPO alone, and RPO (TRL's loss types "sigmoid" + "sft")
def test_dpo_loss_equals_trl(tok, model, tmp_path, sft_weight):
    pairs = P.preference_pairs(P.instruction_tasks(ENTRIES[:4], n_expressions=4, seed=2), seed=0)[:6]
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = P.dpo_parity(policy, model, tok, pairs, tmp_path, sft_weight=sft_weight)
    assert result["max_logits_difference"] < 1e-4 and result["difference"] < 1e-5, result
    assert abs(result["our_loss"] - math.log(2)) > 1e-3


def test_reward_model_loss_equals_trl(tok, model, tmp_path):
    pairs = P.preference_pairs(P.instruction_tasks(ENTRIES[:4], n_expressions=4, seed=2), seed=0)[:6]
    rm = P.RewardModel(copy.deepcopy(model))
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    torch.nn.init.constant_(rm.score.bias, 0.3)  # cancels in the loss; transformers' head has no bias
    result = P.reward_model_parity(rm, tok, pairs, tmp_path)
    assert result["same_tokens"] and result["difference"] < 1e-5 and result["max_reward_difference"] < 1e-4, result
    assert abs(result["our_loss"] - math.log(2)) > 1e-3


def test_grpo_loss_and_gradient_equal_trl(tok, model, tmp_path):
    end = tok.special_tokens[M.END_OF_TURN]
    said = lambda text, stops=True: tok.encode_ordinary(text) + [end] * stops
    tasks = [dict(question="Compute `1 + 1`.", answer="2"), dict(question="Compute `12 + 30`.", answer="42")]
    tasks.append(dict(question="What is the value of `2`?", answer="2"))
    groups = [
        [said("2"), said("3"), said("2", stops=False), said("12")],
        [said("42"), said("42"), said("41"), said("4")],
        [said("1"), said("3"), said("4"), said("5")],  # all wrong: no advantage, but in TRL's batch
    ]
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = P.grpo_parity(policy, model, tok, tasks, groups, tmp_path, beta=0.1)
    assert result["same_tokens"] and result["difference"] < 1e-5 and result["gradient_difference"] < 1e-4, result
    assert result["advantage_difference"] < 1e-3 and result["kl"] > 1e-6, result
    assert result["kl_correction_gradient_change"] > 0  # TRL's default KL correction changes the gradient


def test_group_advantages():
    torch.testing.assert_close(
        P.group_advantages(torch.tensor([1.0, 0.0])), torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0
    )
    assert P.group_advantages(torch.ones(3)) is None


def test_preference_pairs_are_plausibly_wrong():
    tasks = P.instruction_tasks(ENTRIES, n_expressions=50)
    for pair in P.preference_pairs(tasks):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen != rejected
        if pair["kind"] == "expression":
            assert abs(int(chosen) - int(rejected)) == 1
        if pair["kind"] == "refusal":
            assert chosen == P.REFUSAL and rejected.startswith("Return x plus")


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
    assert P.completion_reward(tok, tok.encode_ordinary("42"), "42") == 0.0  # never stopped
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
    assert abs(kl) < 1e-6  # policy = reference
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
    after = P.sequence_logps(policy, x, y).tolist()
    assert after[0] > before[0] and after[1] < before[1]


def test_sft_lowers_the_loss(tok, model):
    trained = copy.deepcopy(model)
    log = P.sft(trained, tok, conversations(8), steps=30, post=P.PostTrainingRecipe(batch_size=8))
    assert log[-1]["loss"] < log[0]["loss"] * 0.7


# ---- second half ----


def test_sandbox_refuses_every_hostile_expression():
    assert P.sandbox_escapes() == []
    for e in P.HOSTILE_EXPRESSIONS:
        with pytest.raises(P.SandboxError):
            P.sandbox_eval(e)


def test_sandbox_evaluates_the_allowed_subset():
    assert P.sandbox_eval("max(3, 14) * 2 + len('abc')") == "31"
    assert P.sandbox_eval("2 ** 10, -7 // 2, 7 % 3, abs(-2.5), round(2.675, 2)") == repr(
        (1024, -4, 1, 2.5, round(2.675, 2))
    )
    assert P.sandbox_eval("1 < 2 <= 2 != 3") == "True" and P.sandbox_eval("[1, 2] + [3]") == "[1, 2, 3]"
    tight = P.SandboxLimits(max_steps=5)
    with pytest.raises(P.SandboxError, match="more than 5 steps"):
        P.sandbox_eval("1 + 1 + 1 + 1 + 1", tight)
    with pytest.raises(P.SandboxError, match="digits"):
        P.sandbox_eval("10 ** 99 * 10 ** 99")
    with pytest.raises(P.SandboxError, match="an expression is text"):
        P.sandbox_eval(b"1 + 1")


def test_sandbox_bounds_arguments_before_computing():
    for expression, reason in [
        ("round(1, -10 ** 8)", "round"),
        ("'%0999999999d' % 0", "string formatting"),
        ("((((0,) * 100,) * 100,) * 100,) * 100", "items"),
        ("[[0] * 50] * 2", "items"),
        ("(-8) ** 0.5", "complex"),
    ]:
        with pytest.raises(P.SandboxError, match=reason):
            P.evaluate_expression(expression)
    assert P.evaluate_expression("round(1234, -2), [[0] * 50]") == repr((1200, [[0] * 50]))


def test_sandbox_extreme_arguments_are_answered_or_refused_quickly():
    expressions = P.extreme_expressions()
    assert len(expressions) > 5000 and "round(1, -10 ** 8)" in expressions
    slow = []
    for expression in expressions:
        started = time.perf_counter()
        try:
            P.sandbox_eval(expression)
        except P.SandboxError:
            pass
        if time.perf_counter() - started >= 1.0:
            slow.append(expression)
    worker = P.sandbox_worker()
    assert not slow, slow
    assert worker.alive() and worker.peak_mb < 256, worker.peak_mb
    assert P.sandbox_eval("1 + 1") == "2"


def test_sandbox_worker_is_killed_at_its_limits_and_replaced():
    assert P.sandbox_eval("2 + 2") == "4"
    for expression, limits, reason in [
        ("round(1, -10 ** 8)", P.SandboxLimits(max_size=10**9), "stopped after"),  # bounds off: the deadline acts
        ("'a' * 10 ** 9", P.SandboxLimits(max_size=10**10), "MB of memory"),  # bounds off: the memory limit acts
    ]:
        before = P.sandbox_worker().process.pid
        started = time.perf_counter()
        with pytest.raises(P.SandboxError, match=reason):
            P.sandbox_eval(expression, limits)
        assert time.perf_counter() - started < 1.0
        assert P.sandbox_eval("3 + 3") == "6" and P.sandbox_worker().process.pid != before


def test_sandbox_batch_keeps_each_deadline():
    loose = P.SandboxLimits(max_size=10**9)  # bounds off: the second expression runs until the worker is killed
    first, second, third = P.sandbox_eval_many(["1 + 1", "round(1, -10 ** 8)", "2 + 2"], loose)
    assert first == "2" and isinstance(second, P.SandboxError) and isinstance(third, P.SandboxError)
    assert P.sandbox_eval_many(["3 * 3", b"1", "__import__('os')"])[0] == "9"
    assert [isinstance(r, P.SandboxError) for r in P.sandbox_eval_many(["3 * 3", b"1", "open('x')"])] == [
        False,
        True,
        True,
    ]
    assert P.step_labels([("2 + 3 * 4", ["2 + 12", "15"]), ("5 - 1", ["4"])]) == [[True, False], [True]]


def test_sandbox_worker_runs_without_site_packages():
    source = P.sandbox_worker_source(256)
    assert "import torch" not in source and source.rstrip().endswith("serve_sandbox(256)")
    worker = P.sandbox_worker()
    assert worker.process.args[1:3] == ["-I", "-S"]


def test_tools_and_their_errors():
    assert P.calculator("(1234 + 66) * 2 / 4") == "650.0"
    with pytest.raises(P.SandboxError, match="the calculator takes"):
        P.calculator("max(1, 2)")
    assert P.call_tool(dict(name="python", arguments=dict(expression="len('four')"))) == "4"
    assert P.call_tool(dict(name="python", arguments=dict(expression="open('x')"))).startswith(
        "error: Call is not allowed"
    )
    assert P.call_tool(dict(name="rm", arguments=dict(expression="1"))) == "error: no tool named 'rm'"
    assert P.call_tool(dict(arguments=1)).startswith("error: a call is")
    problems = P.tool_problems(60, seed=3)
    assert len({p["expression"] for p in problems}) == 60 and {p["kind"] for p in problems} == {"calculator", "python"}
    for p in problems:
        assert p["answer"] == repr(eval(p["expression"]))


def test_tool_trace_renders_and_trains_the_call(tok):
    problem = P.tool_problems(1, seed=0)[0]
    row = dict(messages=P.tool_trace(problem), tools=P.TOOLS)
    ids, mask = M.render_chat(tok, row["messages"], tools=P.TOOLS)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert (
        "<|tool_call|>" in trained
        and problem["expression"] in trained
        and trained.endswith(problem["answer"] + M.END_OF_TURN)
    )
    x, y = P.chat_batch(tok, [row, P.chat("a", "b")], 1 << 16)
    assert tok.decode(y[0][y[0] != -100].tolist()) == trained


def test_run_with_tools_executes_the_call(tok, model, monkeypatch):
    call = '{"name": "calculator", "arguments": {"expression": "1234 * 5"}}'
    replies = iter([[tok.special_tokens["<|tool_call|>"]] + tok.encode_ordinary(call), tok.encode_ordinary("6170")])
    monkeypatch.setattr(P, "complete", lambda *args, **kwargs: [next(replies)])
    conversation = P.run_with_tools(model, tok, ["What is the value of `1234 * 5`?"])[0]
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[1]["tool_calls"][0]["function"]["arguments"]["expression"] == "1234 * 5"
    assert conversation[2]["content"] == "6170" and conversation[3]["content"] == "6170"


def test_reductions_and_their_labels():
    assert P.reduction_steps("7 - 2 * (3 + 4)") == ["7 - 2 * 7", "7 - 14", "-7"]
    assert P.reduction_steps("(2 + 3) * (4 - 6)") == ["5 * (4 - 6)", "5 * -2", "-10"]
    assert P.label_steps("7 - 2 * (3 + 4)", ["7 - 2 * 7", "7 - 15", "-8", "__import__('os')"]) == [
        True,
        False,
        False,
        False,
    ]
    assert P.label_steps("7 - 2 * (3 + 4)", ["7 - 2 * 7", "7 - 14"]) == [True, False]  # stopped before the value
    assert P.label_steps("2 + 3", ["5"]) == [True]
    train, held = P.reasoning_problems(300, seed=1)
    assert len(train) + len(held) == 300 and held and not set(train) & set(held)
    for p in train[:50]:
        assert P.reduction_steps(p)[-1] == repr(eval(p))


def test_process_reward_model_reads_every_step_end(tok, model):
    newlines = P.newline_tokens(tok)
    assert newlines and all("\n" in tok.decode([t]) for t in newlines)
    problem, end = "2 + 3 * 4", tok.special_tokens[M.END_OF_TURN]
    newline = min(newlines)
    completion = tok.encode_ordinary("2 + 12") + [newline] + tok.encode_ordinary("15") + [end]
    row = P.labelled_solution(tok, problem, completion, newlines)
    prompt = P.reasoning_prompt(tok, problem)
    assert row["labels"] == [True, False] and row["ends"] == [
        len(prompt) + completion.index(newline),
        len(prompt) + len(completion) - 1,
    ]
    prm = P.RewardModel(copy.deepcopy(model))
    torch.nn.init.normal_(prm.score.weight)
    x, y = P.step_batch(tok, [row])
    assert (y >= 0).sum() == 2 and y[0, row["ends"]].tolist() == [1.0, 0.0]
    probabilities = P.step_probabilities(prm, tok, [row])[0]
    scores = prm.token_scores(x)[0, row["ends"]]
    torch.testing.assert_close(torch.tensor(probabilities), torch.sigmoid(scores).detach())
    assert P.final_answer(tok, completion) == "15"
    assert P.majority_vote(["3", "4", "4", "3"]) == "3" and P.weighted_vote(["3", "4", "4"], [0.9, 0.3, 0.3]) == "3"


def test_reward_model_round_trip(tok, model, tmp_path):
    rm = P.RewardModel(copy.deepcopy(model))
    torch.nn.init.normal_(rm.score.weight)
    P.save_reward_model(rm, tok, tmp_path / "rm")
    again = P.load_reward_model(tmp_path / "rm")
    x, lengths = P.reward_inputs(tok, [P.chat("What is `a`?", "b")])
    torch.testing.assert_close(again(x, lengths), rm(x, lengths))
    (tmp_path / "rm" / "head.safetensors").write_bytes(b"not a safetensors file")
    from llmbook.book import ArtifactError

    with pytest.raises(ArtifactError):
        P.load_reward_model(tmp_path / "rm")


def test_bm25_equals_bm25s():
    documents = [P.passage(e) for e in ENTRIES] + [
        "statistics.fmean(data): Convert data to floats and compute the arithmetic mean."
    ]
    queries = [
        "What does `statistics.fmean` do?",
        "Which module defines `func7`?",
        "Return x plus 3",
        "nothing matches zzz",
    ]
    result = P.bm25_parity(documents, queries)
    assert result["max_score_difference"] < 1e-5 and result["top10_agreement"] == 1.0, result
    index = P.BM25(documents)
    assert index.search(queries[0], 1) == [len(ENTRIES)] and index.search("pkg mod7 func7", 1) == [7]
    assert P.words("statistics.fmean(data)") == ["statistics", "fmean", "data"]


def test_raft_conversations_cite_the_right_passage():
    documents = [P.passage(e) for e in ENTRIES]
    document_of = {e["name"]: i for i, e in enumerate(ENTRIES)}
    tasks = [t for t in P.instruction_tasks(ENTRIES, 0) if t["kind"] in P.RAG_KINDS]
    conversations = P.raft_conversations(tasks, documents, document_of, P.BM25(documents), golden=0.8, seed=0)
    with_citation = 0
    for t, (user, assistant) in zip(tasks, conversations):
        answer, n = P.cited(assistant["content"])
        assert answer == t["answer"] and user["content"].startswith(t["question"])
        shown = user["content"].split("Sources:\n", 1)[1].split("\n")
        assert len(shown) == P.RAG_PASSAGES and shown[-1].startswith("[1] ")
        passages = {int(line[1 : line.index("]")]): line[line.index("]") + 2 :] for line in shown}
        if n is None:
            assert documents[document_of[t["key"]]] not in passages.values()
        else:
            with_citation += 1
            assert passages[n] == documents[document_of[t["key"]]]
    assert 0.7 < with_citation / len(tasks) < 0.9
