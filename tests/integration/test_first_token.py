"""First-token failover: a stream that fails before its first content (an
error event, or nothing within `first_token_timeout_s`) goes to another
backend inside the same client request, and the client never sees the failed
attempt; after the first content the stream is committed."""

import json
import time

import openai

from test_streaming_and_sdk import stream_chat


def content_of(events) -> str:
    chunks = [json.loads(e) for _, e in events if e != "[DONE]"]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def test_an_error_event_before_content_fails_over_unseen(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"stream_error_before_content": True}])
    status, headers, events = stream_chat(envoy)
    assert status == 200
    assert (headers["x-spillway-backend"], headers["x-spillway-attempts"]) == ("west", "2")
    assert content_of(events).startswith("Hello from west")
    assert events[-1][1] == "[DONE]"
    # Each backend saw the request once; east's failure counts against it.
    assert (east.count(), west.count(), paygo.count()) == (1, 1, 0)
    assert envoy.stat("wasmcustom.spillway_first_token_failovers_total.backend.east.reason.error") == 1
    assert envoy.stat("wasmcustom.spillway_upstream_requests_total.backend.east.class.2xx") == 1


def test_the_sdk_streams_through_a_failed_first_backend(trio):
    envoy, east, west, paygo = trio()
    east.configure(fail_next=[{"stream_error_before_content": True}])
    client = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="client-side-key",
                                api_version="2024-10-21", max_retries=0)
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Hello from west")


def test_a_stream_silent_past_the_first_token_timeout_fails_over(trio):
    envoy, east, west, paygo = trio({"first_token_timeout_s": 1})
    east.configure(fail_next=[{"first_content_delay_ms": 6000}])
    started = time.monotonic()
    status, headers, events = stream_chat(envoy)
    elapsed = time.monotonic() - started
    assert status == 200
    assert headers["x-spillway-backend"] == "west"
    assert content_of(events).startswith("Hello from west")
    assert 0.9 <= elapsed < 4.0, elapsed
    assert (east.count(), west.count()) == (1, 1)


def test_after_the_first_content_the_stream_is_committed(trio):
    envoy, east, west, paygo = trio({"first_token_timeout_s": 1})
    # Chunks 1.5 s apart: longer than the first-token timeout, after the start.
    east.configure(stream_chunks=3, stream_chunk_delay_ms=1500)
    status, headers, events = stream_chat(envoy)
    assert status == 200
    assert headers["x-spillway-backend"] == "east"
    assert content_of(events).startswith("Hello from east")
    assert events[-1][1] == "[DONE]" and events[-1][0] >= 4.0
    assert (east.count(), west.count()) == (1, 0)


def test_the_first_token_timeout_leaves_answers_that_are_not_streams_alone(trio):
    envoy, east, west, paygo = trio({"first_token_timeout_s": 1})
    east.configure(latency_ms=2500)
    r = envoy.chat()
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "east"
    assert (east.count(), west.count()) == (1, 0)


def test_with_nowhere_else_to_go_the_stream_passes_as_it_is(start_mock, start_envoy):
    from conftest import backend_entry
    only = start_mock("only", "key-only")
    envoy = start_envoy({"backends": [backend_entry(only)]})
    only.configure(fail_next=[{"stream_error_before_content": True}])
    status, headers, events = stream_chat(envoy)
    # Not held (no fallback): the client gets the backend's own stream,
    # and the SDK would raise on its error event.
    assert status == 200
    assert any("error" in json.loads(e) for _, e in events if e != "[DONE]")
