"Chapter 7's engine on a small random model: batching, paging, prefix caching and text never change an answer."

import pytest
import torch

from llmbook.deployment import BlockPool, Engine, QueueFull, Request, SamplingParams, held_back
from llmbook.modeling import BPETokenizer, ModelConfig, Transformer, generate


@pytest.fixture(scope="module")
def model_and_tokenizer():
    "A 2-layer model over a bytes-only tokenizer, with weights large enough that greedy choices are clear-cut."
    torch.manual_seed(0)
    tokenizer = BPETokenizer([])
    model = Transformer(ModelConfig.from_depth(2, tokenizer.vocab_size, 96)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model, tokenizer


def prompts_of(tokenizer, n=7):
    texts = [
        "def f(x):",
        "import os",
        "x" * 40,
        "the quick brown fox jumps over the lazy dog",
        "a",
        "é" * 9,
        "π = 3.14",
    ]
    return [tokenizer.encode_ordinary(t) for t in (texts * 3)[:n]]


def alone(model, prompt, n):
    return generate(model, torch.tensor([prompt]), n)[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(max_batch_tokens=8), dict(block_size=4, num_blocks=20, max_running=5), dict(max_running=2)],
    ids=["plain", "chunked prefill", "preemption", "few running"],
)
def test_batched_greedy_equals_alone(model_and_tokenizer, settings):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, **settings)
    prompts = prompts_of(tokenizer)
    done = engine.complete(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert [r.output for r in done] == [alone(model, p, 20) for p in prompts]
    assert len(engine.pool.free) == engine.pool.num_blocks
    if "num_blocks" in settings:
        assert engine.stats["preemptions"] > 0


def test_prefix_cache_hit_gives_cold_logprobs(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer.encode_ordinary("a shared system prompt, then a question?")
    probe = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    engine = Engine(model, tokenizer, block_size=4)
    cold = engine.complete([prompt], probe)[0]
    engine.add(prompt, probe)
    hit = engine.step()[0]
    cold_engine = Engine(model, tokenizer, block_size=4)
    cold_engine.add(prompt, probe)
    reference = cold_engine.step()[0]
    assert cold.cached_tokens == 0 and engine.stats["cached_tokens"] == (len(prompt) - 1) // 4 * 4
    for (t1, a), (t2, b) in zip(hit.logprobs[0]["top"], reference.logprobs[0]["top"]):
        assert t1 == t2 and abs(a - b) < 1e-5


def test_seeded_sampling_ignores_the_company_it_keeps(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = prompts_of(tokenizer)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=3, ignore_eos=True)
    one = Engine(model, tokenizer).complete(prompts[:1], params)[0].output
    crowd = Engine(model, tokenizer).complete(prompts, params)[0].output
    assert one == crowd
    other = Engine(model, tokenizer).complete(prompts[:1], SamplingParams(**{**params.__dict__, "seed": 4}))[0]
    assert other.output != one


def test_refusals_name_their_numbers(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_waiting=1)
    with pytest.raises(ValueError, match=r"\(90 tokens\) plus max_tokens \(10\) is 100 tokens.*context of 96"):
        engine.add([1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="no tokens"):
        engine.add([], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        SamplingParams(top_p=1.5)
    engine.add([1, 2], SamplingParams())
    with pytest.raises(QueueFull):
        engine.add([1, 2], SamplingParams())


def test_abort_frees_blocks_and_is_idempotent(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, block_size=4)
    request = engine.add(prompts_of(tokenizer)[3], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    assert len(engine.pool.free) < engine.pool.num_blocks
    assert engine.abort(request.id) and not engine.abort(request.id)
    assert len(engine.pool.free) == engine.pool.num_blocks and not engine.has_work()


def test_streamed_text_never_splits_a_character_or_shows_a_stop_string(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    request = Request("r", [1], SamplingParams(max_tokens=20, stop=("END",)))
    engine.running.append(request)
    pieces = [engine._append(request, t, None).text for t in "é E".encode() + b"ND"]
    assert pieces[:2] == ["", "é"] and "E" not in "".join(pieces[:4])
    assert "".join(pieces) == request.text == "é " and request.finish_reason == "stop"
    assert held_back("abc EN", ("END",)) == 2 and held_back("abc", ("END",)) == 0


def test_block_pool_evicts_least_recently_freed_first(model_and_tokenizer):
    model, _ = model_and_tokenizer
    pool = BlockPool(model.config, num_blocks=3, block_size=2)
    a, b = pool.allocate(), pool.allocate()
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.release([a, b])  # b is freed first: it is evicted before a
    assert [pool.allocate() for _ in range(2)] == [2, b]
    assert pool.by_hash == {b"a": a}


# The server, through the official openai client and raw HTTP


class ScriptedModel(torch.nn.Module):
    "Writes `script` from position `start` on, whatever the prompt: a model whose tool calls a test can predict."

    def __init__(self, vocab_size: int, script: list[int], start: int, seq_len: int = 512):
        super().__init__()
        self.config = ModelConfig.from_depth(1, vocab_size, seq_len)
        self.lm_head = torch.nn.Linear(seq_len, vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for i, token in enumerate(script):
                self.lm_head.weight[token, start - 1 + i] = 100.0  # position p predicts token p + 1

    def hidden_states(self, ids, batch):
        return torch.nn.functional.one_hot(batch.positions, self.config.seq_len).float()[None]


@pytest.fixture
def serving(model_and_tokenizer):
    "Start a server on a free loopback port for an app; yields (url, app)."
    from llmbook.deployment import LocalServer

    servers = []

    def start(app):
        server = LocalServer(app)
        url = server.__enter__()
        servers.append(server)
        wait_until_ready(url)
        return url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def wait_until_ready(url, status=200):
    import time

    import httpx

    for _ in range(500):
        if httpx.get(f"{url}/health").status_code == status:
            return
        time.sleep(0.01)
    raise TimeoutError(url)


def client_for(url, key="secret"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_openai_client_chat_completions_and_streams(model_and_tokenizer, serving):
    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda: (model, tokenizer), "toy", api_key="secret"))
    client = client_for(url)
    assert [m.id for m in client.models.list().data] == ["toy"] and client.models.retrieve("toy").id == "toy"
    messages = [dict(role="user", content="hello")]
    whole = client.chat.completions.create(model="toy", messages=messages, max_tokens=12, temperature=0)
    from llmbook.modeling import render_chat

    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)[0]
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 12
    assert whole.choices[0].finish_reason == "length"
    expected = Engine(model, tokenizer).complete([prompt], SamplingParams(max_tokens=12, temperature=0))[0].text
    assert whole.choices[0].message.content == expected
    chunks = list(
        client.chat.completions.create(
            model="toy",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options=dict(include_usage=True),
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    text = client.completions.create(model="toy", prompt="def f(", max_tokens=5, temperature=0).choices[0].text
    ids = tokenizer.encode_ordinary("def f(")
    assert text == Engine(model, tokenizer).complete([ids], SamplingParams(max_tokens=5, temperature=0))[0].text
    with_logprobs = client.chat.completions.create(
        model="toy", messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    entries = with_logprobs.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)


def test_async_clients_at_once_get_their_answers_alone(model_and_tokenizer, serving):
    import asyncio

    from openai import AsyncOpenAI

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda: (model, tokenizer), "toy"))
    texts = ["a", "bb", "the quick brown fox", "é"]

    async def ask_all():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = lambda t: client.completions.create(model="toy", prompt=t, max_tokens=10, temperature=0)
        return await asyncio.gather(*(ask(t) for t in texts))

    answers = asyncio.run(ask_all())
    for text, answer in zip(texts, answers):
        alone_text = Engine(model, tokenizer).complete(
            [tokenizer.encode_ordinary(text)], SamplingParams(max_tokens=10, temperature=0)
        )
        assert answer.choices[0].text == alone_text[0].text


def test_tool_calls_come_back_in_openai_shape(model_and_tokenizer, serving):
    import json

    from llmbook.deployment import chat_prompt, make_app

    _, tokenizer = model_and_tokenizer
    tools = [dict(type="function", function=dict(name="calculator", description="+ - * / on numbers"))]
    messages = [dict(role="user", content="What is 2+2?")]
    start = len(chat_prompt(tokenizer, dict(messages=messages, tools=tools)))
    call = json.dumps(dict(name="calculator", arguments=dict(expression="2+2")))
    special = tokenizer.special_tokens
    script = [special["<|tool_call|>"], *tokenizer.encode_ordinary(call), special["<|end|>"]]
    model = ScriptedModel(tokenizer.vocab_size, script, start)
    url = serving(make_app(lambda: (model, tokenizer), "toy"))
    client = client_for(url)
    reply = client.chat.completions.create(model="toy", messages=messages, tools=tools, temperature=0, max_tokens=80)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "calculator"
    assert json.loads(tool_call.function.arguments) == {"expression": "2+2"}
    streamed = list(
        client.chat.completions.create(
            model="toy", messages=messages, tools=tools, temperature=0, max_tokens=80, stream=True
        )
    )
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"expression": "2+2"}
    assert streamed[-1].choices[0].finish_reason == "tool_calls"
    followed = messages + [
        choice.message.model_dump(exclude_none=True),
        dict(role="tool", tool_call_id=tool_call.id, content="4"),
    ]
    rendered = chat_prompt(tokenizer, dict(messages=followed, tools=tools))
    from llmbook.modeling import render_chat

    trained = render_chat(
        tokenizer,
        messages
        + [
            dict(role="assistant", content="", tool_calls=[dict(type="function", function=json.loads(call))]),
            dict(role="tool", content="4"),
        ],
        [dict(name="calculator", description="+ - * / on numbers")],
        add_generation_prompt=True,
    )[0]
    assert rendered == trained  # the client's call, sent back, renders as the model was trained


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(model_and_tokenizer, serving):
    import httpx
    from openai import AuthenticationError, BadRequestError, NotFoundError

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda: (model, tokenizer), "toy", api_key="secret"))
    key = {"authorization": "Bearer secret"}
    post = lambda body, headers=key: httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    cases = {
        "malformed JSON": (post(b"{not json"), 400),
        "not UTF-8": (post(b"\xff\xfe"), 400),
        "wrong type": (
            post(b'{"model": "toy", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}'),
            400,
        ),
        "out of range": (post(b'{"model": "toy", "messages": [{"role": "user", "content": "x"}], "top_p": 7}'), 400),
        "no messages": (post(b'{"model": "toy", "messages": []}'), 400),
        "unknown model": (post(b'{"model": "gpt", "messages": [{"role": "user", "content": "x"}]}'), 404),
        "no key": (post(b"{}", {}), 401),
        "unknown route": (httpx.get(f"{url}/v2/nothing", headers=key), 404),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, name
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    client = client_for(url)
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt")
    with pytest.raises(BadRequestError, match=r"\(196 tokens\) plus max_tokens \(10\)") as too_long:
        client.completions.create(model="toy", prompt="x" * 196, max_tokens=10)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(AuthenticationError):
        client_for(url, "wrong").models.list()
    assert client.completions.create(model="toy", prompt="still here", max_tokens=2).usage.completion_tokens == 2


def test_full_queue_429_and_loading_503(model_and_tokenizer, serving):
    import threading

    import httpx
    from openai import RateLimitError

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda: (model, tokenizer), "toy", engine_options=dict(max_waiting=0)))
    with pytest.raises(RateLimitError):
        client_for(url).completions.create(model="toy", prompt="x", max_tokens=2)
    loaded = threading.Event()

    def slow_load():
        loaded.wait(10)
        return model, tokenizer

    app = make_app(slow_load, "toy")
    from llmbook.deployment import LocalServer

    with LocalServer(app) as slow_url:
        body = {"model": "toy", "prompt": "x", "max_tokens": 2}
        assert httpx.get(f"{slow_url}/health").status_code == 503
        assert httpx.post(f"{slow_url}/v1/completions", json=body).status_code == 503
        loaded.set()
        wait_until_ready(slow_url)
        assert httpx.post(f"{slow_url}/v1/completions", json=body).status_code == 200


def test_a_client_that_leaves_frees_its_blocks(model_and_tokenizer, serving):
    import time

    import httpx

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    app = make_app(lambda: (model, tokenizer), "toy")
    url = serving(app)
    body = {"model": "toy", "prompt": "x", "max_tokens": 90, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    engine = app.state.served["engine"].engine
    for _ in range(200):
        if not engine.has_work():
            break
        time.sleep(0.01)
    assert not engine.has_work() and len(engine.pool.free) == engine.pool.num_blocks


def test_a_release_is_refused_by_the_name_of_what_changed(tmp_path):
    from llmbook.book import ArtifactError
    from llmbook.deployment import CHECKSUMS, verify_release, write_checksums

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x01")
    write_checksums(tmp_path)
    assert verify_release(tmp_path) == ["a.json", "sub/b.bin"]
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00\x02")
    with pytest.raises(ArtifactError, match=r"b\.bin: sha256"):
        verify_release(tmp_path)
    write_checksums(tmp_path)
    (tmp_path / "extra.txt").write_text("smuggled")
    with pytest.raises(ArtifactError, match="extra.txt is not listed"):
        verify_release(tmp_path)
    (tmp_path / "extra.txt").unlink()
    (tmp_path / "a.json").unlink()
    with pytest.raises(ArtifactError, match="a.json is listed in SHA256SUMS but missing"):
        verify_release(tmp_path)
    (tmp_path / CHECKSUMS).write_text(f"{'0' * 64}  ../outside\n")
    with pytest.raises(ArtifactError, match="line 1"):
        verify_release(tmp_path)


def test_an_engine_failure_is_a_500_and_the_server_keeps_serving(model_and_tokenizer, serving):
    from openai import APIError, InternalServerError

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer

    class Failing(torch.nn.Module):
        "The model, except that a prompt holding token 7 breaks the step it is in."

        def __init__(self):
            super().__init__()
            self.inner, self.config, self.lm_head = model, model.config, model.lm_head

        def hidden_states(self, ids, batch):
            if (ids == 7).any():
                raise RuntimeError("token 7")
            return self.inner.hidden_states(ids, batch)

    url = serving(make_app(lambda: (Failing(), tokenizer), "toy"))
    client = client_for(url)
    with pytest.raises(InternalServerError, match="token 7"):
        client.completions.create(model="toy", prompt=[7, 8], max_tokens=3)
    with pytest.raises(APIError, match="token 7"):
        list(client.completions.create(model="toy", prompt=[7, 8], max_tokens=3, stream=True))
    assert client.completions.create(model="toy", prompt=[8, 9], max_tokens=3).usage.completion_tokens == 3
