"""`m3jax serve`: a real uvicorn server on 127.0.0.1 (ephemeral port) driven by the official `openai` client.

Completions and chat; streaming equals non-streaming (stop strings included); 32 concurrent streaming clients each
get the text a single greedy request gets from the engine; every bad-request class gets its 4xx / 503 with the
field named; a disconnecting client's request leaves the engine; reasoning and tool-call parsing (directly on
crafted text, and the structure of the end-to-end responses of the tiny random model); the chat template, and
that m3jax.generate(..., chat=...) and the server make the same prompt token ids (built-in layout, a checkpoint's
chat_template.jinja, images) and name the same bad field;
logprobs and top_logprobs (the model's log_softmax); images as data URLs on a tiny vision checkpoint (the text of
m3jax.generate with the same image, prefix cache keyed by the pixels, bad images named by field).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import m3jax  # noqa: E402
from m3jax.serve import create_app  # noqa: E402
from m3jax.chat import NS, ChatTemplate, check_messages, render_builtin, render_tool_call  # noqa: E402
from m3jax.serve.parsing import ChatOutputParser  # noqa: E402
from m3jax.serve.text import StreamText, make_decoder  # noqa: E402
from m3jax.tokenizer import M3Tokenizer  # noqa: E402

MODEL = "tiny"
BLOCK = 8                        # the tiny checkpoint's MSA block = KV page = prefix-cache block
# One engine geometry: 8 rows, prompt chunks of 128 (2 compiled step programs: decode, decode + prefill).
ENGINE_KW = dict(max_batch_size=8, max_seq_len=2048, prefill_chunk=128, max_tokens_per_step=136, num_pages=600,
                 row_buckets=(8,))


@pytest.fixture(scope="module")
def ckpt():
    from m3jax.api import bundled_tiny_checkpoint
    return bundled_tiny_checkpoint()            # written once per machine (~/.cache/m3jax), shared with other tests


@pytest.fixture(scope="module")
def model(ckpt):
    return m3jax.load(ckpt, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tok(ckpt):
    return M3Tokenizer.from_pretrained(ckpt)


def _prompts(n, seed=0):
    rs = np.random.RandomState(seed)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "日本", "x", "yz"]
    return [" ".join(rs.choice(words, rs.randint(2, 8))) for _ in range(n)]


COMPLETION_PROMPTS = {"single": _prompts(3, seed=1), "concurrent": _prompts(32, seed=3)}


@pytest.fixture(scope="module")
def server(model, tok, ckpt):
    eng = m3jax.Engine(model, tokenizer=tok, **ENGINE_KW)
    # Single-request greedy texts from this engine before it serves (its compiled programs are then reused):
    # one request at a time would be slow on CPU; batch invariance is what test_engine checks.
    prompts = sorted({p for ps in COMPLETION_PROMPTS.values() for p in ps})
    sp = m3jax.SamplingParams(max_new_tokens=8, temperature=0.0)
    reference = dict(zip(prompts, (r.text for r in m3jax.generate(eng, prompts, sp, progress=False))))
    app = create_app(eng, model_name=MODEL, tokenizer=tok, checkpoint_dir=ckpt, max_queue=40)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    yield type("S", (), {"url": f"http://127.0.0.1:{port}", "app": app, "worker": app.state.worker,
                         "reference": reference})
    srv.should_exit = True
    th.join(15)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _post(server, path, body, raw: bytes | None = None):
    req = urllib.request.Request(server.url + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            data = r.read()
            if r.headers.get_content_type() == "text/event-stream":
                assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
                return r.status, data
            return r.status, json.loads(data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------------- endpoints
def test_health_and_models(server, client):
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_equals_single_request_engine(server, client, caplog):
    prompts = COMPLETION_PROMPTS["single"]
    want = [server.reference[p] for p in prompts]
    for p, w in zip(prompts, want):
        with caplog.at_level(logging.INFO, logger="m3jax.serve"):
            r = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        line = [rec.getMessage() for rec in caplog.records if r.id in rec.getMessage()]
        cached = r.usage.prompt_tokens_details.cached_tokens      # the reference run cached its full blocks
        assert len(line) == 1 and f"prompt {r.usage.prompt_tokens} tokens, completion " \
            f"{r.usage.completion_tokens} tokens, cached {cached} tokens, TTFT" in line[0] and "total" in line[0]
        assert r.choices[0].text == w
        assert r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens == len(p.encode())
        assert cached == (r.usage.prompt_tokens - 1) // BLOCK * BLOCK     # every full block before the last token
    # a list of prompts, n=2 (greedy: both choices equal), token-id prompts and logprobs
    r = client.completions.create(model=MODEL, prompt=prompts[:2], max_tokens=8, temperature=0, n=2, logprobs=0)
    assert [c.text for c in r.choices] == [want[0], want[0], want[1], want[1]]
    assert sum(len(c.logprobs.token_logprobs) for c in r.choices) == r.usage.completion_tokens
    assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) for c in r.choices)
    assert all(lp <= 0 for c in r.choices for lp in c.logprobs.token_logprobs)
    ids = list(prompts[0].encode())
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0).choices[0].text == want[0]


def _stream_text(client, **kw):
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage


def test_streaming_equals_non_streaming(client):
    p = _prompts(1, seed=2)[0]
    full = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
    text, reason, usage = _stream_text(client, model=MODEL, prompt=p, max_tokens=12, temperature=0)
    assert text == full.choices[0].text and reason == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    # a stop string taken from the middle of the greedy text: both paths cut before it, the stream never sends it
    body = full.choices[0].text
    stop = next((body[i:i + 2] for i in range(2, len(body) - 2) if "\ufffd" not in body[i:i + 2]), None)
    if stop is not None:
        cut = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == body[:body.find(stop)] and cut.choices[0].finish_reason == "stop"
        text, reason, _ = _stream_text(client, model=MODEL, prompt=p, max_tokens=12, temperature=0, stop=[stop])
        assert text == cut.choices[0].text and reason == "stop"
    # chat, with a seeded sampled request (same seed -> same text)
    msgs = [{"role": "user", "content": "Hello there"}]
    for kw in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7, extra_body={"top_k": 20})):
        full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, **kw)
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == full.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_32_concurrent_streaming_clients(server, client):
    prompts = COMPLETION_PROMPTS["concurrent"]
    want = [server.reference[p] for p in prompts]
    got = [None] * 32
    errors = []

    def one(i):
        try:
            got[i] = _stream_text(client, model=MODEL, prompt=prompts[i], max_tokens=8, temperature=0)[0]
        except Exception as e:                                          # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert got == want
    assert server.worker.outstanding == 0


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x" * 2100}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 3000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "top_k": -5}, 400, "top_k"),
    ({"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed"),
    ({"model": MODEL, "prompt": "hi", "stop": [1]}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "n": 100}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": [300, 10**6]}, 400, "prompt"),
])
def test_bad_completion_requests(server, body, status, param):
    code, err = _post(server, "/v1/completions", body)
    assert code == status, err
    assert err["error"]["param"] == param and err["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].image_url"),
    ({"model": MODEL, "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,AAAA"}}]}]}, "messages[0].content[0]"),    # images in user messages only
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 2100}]}, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools[0].function.name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "chat_template_kwargs": {"thinking_mode": "sometimes"}}, "chat_template_kwargs.thinking_mode"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
      "chat_template_kwargs": {"greeting": "x"}}, "chat_template_kwargs.greeting"),     # not a built-in variable
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 0}, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1.5},
     "max_completion_tokens"),
])
def test_bad_chat_requests(server, body, param):
    code, err = _post(server, "/v1/chat/completions", body)
    assert code == 400, err
    assert err["error"]["param"] == param and err["error"]["message"]


FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice",
          "chat_template_kwargs", "ignore_eos"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_no_500_for_any_wrongly_typed_field(server, path):
    """Every field set to values of the wrong type or range gets a 4xx naming a field. The prompt is longer than
    max_seq_len (checked after every other field), so a value that is accepted ends in that 400, not in work."""
    long = "x" * 2100
    base = {"model": MODEL, "max_tokens": 1, "temperature": 0}
    base.update({"prompt": long} if path == "/v1/completions" else {"messages": [{"role": "user", "content": long}]})
    for field in FIELDS:
        for value in ({}, [], "x", -1, 1.5, True, [[]], float("nan"), 2**70):
            raw = json.dumps({**base, field: value}).encode()              # NaN as the bare token JSON allows
            code, body = _post(server, path, None, raw=raw)
            if code == 200 and field in ("prompt", "messages"):
                continue                                                   # a valid short prompt replaced it
            assert code in (400, 404), (field, value, code, body)
            assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error", body
    # the extremes that are valid run (a top_k beyond int32 once crashed the engine step; now top_k <= the vocab)
    for extra in ({"top_k": 384, "temperature": 2.0}, {"seed": 2**32 - 1, "temperature": 1.0, "top_p": 1e-9},
                  {"max_tokens": 1, "stop": ["a", "b", "c", "d"], "n": 2}):
        body = {"model": MODEL, "max_tokens": 1, **extra}
        body.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user",
                                                                                      "content": "hi"}]})
        code, out = _post(server, path, body)
        assert code == 200 and out["usage"]["completion_tokens"] >= 1, out
    assert server.worker.failure is None


def test_invalid_json_unknown_path_and_queue_full(server, client):
    code, err = _post(server, "/v1/completions", None, raw=b"{not json")
    assert code == 400 and err["error"]["code"] == "invalid_json"
    code, err = _post(server, "/v1/nothing", {})
    assert code == 404 and "error" in err
    worker = server.worker
    worker.reserve(worker.max_outstanding)       # as if that many requests were in flight
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
    finally:
        worker.unreserve(worker.max_outstanding)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices


def _long_prompt(seed):
    rs = np.random.RandomState(seed)
    return " ".join(rs.choice(["alpha", "beta", "gamma", "delta", "epsilon"], 60))     # ~350 tokens, ~43 blocks


def test_repeated_long_prompt_hits_the_prefix_cache(server, client):
    """The second time a long prompt comes (completions, then chat with a long system message, streamed with
    usage too), it reports cached tokens, and its output is the first one's."""
    p = _long_prompt(11)
    cold = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
    warm = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0)
    n = cold.usage.prompt_tokens
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK > 300
    assert warm.choices[0].text == cold.choices[0].text
    msgs = [{"role": "system", "content": _long_prompt(12)}, {"role": "user", "content": "Summarise."}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    again = chunks[-1].usage
    n = first.usage.prompt_tokens         # earlier chats may share the template's opening blocks, not the system text
    assert first.usage.prompt_tokens_details.cached_tokens < n - 300
    assert again.prompt_tokens == n and again.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    m = first.choices[0].message
    assert (text, reasoning) == (m.content or "", getattr(m, "reasoning_content", None) or "")


def test_client_disconnect_cancels_the_request(server, client):
    """A client that reads two chunks and closes: its request leaves the engine long before its 300 tokens, every
    page it held is returned, and the cached prefix it shared with a request still running stays valid: that
    request, and the same prompt afterwards, give the cold run's text."""
    worker = server.worker
    p = _long_prompt(13)
    cold = client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0)
    shared = {}
    other = threading.Thread(target=lambda: shared.setdefault("r", client.completions.create(
        model=MODEL, prompt=p, max_tokens=40, temperature=0)))
    other.start()
    req = urllib.request.Request(server.url + "/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": p + " and then", "max_tokens": 300,
                                                  "temperature": 0, "stream": True,
                                                  "stop": ["\u2603\u2603\u2603"]}).encode(),
                                 headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    lines = 0
    while lines < 2:
        if r.readline().startswith(b"data:"):
            lines += 1
    steps_at_close = worker.num_steps
    r.close()
    other.join(120)
    t0 = time.time()
    while worker.outstanding and time.time() - t0 < 120:
        time.sleep(0.05)
    assert worker.cancel_frees_pages and worker.outstanding == 0 and not worker._abandoned
    assert worker.num_steps - steps_at_close < 200                  # left long before its 300 tokens
    allocs = worker.engine.allocators
    assert not any(a.owners() for a in allocs) and all(a.num_free == a.capacity for a in allocs)
    for a in allocs:
        a.check()
    assert shared["r"].usage.prompt_tokens_details.cached_tokens > 300
    assert shared["r"].choices[0].text == cold.choices[0].text
    after = client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0)
    assert after.usage.prompt_tokens_details.cached_tokens > 300 and after.choices[0].text == cold.choices[0].text


# ---------------------------------------------------------------------------------------------- logprobs
def test_top_logprobs_completions_and_chat(server, client, model, tok):
    """Greedy with top alternatives: the best one is the chosen token with its logprob; the values at the first
    position are a jnp log_softmax of the model's logits; completions also list the chosen token; a stream's
    chunks carry the same logprobs as the whole response, each token once; top_logprobs 0 gives none."""
    import jax
    import jax.numpy as jnp

    ids = [104, 101, 108, 108, 111, 32, 119]                                       # "hello w"
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=4)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for text, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 5 and top[text] == chosen          # fewer: alternatives that decode alike
        assert max(top.values()) == chosen                  # greedy: the chosen token is the best one
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0, logprobs=4,
                                            stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum((x.tokens for x in streamed), []) == lp.tokens
    assert sum((x.top_logprobs for x in streamed), []) == lp.top_logprobs
    assert sum((x.text_offset for x in streamed), []) == lp.text_offset
    # chat: top_logprobs alternatives, best first, the first of them the greedy token
    msgs = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = tok.encode(server.app.state.server.template.render(check_messages(msgs)))
    want = np.asarray(jax.nn.log_softmax(model(jnp.asarray([prompt]))[0, -1]))
    best = np.argsort(-want, kind="stable")[:3]
    assert [a.token for a in content[0].top_logprobs] == [tok.decode([int(t)]) for t in best]
    np.testing.assert_allclose([a.logprob for a in content[0].top_logprobs], want[best], rtol=1e-4, atol=1e-4)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == e.logprob
        assert e.top_logprobs[0].token == e.token
        assert [a.logprob for a in e.top_logprobs] == sorted((a.logprob for a in e.top_logprobs), reverse=True)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [(a.token, a.logprob) for a in e.top_logprobs]) for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True)
    assert [e.logprob for e in plain.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)


# ---------------------------------------------------------------------------------------------- chat
def test_chat_reasoning_and_tools_end_to_end(client, tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    # thinking enabled: the prompt ends in <mm:think>, so the random model's text (no </mm:think>) is reasoning
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, tools=tools,
                                       extra_body={"chat_template_kwargs": {"thinking_mode": "enabled"}})
    m = r.choices[0].message
    assert m.content == "" and m.reasoning_content and r.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0, tools=tools, stream=True,
        extra_body={"chat_template_kwargs": {"thinking_mode": "enabled"}}))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == \
        m.reasoning_content
    # a full tool round trip in the request: assistant tool call + tool result are rendered and accepted
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = client.chat.completions.create(model=MODEL, messages=history, max_tokens=6, temperature=0, tools=tools,
                                       extra_body={"chat_template_kwargs": {"thinking_mode": "disabled"}})
    m = r.choices[0].message
    assert isinstance(m.content, str) and not m.reasoning_content
    assert m.tool_calls is None or all(t.function.name for t in m.tool_calls)


def test_reasoning_and_tool_call_parsers_stream_like_whole():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "opts": {"type": "object", "properties": {"unit": {"type": "string"}, "hourly": {"type": "boolean"}}},
        "tags": {"type": "array", "items": {"type": "string"}}}}}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    text = (" <mm:think>Paris, so call get_weather.</mm:think>Let me check. " + NS + "<tool_call>\n"
            + render_tool_call("get_weather", {"city": "Paris 75", "days": 3, "opts": {"unit": "C", "hourly": True},
                                               "tags": ["a", "b"]})
            + render_tool_call("now", {}) + NS + "</tool_call>")
    whole = ChatOutputParser(tools=tools).parse(text)
    assert whole.reasoning == "Paris, so call get_weather."
    assert whole.content == "Let me check. "
    assert [(t.index, t.name, json.loads(t.arguments)) for t in whole.tool_calls] == [
        (0, "get_weather", {"city": "Paris 75", "days": 3, "opts": {"unit": "C", "hourly": True},
                            "tags": ["a", "b"]}), (1, "now", {})]
    for step in (1, 2, 3, 7):                       # fed in pieces: the same split, tool calls as they complete
        p = ChatOutputParser(tools=tools)
        parts = [p.feed(text[i:i + step]) for i in range(0, len(text), step)] + [p.finish()]
        assert "".join(x.reasoning for x in parts) == whole.reasoning
        assert "".join(x.content for x in parts) == whole.content
        assert [(t.name, t.arguments) for x in parts for t in x.tool_calls] == \
            [(t.name, t.arguments) for t in whole.tool_calls]
        assert NS not in "".join(x.content for x in parts)
    # prompt ended in <mm:think>: output starts inside the reasoning; a bare </mm:think> opens plain content
    assert ChatOutputParser(starts_in_reasoning=True).parse("a</mm:think>b").reasoning == "a"
    out = ChatOutputParser().parse("</mm:think>just text ]<] no call")
    assert (out.reasoning, out.content) == ("", "just text ]<] no call")
    # untyped values: JSON when it parses, else the string; an unterminated call stays visible as content
    out = ChatOutputParser(tools=[{"type": "function", "function": {"name": "f"}}]).parse(
        NS + '<tool_call>' + NS + '<invoke name="f">' + NS + "<n>4" + NS + "</n>" + NS + "<s>hi" + NS
        + "</s>" + NS + "<t>[1, 2]</t>" + NS + "</invoke>" + NS + "</tool_call>")
    assert json.loads(out.tool_calls[0].arguments) == {"n": 4, "s": "hi", "t": [1, 2]}
    out = ChatOutputParser(tools=tools).parse("x" + NS + '<tool_call>' + NS + '<invoke name="now">')
    assert out.tool_calls == [] and out.content.startswith("x" + NS + "<tool_call>")


def test_chat_template_builtin_and_jinja(tmp_path, tok):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    msgs = check_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "ok", "tool_calls": [
                               {"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
                           {"role": "tool", "content": "12:00"}])
    text = render_builtin(msgs, tools, True, "enabled")
    assert text.startswith("]~!b[]~b]system\n") and "]~b]developer\nBe brief." in text and '"name": "now"' in text
    assert "]~b]user\nHi[e~[\n" in text and "]~b]tool\n<response>12:00</response>[e~[\n" in text
    assert f'{NS}<invoke name="now">' in text and text.endswith("]~b]ai\n<mm:think>")
    assert render_builtin(msgs, None, True, "disabled").endswith("]~b]ai\n</mm:think>")
    assert render_builtin(msgs, None, True, "adaptive").endswith("]~b]ai\n")
    assert ChatTemplate.from_checkpoint(str(tmp_path)).source == "built-in M3 layout"
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}<ai>{{ thinking_mode }}"
        "{% endif %}")
    t = ChatTemplate.from_checkpoint(str(tmp_path))
    assert t.source == "chat_template.jinja"
    out = t.render(check_messages([{"role": "user", "content": "Hi é"}]), tools, True, thinking_mode="enabled")
    assert out == "]~!b[<user>Hi é[e~[" + json.dumps(tools, ensure_ascii=False) + "<ai>enabled"
    with pytest.raises(ValueError, match="thinking_mode"):
        t.render(msgs, thinking_mode="maybe")
    # a template that refuses the conversation names the messages; one that does not parse names its file
    from m3jax.chat import FieldError

    with pytest.raises(FieldError, match="refused them: no tools here") as e:
        ChatTemplate("{% if tools %}{{ raise_exception('no tools here') }}{% endif %}").render(msgs, tools)
    assert e.value.field == "messages"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="chat_template.jinja: line 1: "):
        ChatTemplate.from_checkpoint(str(tmp_path))


# ---------------------------------------------------------------------------------------------- one renderer
_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
# (messages, tools, chat_template_kwargs): a user turn; a system message; several turns with an assistant tool
# call, a tool result, tools and a thinking mode
PROMPT_CASES = [
    ([{"role": "user", "content": "Hello there"}], None, None),
    ([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": [
        {"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]}], None, None),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "c1", "type": "function", "function": {
          "name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."},
      {"role": "user", "content": "And tomorrow?"}], _TOOLS, {"thinking_mode": "enabled"}),
]


def _chat_arg(tools, kwargs):
    """m3jax.generate's chat argument for the server's tools and chat_template_kwargs."""
    return {**({"tools": tools} if tools else {}), **(kwargs or {})} or True


@contextlib.contextmanager
def _submitted(worker):
    """The prompts (token ids or MultimodalPrompts) the server hands to the engine, in order."""
    seen, submit = [], worker.submit

    def spy(request_id, prompt, *args, **kw):
        seen.append(prompt)
        return submit(request_id, prompt, *args, **kw)

    worker.submit = spy
    try:
        yield seen
    finally:
        del worker.submit


def _server_prompt(srv, messages, tools=None, kwargs=None) -> list[int]:
    from m3jax.serve.worker import prompt_ids

    body = {"model": MODEL, "messages": messages, "max_tokens": 1, "temperature": 0}
    body.update({"tools": tools} if tools else {}, **({"chat_template_kwargs": kwargs} if kwargs else {}))
    with _submitted(srv.worker) as seen:
        _post(srv, "/v1/chat/completions", body)
    assert len(seen) == 1
    return list(prompt_ids(seen[0]))


def test_generate_and_server_give_the_same_prompt(server, tok):
    """m3jax.generate(..., chat=...) prepares its prompts with Engine.prepare: the same token ids as
    /v1/chat/completions for the same messages, tools and chat_template_kwargs (the built-in layout here)."""
    engine = server.worker.engine            # prepare only reads the tokenizer: safe beside the worker thread
    for messages, tools, kwargs in PROMPT_CASES:
        python = engine.prepare(messages, chat=_chat_arg(tools, kwargs))[0].token_ids
        assert _server_prompt(server, messages, tools, kwargs) == python
        assert tok.decode(python).startswith("]~!b[]~b]system\n<thinking_instructions>")
    # a string prompt with chat=True is one user message
    assert engine.prepare("Hello there", chat=True)[0] == engine.prepare(PROMPT_CASES[0][0], chat=True)[0].token_ids
    text = tok.decode(engine.prepare(*PROMPT_CASES[2][:1], chat=_chat_arg(*PROMPT_CASES[2][1:]))[0].token_ids)
    assert "]~b]developer\nYou are a helpful assistant.\n\n# Tools" in text and text.endswith("]~b]ai\n<mm:think>")
    assert f'{NS}<invoke name="get_weather">\n{NS}<city>Paris{NS}</city>\n{NS}<days>2{NS}</days>\n' in text


def test_checkpoint_chat_template_on_both_paths(model, ckpt, tmp_path):
    """A checkpoint's chat_template.jinja renders the prompts of m3jax.generate and of the server (which takes
    the tokenizer's template by default), with tools and template variables."""
    import shutil

    shutil.copy(f"{ckpt}/tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "{{ eos_token }}{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
        "{% if add_generation_prompt %}<ai>{{ thinking_mode }}{{ greeting }}{% endif %}")
    jtok = M3Tokenizer.from_pretrained(str(tmp_path))
    assert jtok.chat_template.source == "chat_template.jinja"
    engine = m3jax.Engine(model, tokenizer=jtok, max_batch_size=1, max_seq_len=512, num_pages=80)
    recorder = _RecordingEngine()
    recorder.max_seq_len = 512
    with _served(recorder, jtok) as srv:                       # no chat_template or checkpoint_dir given
        for messages, tools, kwargs in PROMPT_CASES + [(PROMPT_CASES[0][0], None, {"greeting": "hi!"})]:
            python = engine.prepare(messages, chat=_chat_arg(tools, kwargs))[0].token_ids
            code, err = _post(srv, "/v1/chat/completions", {
                "model": MODEL, "messages": messages, "max_tokens": 1,
                **({"tools": tools} if tools else {}), **({"chat_template_kwargs": kwargs} if kwargs else {})})
            assert code == 400 and err["error"]["message"].endswith("recorded")
            assert recorder.prompts.pop() == python
            assert jtok.decode(python).startswith("]~!b[<")
        assert jtok.decode(python) == "]~!b[<user>Hello there[e~[<ai>hi!"
        text = jtok.decode(engine.prepare(PROMPT_CASES[2][0], chat=_chat_arg(*PROMPT_CASES[2][1:]))[0].token_ids)
        assert '<assistant>Let me look.[get_weather {"city": "Paris", "days": 2}][e~[' in text
        assert text.endswith(json.dumps(_TOOLS) + "<ai>enabled")


@pytest.mark.parametrize("messages, field", [
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "messages[1].content"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "audio"}]}], "messages[0].content[1]"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
     "messages[0].content[0]"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{not json"}}]}], "messages[1].tool_calls[0].function.arguments"),
    ("not a list", "messages"),
])
def test_bad_messages_name_the_field_on_both_paths(server, messages, field):
    code, err = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
    assert code == 400 and err["error"]["param"] == field, err
    if isinstance(messages, list):
        with pytest.raises(ValueError, match=r"request 7: " + field.replace("[", r"\[").replace("]", r"\]") + ": "):
            server.worker.engine.prepare(messages, request_id=7, chat=True)


def test_bad_chat_arguments_name_the_field_in_python(server):
    engine = server.worker.engine
    for chat, words in [({"tools": [{"type": "function"}]}, "tools[0].function.name: "),
                        ({"thinking_mode": "maybe"}, "thinking_mode: must be one of"),
                        ({"greeting": "x"}, "greeting: the built-in M3 layout takes only thinking_mode"),
                        ({"messages": []}, "chat: 'messages' is not a template argument"),
                        ("yes", "chat must be True, False or a dict")]:
        for prompt in ("hi", [{"role": "user", "content": "hi"}]):
            with pytest.raises(ValueError) as e:
                engine.prepare(prompt, request_id=3, chat=chat)
            assert str(e.value).startswith("request 3: ") and words in str(e.value), e.value


# ---------------------------------------------------------------------------------------------- text
def test_stream_text_never_splits_a_character(tok):
    text = "héllo 日本語 🎉 ok"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())                       # byte-level: multi-byte characters span ids
    dec = make_decoder(tok)
    pieces = [dec.push([i]) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    st = StreamText(tok, stops=("語 🎉",))
    streamed = "".join(st.push([i]) for i in ids)
    assert streamed == "héllo 日本"                           # the stop string's start is held back
    assert streamed + st.finish("héllo 日本") == "héllo 日本"


def test_serve_cli_rejects_bad_arguments(capsys):
    from m3jax.serve.cli import serve_main
    assert serve_main(["--model", "/nonexistent/m3", "--port", "1"]) == 2
    assert "m3jax serve: error:" in capsys.readouterr().err
    assert serve_main(["--max-batch-size", "0"]) == 2


def test_serve_cli_builds_the_app(ckpt):
    from m3jax.serve.cli import _parser, build_app
    app, name = build_app(_parser().parse_args(["--model", ckpt, "--dtype", "float32", "--max-seq-len", "64",
                                                "--max-batch-size", "2", "--served-model-name", "m3-test"]))
    assert name == "m3-test" and app.state.server.cfg.model_name == "m3-test"
    assert app.state.server.cfg.max_seq_len == 64 and app.state.worker.engine.max_batch_size == 2
    assert app.state.worker.engine.enable_prefix_caching
    app, _ = build_app(_parser().parse_args(["--model", ckpt, "--dtype", "float32", "--max-seq-len", "64",
                                             "--no-prefix-caching"]))
    assert not app.state.worker.engine.enable_prefix_caching


class _FailingEngine:
    """The Engine's public surface, with a step that raises: what the server does when the engine breaks."""

    max_batch_size, max_seq_len = 2, 64

    def __init__(self):
        self.queued = []

    def add_request(self, prompt, sampling, *, request_id=None):
        self.queued.append(request_id)
        return request_id

    def has_work(self):
        return bool(self.queued)

    def step(self):
        raise RuntimeError("device lost")

    def pop_result(self, request_id):
        return None


class _CancellableEngine(_FailingEngine):
    """Emits "A" forever for each request until it is cancelled (the Engine.cancel the scheduler will have)."""

    def __init__(self):
        super().__init__()
        self.cancelled = []

    def step(self):
        from m3jax.engine import StepOutput
        time.sleep(0.005)
        return [StepOutput(rid, [ord("A")], False) for rid in self.queued]

    def cancel(self, request_id):
        self.queued.remove(request_id)
        self.cancelled.append(request_id)


class _RecordingEngine(_FailingEngine):
    """Records the prompt of each request, then refuses it (the server answers 400): nothing runs."""

    def __init__(self):
        super().__init__()
        self.prompts = []

    def add_request(self, prompt, sampling, *, request_id=None):
        self.prompts.append(prompt)
        raise ValueError("recorded")


@contextlib.contextmanager
def _served(engine, tok, **app_kw):
    app = create_app(engine, model_name=MODEL, tokenizer=tok, **app_kw)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield type("S", (), {"url": f"http://127.0.0.1:{port}", "worker": app.state.worker})
    finally:
        srv.should_exit = True
        th.join(15)


def test_disconnect_calls_engine_cancel(tok):
    engine = _CancellableEngine()
    with _served(engine, tok) as srv:
        assert srv.worker.cancel_frees_pages
        req = urllib.request.Request(srv.url + "/v1/completions", method="POST", headers={
            "Content-Type": "application/json"}, data=json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 60,
                                                                  "stream": True}).encode())
        r = urllib.request.urlopen(req, timeout=30)
        got = 0
        while got < 3:
            got += r.readline().startswith(b"data:")
        r.close()
        t0 = time.time()
        while (not engine.cancelled or srv.worker.outstanding) and time.time() - t0 < 30:
            time.sleep(0.02)
        assert len(engine.cancelled) == 1 and engine.cancelled[0].startswith("cmpl-")
        assert srv.worker.outstanding == 0 and not engine.queued


def test_engine_failure_answers_every_request(tok):
    with _served(_FailingEngine(), tok) as srv_info:
        code, err = _post(srv_info, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert code == 500 and "device lost" in err["error"]["message"]          # not the user's fault
        code, err = _post(srv_info, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert code == 503 and err["error"]["code"] == "engine_failed"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv_info.url + "/health")
        assert e.value.code == 503


# ---------------------------------------------------------------------------------------------- images
def _data_url(image, fmt="PNG") -> str:
    import base64
    import io

    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _image(seed, h=45, w=66):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(yy[..., None] / (3 + rs.rand(3) * 7) + xx[..., None] / (4 + rs.rand(3) * 9))
    return np.clip(base + rs.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _image_messages(url, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """A tiny vision checkpoint served; greedy texts of m3jax.generate(..., chat=True) for the chat messages of two
    images of one size, then an empty prefix cache."""
    path = m3jax.testing.make_tiny_checkpoint(str(tmp_path_factory.mktemp("vl") / "tiny-vl"), seed=0, vision=True,
                                              dtype="float32")
    model = m3jax.load(path, dtype="float32", progress=False)
    vtok = M3Tokenizer.from_pretrained(path)
    eng = m3jax.Engine(model, tokenizer=vtok, max_batch_size=2, max_seq_len=512, prefill_chunk=128,
                       row_buckets=(2,), num_pages=200)
    images = [_image(1), _image(2)]
    sp = m3jax.SamplingParams(max_new_tokens=6)
    reference = m3jax.generate(eng, [_image_messages(_data_url(im)) for im in images], sp, chat=True,
                               progress=False)
    eng.reset_prefix_cache()
    with _served(eng, vtok, checkpoint_dir=path) as srv:
        srv.images, srv.reference = images, reference
        yield srv


@pytest.mark.gpu_long
def test_image_chat_equals_generate_and_caches_by_content(vision_server):
    client = openai.OpenAI(base_url=vision_server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ref = vision_server.reference
    urls = [_data_url(im) for im in vision_server.images]
    with _submitted(vision_server.worker) as seen:
        cold = client.chat.completions.create(model=MODEL, messages=_image_messages(urls[0]), max_tokens=6,
                                              temperature=0)
    n = cold.usage.prompt_tokens
    assert seen[0].token_ids == ref[0].prompt_token_ids and cold.usage.completion_tokens == len(ref[0].token_ids)
    assert cold.choices[0].message.content == ref[0].text
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    # the same image again: every full block comes from the cache, the output is the cold one (streamed too)
    chunks = list(client.chat.completions.create(model=MODEL, messages=_image_messages(urls[0]), max_tokens=6,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref[0].text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    two = client.chat.completions.create(model=MODEL, messages=_image_messages(urls[0]), max_tokens=6,
                                         temperature=0, n=2)                  # one prompt, two requests
    assert [c.message.content for c in two.choices] == [ref[0].text] * 2
    # another image of the same size: the same token ids, but no block is shared (keyed by the pixels)
    other = client.chat.completions.create(model=MODEL, messages=_image_messages(urls[1]), max_tokens=6,
                                           temperature=0)
    assert other.usage.prompt_tokens == n and other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.choices[0].message.content == ref[1].text
    # a JPEG data URL and an image_url given as a bare string are accepted too
    r = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": _data_url(vision_server.images[0],
                                                                                           "JPEG")}]}])
    assert r.usage.completion_tokens == 2
    # a system message, two turns and two images: generate's prompt (Engine.prepare) is the server's
    messages = [{"role": "system", "content": "Be brief."}] + _image_messages(urls[0], "First?") + [
        {"role": "assistant", "content": "A pattern."}] + _image_messages(urls[1], "And this one?")
    python = vision_server.worker.engine.prepare(messages, chat=True)[0]
    with _submitted(vision_server.worker) as seen:
        _post(vision_server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1})
    image_id = vision_server.worker.engine.vision.config.image_token_index
    assert seen[0].token_ids == python.token_ids
    assert python.token_ids.count(image_id) == 2 * ref[0].prompt_token_ids.count(image_id) > 0
    np.testing.assert_array_equal(seen[0].pixel_values, python.pixel_values)
    assert vision_server.worker.failure is None and vision_server.worker.outstanding == 0


def test_bad_images_get_400_naming_the_field(vision_server, server):
    import base64
    import struct
    import zlib

    from m3jax.vision.processor import IMAGE_TOKEN

    good = _data_url(_image(1))
    png_1x300 = _data_url(np.zeros((1, 300, 3), np.uint8))               # aspect ratio 300 > 200
    junk = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not a png").decode()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    zero_width = "data:image/png;base64," + base64.b64encode(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")).decode()
    cases = [
        (_image_messages(junk), "messages[0].content[0].image_url", "cannot decode"),
        (_image_messages(zero_width), "messages[0].content[0].image_url", "cannot decode"),
        (_image_messages("data:image/png;base64,@@@"), "messages[0].content[0].image_url", "cannot decode"),
        (_image_messages("data:image/png,rawbytes"), "messages[0].content[0].image_url", "base64"),
        (_image_messages(png_1x300), "messages[0].content[0].image_url", "aspect ratio"),
        (_image_messages("https://example.com/cat.png"), "messages[0].content[0].image_url", "does not fetch"),
        (_image_messages("http://127.0.0.1:1/x.png"), "messages[0].content[0].image_url", "does not fetch"),
        (_image_messages("file:///etc/passwd"), "messages[0].content[0].image_url", "data URL"),
        (_image_messages("/etc/passwd"), "messages[0].content[0].image_url", "data URL"),
        ([{"role": "user", "content": "hi"}] + [{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": good, "detail": "max"}}]}],
         "messages[1].content[1].image_url.detail", "detail"),
        (_image_messages(good, text=f"and {IMAGE_TOKEN}"), "messages", "markers"),     # a marker typed as text
    ]
    for messages, param, words in cases:
        code, err = _post(vision_server, "/v1/chat/completions", {"model": MODEL, "messages": messages,
                                                                 "max_tokens": 2})
        assert code == 400, (param, err)
        assert err["error"]["param"] == param and words in err["error"]["message"], err
    # a model without a vision tower
    code, err = _post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"},
                                     {"type": "image_url", "image_url": {"url": good}}]}]})
    assert code == 400 and err["error"]["param"] == "messages[0].content[1].image_url", err
    assert "no vision tower" in err["error"]["message"]
    assert vision_server.worker.failure is None and server.worker.failure is None
    # a multi-process server's LeaderEngine replays token ids on the other processes: images are refused
    from m3jax.distributed import LeaderEngine
    from m3jax.chat import ImagePart
    from m3jax.serve.images import image_prompt
    from m3jax.serve.protocol import APIError

    leader = LeaderEngine.__new__(LeaderEngine)            # no __init__: nothing is published
    leader.engine = vision_server.worker.engine
    with pytest.raises(APIError, match="multi-process") as e:
        image_prompt(leader, IMAGE_TOKEN, [ImagePart("messages[0].content[0].image_url", good)], "r")
    assert e.value.status == 400 and e.value.param == "messages[0].content[0].image_url"
