"""Streams pass through live, and the official openai SDK works through the gateway."""

import json
import time

import openai
import pytest


def stream_chat(envoy, **body):
    """Posts a streamed chat; returns (status, headers, [(seconds since send, event)])."""
    payload = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **body}
    events = []
    start = time.monotonic()
    with envoy.client.stream("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                             json=payload) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic() - start, line[len("data: "):]))
        return r.status_code, r.headers, events


def test_stream_chunks_reach_the_client_before_the_backend_finishes(trio):
    envoy, east, west, paygo = trio()
    for m in (east, west):
        m.configure(stream_chunks=5, stream_chunk_delay_ms=400)
    status, headers, events = stream_chat(envoy)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert events[-1][1] == "[DONE]"
    first_content = next(t for t, e in events if e != "[DONE]" and json.loads(e)["choices"]
                         and json.loads(e)["choices"][0]["delta"].get("content"))
    finished = events[-1][0]
    # The backend spends 5 x 400 ms producing the answer; the first words
    # arrive after the first delay, long before the end.
    assert finished >= 1.9
    assert first_content < finished - 1.0, (first_content, finished)


def test_stream_fails_over_before_the_first_byte(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"status": 429, "retry_after": "5"}])
    west.configure(stream_chunks=4, stream_chunk_delay_ms=300)
    status, headers, events = stream_chat(envoy, stream_options={"include_usage": True})
    assert status == 200
    assert (headers["x-spillway-backend"], headers["x-spillway-attempts"]) == ("west", "2")
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                   for _, e in events if e != "[DONE]" and json.loads(e)["choices"])
    assert "Hello from west" in text
    usage = [json.loads(e)["usage"] for _, e in events if e != "[DONE]" and json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] == 4
    assert events[-1][0] - events[1][0] >= 0.6  # chunks were spread out, not buffered


@pytest.fixture(params=["azure", "openai-v1"])
def azure(trio, request):
    """The SDK in both styles users write: AzureOpenAI on the classic paths,
    and OpenAI on the v1 API (the deployment in the body's model)."""
    envoy, east, west, paygo = trio()
    if request.param == "azure":
        client = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="client-side-key",
                                    api_version="2024-10-21", max_retries=0)
    else:
        client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="client-side-key", max_retries=0)
    return client, envoy, east, west, paygo


def api_path(client, deployment: str, operation: str) -> str:
    """Where the SDK sends an operation: the classic path, or the v1 one."""
    if isinstance(client, openai.AzureOpenAI):
        return f"/openai/deployments/{deployment}/{operation}"
    return f"/openai/v1/{operation}"


def test_sdk_chat_and_streamed_chat(azure):
    client, envoy, east, west, paygo = azure
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    completion = raw.parse()
    assert raw.headers["x-spillway-backend"] in ("east", "west")
    assert completion.choices[0].message.content.startswith("Hello from ")
    assert completion.usage.total_tokens > 0

    east.configure(fail_next=[{"status": 429, "retry_after": "3"}])
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from ")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_sdk_embeddings_and_images(azure):
    client, envoy, east, west, paygo = azure
    emb = client.embeddings.create(model="text-embedding-3-small", input=["one", "two", "three"])
    assert [d.index for d in emb.data] == [0, 1, 2]
    assert all(len(d.embedding) > 0 for d in emb.data)
    image = client.images.generate(model="dall-e-3", prompt="a corgi in a field", n=1, size="1024x1024")
    assert image.data[0].url.startswith("https://")
    assert "(by " in image.data[0].revised_prompt
    paths = [r["path"] for m in (east, west) for r in m.requests()]
    assert api_path(client, "dall-e-3", "images/generations") in paths
    assert api_path(client, "text-embedding-3-small", "embeddings") in paths
    # The SDK's key never reaches a backend; each got its own.
    for m in (east, west):
        for r in m.requests():
            assert r["headers"]["api-key"] == m.api_key


def test_sdk_sees_rate_limit_error_with_retry_after_when_all_are_throttled(azure):
    client, envoy, east, west, paygo = azure
    for m, secs in ((east, "9"), (west, "6"), (paygo, "12")):
        m.configure(fail_next=[{"status": 429, "retry_after": secs}])
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.response.headers["retry-after"] == "6"


def test_openai_style_client_on_v1_paths(trio):
    envoy, east, west, paygo = trio()
    client = openai.OpenAI(base_url=f"{envoy.url}/v1", api_key="client-side-key", max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content.startswith("Hello from ")
    served = [r for m in (east, west) for r in m.requests()]
    assert served[0]["path"] == "/v1/chat/completions"
    assert "authorization" not in served[0]["headers"]
