"Chapter 7's engine on a small random model: batching, paging, prefix caching and text never change an answer."

import pytest
import torch

from llmbook.deployment import BlockPool, Engine, QueueFull, Request, SamplingParams, held_back
from llmbook.modeling import BPETokenizer, ModelConfig, Transformer, generate
from serving import ScriptedModel, client_for, wait_until_ready


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


def test_openai_client_chat_completions_and_streams(model_and_tokenizer, serving):
    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy", api_key="secret"))
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
    url = serving(make_app(lambda name: (model, tokenizer), "toy"))
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
    url = serving(make_app(lambda name: (model, tokenizer), "toy"))
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
    url = serving(make_app(lambda name: (model, tokenizer), "toy", api_key="secret"))
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
    still = client.completions.create(model="toy", prompt="still here", max_tokens=2, extra_body=dict(ignore_eos=True))
    assert still.usage.completion_tokens == 2


def test_full_queue_429_and_loading_503(model_and_tokenizer, serving):
    import threading

    import httpx
    from openai import RateLimitError

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy", engine_options=dict(max_waiting=0)))
    with pytest.raises(RateLimitError):
        client_for(url).completions.create(model="toy", prompt="x", max_tokens=2)
    loaded = threading.Event()

    def slow_load(name):
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
    app = make_app(lambda name: (model, tokenizer), "toy")
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
    metrics, toy = scrape(url), (("model_name", "toy"),)
    assert metrics[("llmbook:kv_cache_usage_perc", toy)] == 0
    assert metrics[("llmbook:request_success_total", (("finished_reason", "abort"), *toy))] == 1


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

    url = serving(make_app(lambda name: (Failing(), tokenizer), "toy"))
    client = client_for(url)
    with pytest.raises(InternalServerError, match="token 7"):
        client.completions.create(model="toy", prompt=[7, 8], max_tokens=3)
    with pytest.raises(APIError, match="token 7"):
        list(client.completions.create(model="toy", prompt=[7, 8], max_tokens=3, stream=True))
    after = client.completions.create(model="toy", prompt=[8, 9], max_tokens=3, extra_body=dict(ignore_eos=True))
    assert after.usage.completion_tokens == 3


def test_the_admin_key_alone_switches_and_rolls_back_the_served_model(model_and_tokenizer, serving):
    import httpx

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    torch.manual_seed(1)
    other = Transformer(model.config).eval()
    models = dict(toy=model, other=other)

    def load(name):
        if name not in models:
            raise FileNotFoundError(f"no model {name}")
        return models[name], tokenizer

    with pytest.raises(ValueError, match="must differ"):
        make_app(load, "toy", api_key="same", admin_key="same")
    closed = serving(make_app(load, "toy"))
    assert httpx.post(f"{closed}/admin/model", json=dict(model="other")).json()["error"]["code"] == "admin_disabled"
    url = serving(make_app(load, "toy", api_key="secret", admin_key="root"))
    admin = httpx.Client(base_url=url, headers=dict(authorization="Bearer root"))
    as_client = httpx.post(f"{url}/admin/model", json=dict(model="other"), headers=dict(authorization="Bearer secret"))
    assert as_client.status_code == 401
    prompt = tokenizer.encode_ordinary("def f(")
    long_stream = dict(model="toy", prompt=prompt, max_tokens=60, stream=True, ignore_eos=True, temperature=0)
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=long_stream, headers=dict(authorization="Bearer secret")
    ) as response:
        lines = (line for line in response.iter_lines() if line)
        first = next(lines)
        switched = admin.post("/admin/model", json=dict(model="other"))
        rest = list(lines)
    assert switched.json() == dict(model="other", previous="toy")
    assert first.startswith("data:") and rest[-1] == "data: [DONE]"  # the stream in flight finished on the old model
    client = client_for(url)
    assert [m.id for m in client.models.list().data] == ["other"]
    reply = client.completions.create(model="other", prompt=prompt, max_tokens=8, temperature=0)
    answer = reply.choices[0].text
    assert reply.model == "other"  # the response names the model that answered
    assert answer == Engine(other, tokenizer).complete([prompt], SamplingParams(max_tokens=8, temperature=0))[0].text
    refused = admin.post("/admin/model", json=dict(model="missing"))
    assert refused.status_code == 400 and "no model missing" in refused.json()["error"]["message"]
    assert admin.get("/admin/model").json() == dict(model="other", history=["toy"])
    assert admin.post("/admin/rollback").json() == dict(model="toy", previous="other")
    assert [m.id for m in client.models.list().data] == ["toy"]
    assert admin.post("/admin/rollback").status_code == 409


def scrape(url, key="secret"):
    from llmbook.deployment import scrape_metrics

    return scrape_metrics(url, key)


def test_64_streaming_clients_at_once_all_complete_and_the_metrics_count_them(model_and_tokenizer, serving):
    import asyncio

    from openai import AsyncOpenAI

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy", api_key="secret"))
    prompts = [f"request {i}: " + "x" * (i % 9) for i in range(64)]

    async def one(client, prompt):
        stream = await client.completions.create(
            model="toy",
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options=dict(include_usage=True),
            extra_body=dict(ignore_eos=True),
        )
        chunks = [chunk async for chunk in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    async def everyone():
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        return await asyncio.gather(*(one(client, p) for p in prompts), return_exceptions=True)

    answers = asyncio.run(everyone())
    assert not [a for a in answers if isinstance(a, BaseException)]
    assert all(usage.completion_tokens == 12 for _, usage in answers)
    expected = Engine(model, tokenizer).complete(
        [tokenizer.encode_ordinary(p) for p in prompts], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    assert [text for text, _ in answers] == [r.text for r in expected]
    metrics = scrape(url)
    toy = (("model_name", "toy"),)
    http = (("method", "POST"), ("route", "/v1/completions"), ("status", "200"))
    assert metrics[("llmbook:http_requests_total", http)] == 64
    assert metrics[("llmbook:prompt_tokens_total", toy)] == sum(u.prompt_tokens for _, u in answers)
    assert metrics[("llmbook:generation_tokens_total", toy)] == 64 * 12
    assert metrics[("llmbook:request_success_total", (("finished_reason", "length"), *toy))] == 64
    assert metrics[("llmbook:time_to_first_token_seconds_count", toy)] == 64
    assert metrics[("llmbook:inter_token_latency_seconds_count", toy)] == 64 * 11
    assert metrics[("llmbook:e2e_request_latency_seconds_count", toy)] == 64
    assert metrics[("llmbook:num_requests_running", toy)] == 0
    assert metrics[("llmbook:kv_cache_usage_perc", toy)] == 0


def test_the_request_log_is_one_json_line_per_request_without_text_unless_asked(model_and_tokenizer, serving, caplog):
    import json
    import logging
    import time

    import httpx

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    caplog.set_level(logging.INFO, logger="llmbook.serve")
    prompt = "write to ada.lovelace@analytical.org about "
    for log_prompts in (False, True):
        caplog.clear()
        url = serving(make_app(lambda name: (model, tokenizer), "toy", log_prompts=log_prompts))
        body = dict(model="toy", prompt=prompt, max_tokens=4, ignore_eos=True)
        sent = httpx.post(f"{url}/v1/completions", json=body, headers={"x-request-id": "abc"})
        httpx.post(f"{url}/v1/completions", content=b"{not json")
        for _ in range(200):  # a line is written once its response has been sent: a moment after the client has it
            lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llmbook.serve"]
            if any(line["status"] == 400 for line in lines):
                break
            time.sleep(0.01)
        generation = next(line for line in lines if line["id"] == "abc")
        assert sent.headers["x-request-id"] == "abc" and generation["status"] == 200
        assert generation["route"] == "/v1/completions" and generation["completion_tokens"] == 4
        assert generation["prompt_tokens"] == sent.json()["usage"]["prompt_tokens"]
        assert any(line["status"] == 400 and "prompt_tokens" not in line for line in lines)
        logged = json.dumps(lines)
        assert "ada.lovelace" not in logged
        assert ("prompt" in generation) == log_prompts
    assert generation["prompt"].startswith("write to <") and generation["prompt"].endswith("> about ")


def test_faults_get_4xx_or_a_timeout_and_the_server_keeps_serving(model_and_tokenizer, serving):
    import time

    import httpx

    from llmbook.deployment import make_app

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy", body_timeout_s=0.5))
    chat = lambda **fields: dict(model="toy", messages=[dict(role="user", content="x")], **fields)
    post = lambda body, route="chat/completions": httpx.post(f"{url}/v1/{route}", json=body, timeout=10)

    def trickled(body: bytes, pause: float):
        for i in range(len(body)):
            time.sleep(pause)
            yield body[i : i + 1]

    whole = b'{"model": "toy", "prompt": "a byte at a time", "max_tokens": 3, "ignore_eos": true}'
    cases = {
        "negative max_tokens": (post(chat(max_tokens=-5)), 400),
        "huge max_tokens": (post(chat(max_tokens=10**12)), 400),
        "fractional max_tokens": (post(chat(max_tokens=2.5)), 400),
        "max_tokens as a string": (post(chat(max_tokens="3")), 400),
        "unknown field": (post(chat(temprature=0.5)), 400),
        "a message that is not an object": (post(dict(model="toy", messages=["hi"])), 400),
        "a tool without a function": (post(chat(tools=[dict(type="function")])), 400),
        "a tool_choice we do not support": (post(chat(tool_choice="required")), 400),
        "a JSON list": (post([1, 2]), 400),
        "an empty body": (httpx.post(f"{url}/v1/completions", content=b""), 400),
        "a prompt of token ids out of range": (post(dict(model="toy", prompt=[10**9]), "completions"), 400),
        "a body too slow to arrive": (httpx.post(f"{url}/v1/completions", content=trickled(whole, 0.1)), 408),
    }
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.status_code, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}, name
    assert "temprature" in cases["unknown field"][0].json()["error"]["message"]
    byte_by_byte = httpx.post(f"{url}/v1/completions", content=trickled(whole, 0))
    assert byte_by_byte.status_code == 200 and byte_by_byte.json()["usage"]["completion_tokens"] == 3


def test_canaries_pass_at_the_bar_and_fail_below_it(model_and_tokenizer, serving, tmp_path, capsys):
    import json

    from llmbook.deployment import canary, canary_cases, make_app, run_canaries

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy", api_key="secret"))
    tasks = [dict(kind=k, question=f"{k} question {i}?", answer="x") for k in ("a", "b") for i in range(6)]
    cases = canary_cases(tasks, per_kind=2)
    assert [c["kind"] for c in cases] == ["a", "a", "b", "b"]
    said = [r["said"] for r in run_canaries(url, "toy", dict(cases=cases), "secret")]
    cases[0]["answer"] = said[0]  # one canary the model gets right
    path = tmp_path / "canaries.json"
    path.write_text(json.dumps(dict(cases=cases, baseline=dict(model="toy", right=1, answers=said))))
    assert canary(url, "toy", path, "secret") == 0
    assert "1 of 4 right (toy at release: 1), 4 as released, 0 errors" in capsys.readouterr().out
    assert canary(url, "toy", path, "secret", min_right=1) == 0
    assert canary(url, "toy", path, "secret", min_right=2) == 1
    path.write_text(json.dumps(dict(cases=cases, baseline=dict(model="toy", right=1, answers=[*said[:3], "other"]))))
    assert canary(url, "toy", path, "secret") == 1  # one answer is not the release's: served wrong
    assert canary(url, "toy", path, "wrong key") == 1  # every request fails: 401
    assert "AuthenticationError" in capsys.readouterr().out


def test_the_serving_benchmark_measures_any_openai_server(model_and_tokenizer, serving):
    from llmbook.deployment import make_app, scrape_metrics, serving_benchmark

    model, tokenizer = model_and_tokenizer
    url = serving(make_app(lambda name: (model, tokenizer), "toy"))
    waves = serving_benchmark(url, "toy", concurrency=(1, 4), requests=8, prompt_words=6, new_tokens=5)
    assert [w["clients"] for w in waves] == [1, 4] and all(w["requests"] == 8 for w in waves)
    assert waves[0]["vs_one_at_a_time"] == 1 and all(w["ttft_p50_ms"] > 0 for w in waves)
    generated = scrape_metrics(url)[("llmbook:generation_tokens_total", (("model_name", "toy"),))]
    assert generated == (8 + 8 + 4) * 5  # two waves and the warm-up, each request exactly 5 tokens


def test_the_chat_page_streams_shows_a_tool_call_and_cited_passages(model_and_tokenizer, serving):
    "In Debian's chromium, headless, driven by playwright: .ci/run installs chromium where it is missing."
    import json
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from llmbook.deployment import chat_prompt, make_app, openai_tools
    from llmbook.post_training import retrieval_prompt

    _, tokenizer = model_and_tokenizer
    tools, question = openai_tools(), "What is 2+2?"
    passages = [f"{name}(x): a passage long enough to keep the model's three scripts apart, " * 2 for name in "ab"]
    user = lambda content: dict(messages=[dict(role="user", content=content)])
    special, encode = tokenizer.special_tokens, tokenizer.encode_ordinary
    call = json.dumps(dict(name="calculator", arguments=dict(expression="2+2")))
    plain = [*encode("Four, I think."), special["<|end|>"]]
    model = ScriptedModel(tokenizer.vocab_size, plain, len(chat_prompt(tokenizer, user(question))))
    model.write(
        [special["<|tool_call|>"], *encode(call), special["<|end|>"]],
        len(chat_prompt(tokenizer, dict(user(question), tools=tools))),
    )
    with_passages = user(retrieval_prompt(question, passages))
    model.write([*encode("4 [1]"), special["<|end|>"]], len(chat_prompt(tokenizer, with_passages)))
    app = make_app(lambda name: (model, tokenizer), "toy", api_key="secret", tools=tools, retriever=lambda q: passages)
    url = serving(app)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()

        def ask(box: str | None = None):
            page.reload()
            page.wait_for_function("document.querySelector('#model').options.length === 1")
            if box:
                page.check(box)
            page.fill("#question", question)
            page.click("#send")
            page.wait_for_function("document.body.dataset.answers === '1'")
            return page.locator(".assistant").last

        page.goto(url)
        page.fill("#key", "secret")
        page.dispatch_event("#key", "change")
        answer = ask()
        assert answer.inner_text() == "Four, I think." and int(answer.get_attribute("data-pieces")) > 1  # streamed
        ask("#use-tools")
        assert page.locator(".tool-call").inner_text() == 'calls calculator({"expression": "2+2"})'
        assert page.locator(".assistant").count() == 0  # only the call is shown, no empty answer
        cited = ask("#use-retrieval")
        assert cited.locator(".sources li").count() == 2
        assert cited.locator(".sources li.cited").inner_text() == passages[0].strip()
        browser.close()


def test_templates_render_like_training_and_run_the_tool_they_call(model_and_tokenizer):
    import json

    from llmbook.deployment import (
        chat_prompt,
        load_templates,
        numbered_sources,
        template_answers,
        template_request,
        template_right,
    )
    from llmbook.post_training import call_tool, retrieval_prompt

    _, tokenizer = model_and_tokenizer
    templates = load_templates()
    assert set(templates) == {"api_question", "tool_call", "retrieval_with_citations", "step_by_step"}
    passages = ["first found", "second found", "third found"]
    rag = template_request(
        templates["retrieval_with_citations"], dict(question="q?", sources=numbered_sources(passages))
    )
    assert rag["messages"][0]["role"] == "system" and rag["messages"][1]["content"] == retrieval_prompt("q?", passages)
    assert template_right(templates["retrieval_with_citations"], dict(answer="a", cite=2), "a [2]")
    assert not template_right(templates["retrieval_with_citations"], dict(answer="a", cite=2), "a [1]")
    assert template_right(templates["step_by_step"], dict(answer="7"), "3 + 4\n7")
    template, item = templates["tool_call"], dict(question="What is 2+2?", answer="4")
    first = template_request(template, item, system=False)
    call = dict(name="calculator", arguments=dict(expression="2+2"))
    special = tokenizer.special_tokens
    script = [special["<|tool_call|>"], *tokenizer.encode_ordinary(json.dumps(call)), special["<|end|>"]]
    model = ScriptedModel(tokenizer.vocab_size, script, len(chat_prompt(tokenizer, first)))
    sent = dict(id="call_0", type="function", function=dict(name="calculator", arguments=json.dumps(call["arguments"])))
    first["messages"] += [
        dict(role="assistant", content="", tool_calls=[sent]),
        dict(role="tool", content=call_tool(call)),
    ]
    model.write([*tokenizer.encode_ordinary("4"), special["<|end|>"]], len(chat_prompt(tokenizer, first)))
    said = template_answers(Engine(model, tokenizer), template, [item], system=False, max_tokens=80)
    assert said == ["4"] and template_right(template, item, said[0])


def test_a_tool_call_that_does_not_parse_streams_as_the_text_it_is(model_and_tokenizer, serving):
    from llmbook.deployment import chat_prompt, make_app, openai_tools

    _, tokenizer = model_and_tokenizer
    messages, tools = [dict(role="user", content="What is 2+2?")], openai_tools()
    special = tokenizer.special_tokens
    broken = [special["<|tool_call|>"], *tokenizer.encode_ordinary('{"name'), special["<|end|>"]]
    model = ScriptedModel(
        tokenizer.vocab_size, broken, len(chat_prompt(tokenizer, dict(messages=messages, tools=tools)))
    )
    client = client_for(serving(make_app(lambda name: (model, tokenizer), "toy")))
    asked = dict(model="toy", messages=messages, tools=tools, temperature=0)
    whole = client.chat.completions.create(**asked).choices[0]
    chunks = list(client.chat.completions.create(**asked, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.message.content == streamed == '<|tool_call|>{"name' and whole.message.tool_calls is None
