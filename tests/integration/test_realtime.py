"""Realtime API websockets through Spillway with the current `openai` SDK:
each connection goes to one available backend, with that backend's key and
deployment name."""

import openai
import pytest
from conftest import backend_entry


def converse(connection) -> str:
    connection.response.create()
    text = ""
    for event in connection:
        # GA event names, and the preview protocol's.
        if event.type in ("response.output_text.delta", "response.text.delta"):
            text += event.delta
        if event.type == "response.done":
            assert event.response.usage.total_tokens > 0
            return text
    raise AssertionError("the connection ended before response.done")


def connections(mock) -> list[dict]:
    return [r for r in mock.requests() if r["path"].endswith("/realtime")]


def test_each_realtime_connection_goes_to_one_backend_with_its_key_and_name(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--deployments", "rt-east")
    west = start_mock("west", "key-west", "--deployments", "gpt-realtime")
    envoy = start_envoy({"backends": [backend_entry(east, deployments={"gpt-realtime": "rt-east"}),
                                      backend_entry(west)]})
    client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)
    answered = set()
    for _ in range(2):
        with client.realtime.connect(model="gpt-realtime") as connection:
            answered.add(converse(connection).split()[2])
    assert answered == {"east", "west"}
    for mock, deployment in ((east, "rt-east"), (west, "gpt-realtime")):
        [record] = connections(mock)
        assert record["status"] == 101 and record["deployment"] == deployment, record
        assert record["headers"]["api-key"] == mock.api_key
        assert "authorization" not in record["headers"]


def test_the_azure_client_connects_on_the_preview_path(start_mock, start_envoy):
    east = start_mock("east", "key-east", "--deployments", "rt-east")
    envoy = start_envoy({"backends": [backend_entry(east, deployments={"gpt-realtime": "rt-east"})]})
    # The SDK forces wss:// unless told where the websocket goes (no TLS on this loopback gateway).
    client = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="unused", api_version="2025-04-01-preview",
                                websocket_base_url=f"ws://127.0.0.1:{envoy.port}/openai", max_retries=0)
    with client.realtime.connect(model="gpt-realtime") as connection:
        assert converse(connection).startswith("Hello from east")
    [record] = connections(east)
    assert record["deployment"] == "rt-east" and record["headers"]["api-key"] == "key-east"


def test_a_key_in_the_query_is_for_the_gateway_only(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    envoy = start_envoy({"backends": [backend_entry(east)],
                         "clients": [{"name": "browser-app", "key": "browser-key-123"}]})
    # Browsers put the key in the query; the gateway checks it and sends it no further.
    client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)
    with client.realtime.connect(model="gpt-realtime", extra_query={"api-key": "browser-key-123"}) as connection:
        assert converse(connection).startswith("Hello from east")
    [record] = connections(east)
    assert "browser-key-123" not in str(record)
    assert record["headers"]["api-key"] == "key-east"
    with pytest.raises(Exception) as refused:
        with client.realtime.connect(model="gpt-realtime", extra_query={"api-key": "wrong-key-000"}) as connection:
            converse(connection)
    assert "401" in str(refused.value)
