"""Chapter 3, the tokenizer: round trip under fuzzing, parity with Hugging Face and tiktoken, special tokens,
the chat template's assistant mask, token files and the packed loader."""

import inspect
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmbook import modeling as M


@pytest.fixture(scope="module")
def tokenizer():
    import argparse
    import collections
    import difflib
    import email.message
    import inspect as insp
    import json as j
    import textwrap

    texts = [insp.getsource(m) for m in (argparse, collections, difflib, email.message, j, textwrap)]
    texts += ["Ünïcödé prose — with “quotes”, emoji 🐍 and 中文 text.\n" * 20]
    return M.BPETokenizer(M.train_bpe(M.count_chunks(texts), 700))


def test_incremental_trainer_matches_the_naive_one():
    import collections

    chunks = M.count_chunks([inspect.getsource(json), "aaa aaaa aaaaa abab abababab"])
    words = {tuple(c.encode()): f for c, f in chunks.items()}
    naive = []
    for _ in range(120):
        counts = collections.Counter()
        for w, f in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += f
        pair = min(counts, key=lambda p: (-counts[p], p))
        naive.append(pair)
        merged = collections.Counter()
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(255 + len(naive))
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += f
        words = merged
    assert M.train_bpe(chunks, 120) == naive


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(tokenizer, text):
    assert tokenizer.decode_bytes(tokenizer.encode_ordinary(text)) == text.encode("utf-8", "surrogatepass")


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_round_trip_any_bytes(tokenizer, data):
    assert tokenizer.decode_bytes(tokenizer.encode_bytes(data)) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\ud800", "\udfff", "a", " ", "\n", "é", "<|end|>"]), max_size=40).map("".join))
def test_round_trip_lone_surrogates(tokenizer, text):
    assert tokenizer.decode_bytes(tokenizer.encode_ordinary(text)).decode("utf-8", "surrogatepass") == text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(list(M.SPECIAL_TOKENS) + ["<|", "|>", "end", " ", "x", "\n"]), max_size=30).map("".join)
)
def test_special_tokens_never_come_from_text(tokenizer, text):
    special = set(tokenizer.special_tokens.values())
    assert not special & set(tokenizer.encode_ordinary(text))
    assert not special & set(M.to_tiktoken(tokenizer).encode_ordinary(text))
    assert not special & set(M.plain_text_backend(tokenizer).encode(text, add_special_tokens=False).ids)


def test_parity_with_huggingface_and_tiktoken(tokenizer):
    import ast
    import csv
    import fractions
    import statistics

    texts = [inspect.getsource(m) for m in (ast, csv, fractions, statistics)] + [
        "x" * 5000,
        "  \n\t\t  \n",
        "1234567890" * 30,
    ]
    result = M.parity(tokenizer, texts)
    assert result["fraction"] == 1.0, result


def test_hf_merges_are_in_our_format():
    texts = [inspect.getsource(json)] * 2
    tok = M.BPETokenizer(M.hf_bpe_merges(texts, 200))
    assert len(tok.merges) == 200 and M.parity(tok, texts)["fraction"] == 1.0


def test_chat_template_mask_matches_ours(tokenizer):
    hf = M.to_transformers(tokenizer)
    conversations = [
        [
            {"role": "user", "content": "What does json.dumps do?"},
            {"role": "assistant", "content": "Serialize obj to a JSON string."},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+2"}}}
                ],
            },
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    for messages in conversations:
        rendered = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = M.render_chat(tokenizer, messages)
        assert rendered["input_ids"] == ids and rendered["assistant_masks"] == mask
        assert tokenizer.decode([i for i, m in zip(ids, mask) if m]).endswith(M.END_OF_TURN)
        assert not any(m for i, m in zip(ids, mask) if i == tokenizer.special_tokens["<|user|>"])


def test_saved_tokenizer_loads_with_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    M.save_tokenizer(tokenizer, tmp_path / "tok")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "def f(x):\n    return x ** 2  # square"
    assert auto(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_ordinary(text)
    assert auto.eos_token == M.END_OF_TURN and auto.chat_template == M.CHAT_TEMPLATE
    assert M.load_tokenizer(tmp_path / "tok").merges == tokenizer.merges


@pytest.fixture(scope="module")
def token_files(tokenizer, tmp_path_factory):
    import datasets

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(", ")", ":"]

    def docs(n):
        return [
            dict(text=" ".join(rng.choice(words, rng.integers(5, 400))), domain=["code", "prose"][i % 2])
            for i in range(n)
        ]

    corpus = datasets.DatasetDict({s: datasets.Dataset.from_list(docs(n)) for s, n in (("train", 300), ("val", 20))})
    directory = tmp_path_factory.mktemp("tokens") / "tokens"
    meta = M.write_tokens(corpus, tokenizer, directory, "digest")
    return directory, corpus, meta


def test_token_files(token_files, tokenizer):
    directory, corpus, meta = token_files
    ids, index, meta2 = M.open_tokens(directory, "train")
    assert meta2 == meta and ids.dtype == np.uint16 and len(index) == 300
    for k in (0, 7, 299):
        doc = ids[index["offset"][k] : index["offset"][k] + index["length"][k]]
        assert (
            doc[0] == tokenizer.special_tokens[M.ENDOFTEXT]
            and tokenizer.decode(doc[1:].tolist()) == corpus["train"][k]["text"]
        )
    assert sum(meta["splits"]["train"]["tokens_by_domain"].values()) == meta["splits"]["train"]["tokens"]
    with pytest.raises(ValueError, match="no split 'test'"):
        M.open_tokens(directory, "test")


def test_loader_is_deterministic_resumable_and_shards(token_files):
    directory, _, _ = token_files
    epochs = {"code": 1.0, "prose": 2.5}
    a = M.PackedLoader(directory, "train", 64, 4, epochs, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(4)]
    b = M.PackedLoader(directory, "train", 64, 4, epochs, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as a checkpoint stores it
    for (x1, y1), (x2, y2) in zip(expected, (b.next_batch() for _ in range(4))):
        assert (x1 == x2).all() and (y1 == y2).all() and (x1[:, 1:] == y1[:, :-1]).all()
    whole = M.PackedLoader(directory, "train", 64, 6, epochs, seed=3).next_batch()[0]
    parts = [
        M.PackedLoader(directory, "train", 64, 2, epochs, seed=3, rank=r, world_size=3).next_batch()[0]
        for r in range(3)
    ]
    for r in range(3):
        assert (whole[r::3] == parts[r]).all()


def test_epoch_order_follows_the_mixture():
    domains = np.array([0] * 50 + [1] * 50, dtype=np.int8)
    order = M.epoch_order(domains, {"code": 1.0, "prose": 2.5}, seed=0)
    counts = np.bincount(domains[order], minlength=2)
    assert counts[0] == 50 and 110 <= counts[1] <= 140
    assert (np.bincount(order, minlength=100)[:50] == 1).all()
