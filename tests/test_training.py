"""Chapter 4, training: exact resume after SIGKILL (one process, and 2 processes under torchrun), 2 processes
(DDP, FSDP2) training like one, corrupt-checkpoint fallback, NaN rollback, metrics on resume, equal-wall-clock
runs, and the evaluation harness on hand-checked examples."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from llmbook import modeling as M
from llmbook import training as T


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    "A tokenizer and token files of a small synthetic corpus."
    import datasets

    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "(", ")", ":", "\n", "    ", "x", "y", "+", "1"]
    tok = M.BPETokenizer(M.train_bpe(M.count_chunks([" ".join(words) * 30]), 40))
    docs = [
        dict(text=" ".join(rng.choice(words, rng.integers(30, 300))), domain=["code", "prose"][i % 2])
        for i in range(120)
    ]
    corpus = datasets.DatasetDict(train=datasets.Dataset.from_list(docs), val=datasets.Dataset.from_list(docs[:10]))
    directory = tmp_path_factory.mktemp("toy") / "tokens"
    M.write_tokens(corpus, tok, directory, "digest")
    return tok, directory


def trainer(tok, directory, out, steps=12, **kw):
    torch.manual_seed(0)
    return T.Trainer(
        M.Transformer(M.ModelConfig.from_depth(1, tok.vocab_size, 32)),
        M.Recipe(),
        directory,
        out,
        steps,
        2,
        32,
        checkpoint_every=4,
        tensorboard=False,
        **kw,
    )


def tiny_spec(tok, directory, out, distributed="none", steps=12, batch_size=4, depth=2, **kw):
    "A pretraining job at `tiny` sizes: depth 2, 64 tokens of context, 4 rows per global batch."
    config = M.ModelConfig.from_depth(depth, tok.vocab_size, 64)
    return T.pretraining_spec(
        config, M.Recipe(), directory, out, steps, batch_size, checkpoint_every=4, tensorboard=False,
        distributed=distributed, **kw,
    )  # fmt: skip


def test_exact_resume_after_sigkill(toy, tmp_path):
    tok, directory = toy
    spec = tiny_spec(tok, directory, tmp_path, steps=30, batch_size=2, depth=1)
    result = T.exact_resume_check(spec, tmp_path, kill_after_checkpoints=3)
    assert result["identical"], result


@pytest.fixture(scope="module")
def one_process(toy, tmp_path_factory):
    "The final weights of the tiny job trained in this process."
    tok, directory = toy
    out = tmp_path_factory.mktemp("one-process")
    spec = tiny_spec(tok, directory, out)
    T.write_spec(spec)
    summary = T.pretrain(spec, progress=False)
    assert summary["world_size"] == 1 and summary["steps"] == 12
    return T.final_weights(out)


@pytest.fixture(scope="module")
def two_processes(toy, tmp_path_factory):
    "The tiny job under torchrun on 2 CPU processes (gloo), with DDP and with FSDP2: mode → (summary, directory)."
    tok, directory = toy
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode)
        runs[mode] = T.launch_pretraining(T.write_spec(tiny_spec(tok, directory, out, mode)), 2, progress=False), out
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one(one_process, two_processes, mode):
    "The same global batch of 4 rows (2 per rank): after 12 steps, the weights of one process within 1e-5."
    summary, out = two_processes[mode]
    assert (summary["world_size"], summary["distributed"], summary["steps"]) == (2, mode, 12)
    gap = T.largest_difference(T.final_weights(out), one_process)
    print(f"{mode}: largest weight difference from one process after 12 steps: {gap:.3g}")
    assert gap < 1e-5, gap
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # rank 0 alone logs


def test_distributed_resume_after_sigkill(toy, two_processes, tmp_path):
    "The FSDP2 job killed with SIGKILL (its process group: torchrun and both ranks) and started again ends the same."
    tok, directory = toy
    spec = tiny_spec(tok, directory, tmp_path, "fsdp")
    killed_after = T.kill_and_resume(spec, processes=2, kill_after_checkpoints=3)
    difference = T.largest_difference(T.final_weights(tmp_path), T.final_weights(two_processes["fsdp"][1]))
    print(f"killed after {killed_after}; largest difference from the uninterrupted job: {difference}")
    assert killed_after < "step-00000012" and difference == 0
    with pytest.raises(RuntimeError, match="written by 2 processes and this run has 1"):
        T.pretrain(tiny_spec(tok, directory, tmp_path), progress=False)


def test_batch_must_split_over_ranks(toy, tmp_path, monkeypatch):
    tok, directory = toy
    monkeypatch.setattr(T, "rank_and_world", lambda: (0, 2))  # as rank 0 of 2 sees it
    with pytest.raises(ValueError, match="batch_size=3 rows do not split evenly over 2 processes"):
        T.Trainer(
            M.Transformer(M.ModelConfig.from_depth(1, tok.vocab_size, 32)), M.Recipe(), directory, tmp_path, 4, 3, 32
        )


def test_corrupt_checkpoint_falls_back(toy, tmp_path):
    tok, directory = toy
    trainer(tok, directory, tmp_path).fit(progress=False)
    newest, previous = T.checkpoints(tmp_path)[:2]
    (newest / "optimizer.safetensors").write_bytes(b"truncated")
    messages = []
    again = trainer(tok, directory, tmp_path)
    assert again.load_latest(messages.append) and again.step == int(previous.name.split("-")[1])
    assert "optimizer.safetensors does not match its sha256" in messages[0]
    (previous / "manifest.json").unlink()
    with pytest.raises(T.CorruptCheckpoint, match="no readable manifest"):
        T.verify_checkpoint(previous)


def test_checkpoint_of_another_run_is_not_resumed(toy, tmp_path):
    tok, directory = toy
    trainer(tok, directory, tmp_path, steps=8).fit(progress=False)
    messages = []
    assert not trainer(tok, directory, tmp_path, steps=9).load_latest(messages.append)
    assert "belongs to another run" in messages[0]


def test_nan_rolls_back_and_backs_off(toy, tmp_path):
    tok, directory = toy
    t = trainer(tok, directory, tmp_path, steps=14)
    t.inject_nan_at = 6
    summary = t.fit(progress=False, log=lambda m: None)
    assert summary["rollbacks"] == 1 and t.lr_scale == 0.5 and summary["steps"] == 14
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert [e["event"] for e in summary["events"]] == ["non-finite"]


def test_metrics_are_cut_back_to_the_resumed_step(toy, tmp_path):
    tok, directory = toy
    trainer(tok, directory, tmp_path, steps=12).fit(progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 99, "loss": 1.0}\n{"step": 100, "lo')  # what a killed run could leave
    t = trainer(tok, directory, tmp_path, steps=12)
    t.load_latest()
    t._start_logging()
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_optimizer_state_round_trip():
    model = M.Transformer(M.ModelConfig.from_depth(1, 100, 16))
    opt = M.make_optimizer(model, M.Recipe())
    x = torch.randint(0, 100, (2, 16))
    M.train_step(model, opt, [(x, x)], M.Recipe(), 0, 5)
    model_state, optimizer_state = T.full_state(model, opt)
    tensors, rest = T.flatten_optimizer_state(optimizer_state)
    assert "embed_tokens.weight.m" in tensors and "layers.0.mlp.down_proj.weight.momentum" in tensors
    fresh_model = M.Transformer(M.ModelConfig.from_depth(1, 100, 16))
    fresh = M.make_optimizer(fresh_model, M.Recipe())
    state = T.unflatten_optimizer_state(tensors, json.loads(json.dumps(rest)))  # the JSON part goes through state.json
    T.load_full_state(fresh_model, fresh, model_state, state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    restored, original = fresh.state_dict(), opt.state_dict()
    assert restored["param_groups"] == original["param_groups"] and restored["state"].keys() == original["state"].keys()
    for i, entry in original["state"].items():
        assert entry.keys() == restored["state"][i].keys()
        assert all(
            torch.equal(v, restored["state"][i][k]) if torch.is_tensor(v) else v == restored["state"][i][k]
            for k, v in entry.items()
        )


class Oracle(nn.Module):
    "A stub language model: it predicts the next token of any of `sequences` whose prefix it is given, else nothing."

    def __init__(self, vocab_size, sequences):
        super().__init__()
        self.vocab_size, self.sequences = vocab_size, [list(s) for s in sequences]
        self.lm_head = nn.Linear(1, 1)  # generate() reads the dtype from here
        self.config = M.ModelConfig.from_depth(1, vocab_size, 512)

    def forward(self, idx, targets=None, cache=None):
        full = idx
        if cache is not None:  # with a KV cache only new tokens come in: keep the history
            full = self.history = idx if cache.length == 0 else torch.cat([self.history, idx], 1)
            cache.length += idx.shape[1]
        logits = torch.zeros(full.shape[0], full.shape[1], self.vocab_size)
        for b, row in enumerate(full.tolist()):
            for s in self.sequences:
                if s[: len(row)] == row:
                    for i in range(len(row)):
                        if i + 1 < len(s):
                            logits[b, i, s[i + 1]] = 20.0
        return logits[:, -idx.shape[1] :]


def test_harness_on_hand_checked_examples(toy):
    tok, _ = toy
    document = (
        "mod\nA module.\n\nmod.add(a, b)\nReturn the sum of a and b.\n\nmod.neg(x)\nReturn minus x, always.\n\n"
        "mod.Box\nA class.\n\nmod.Box.open(self)\nOpen the box now please.\n\n"
        "mod.mul(a, b)\nMultiply two numbers together."
    )
    entries = T.api_entries([document])
    assert [(e["name"], e["signature"]) for e in entries] == [
        ("mod.add", "(a, b)"),
        ("mod.neg", "(x)"),
        ("mod.Box.open", "(self)"),
        ("mod.mul", "(a, b)"),
    ]
    bos = tok.special_tokens[M.ENDOFTEXT]
    knows = [[bos] + tok.encode_ordinary(f"{e['name']}{e['signature']}\n{e['summary']}") for e in entries]
    result = T.multiple_choice(Oracle(tok.vocab_size, knows), tok, entries, n_choices=4)
    assert result == dict(accuracy=1.0, correct=4, items=4, chance=0.25)
    assert T.multiple_choice(Oracle(tok.vocab_size, []), tok, entries, n_choices=4)["accuracy"] <= 1.0
    line = [bos] + tok.encode_ordinary("mod.add(a, b)\nnext")
    assert T.greedy_line(Oracle(tok.vocab_size, [line]), tok, "mod.add(") == "a, b)"
    assert T.signature_completion(Oracle(tok.vocab_size, [line]), tok, entries[:1])["accuracy"] == 1.0
    from llmbook.data import expression_heldout

    assert all(expression_heldout(e) for e in T.heldout_expressions(20))


def test_ngram_baselines_and_units(toy):
    tok, directory = toy
    b = T.ngram_baselines(directory, tok.vocab_size)
    assert b["bigram"] < b["unigram"]
    assert T.bits_per_byte(np.log(2), 1.0) == pytest.approx(
        1.0
    )  # ln 2 nats per token at one token per byte: one bit per byte
