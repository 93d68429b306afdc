"""Model-aware routing and the v1 API: a request goes only to backends that
serve its model (classic: the path's deployment; v1: the body's `model`),
failover stays among them, and `deployments` renames the body's `model` for
each backend of a v1 request — with the current `openai` SDK."""

import openai
import pytest
from conftest import backend_entry


def v1_client(envoy):
    return openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)


def body_models(mock) -> list[str]:
    return [r["body_json"].get("model") for r in mock.requests() if isinstance(r["body_json"], dict)]


def test_v1_requests_carry_each_backends_deployment_name(start_mock, start_envoy):
    # East's resource calls the deployment "gpt-4o-east"; west's calls it "gpt-4o".
    east = start_mock("east", "key-east", "--deployments", "gpt-4o-east")
    west = start_mock("west", "key-west", "--deployments", "gpt-4o")
    envoy = start_envoy({"backends": [backend_entry(east, deployments={"gpt-4o": "gpt-4o-east"}),
                                      backend_entry(west)]})
    client = v1_client(envoy)
    for _ in range(4):
        r = client.chat.completions.with_raw_response.create(model="gpt-4o",
                                                              messages=[{"role": "user", "content": "hi"}])
        assert r.http_response.status_code == 200
    stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert set(body_models(east)) == {"gpt-4o-east"} and len(body_models(east)) >= 2
    assert set(body_models(west)) == {"gpt-4o"} and len(body_models(west)) >= 2
    # A failover from east sends west its own name, not east's.
    east.configure(fail_next=[{"status": 503}])
    west.reset()
    r = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    r = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": "y"}])
    assert r.headers["x-spillway-backend"] == "west"
    assert body_models(west) == ["gpt-4o", "gpt-4o"]


def test_requests_go_only_to_backends_serving_their_model(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east, models=["gpt-4o"]),
                                      backend_entry(west, models=["gpt-4o-mini"])],
                         "api_version": "2024-10-21"})
    client = v1_client(envoy)
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert envoy.chat("gpt-4o").headers["x-spillway-backend"] == "east"
    assert set(body_models(west)) == {"gpt-4o-mini"}
    assert [r["path"] for r in east.requests()] == ["/openai/deployments/gpt-4o/chat/completions"] * 3
    # Failover stays among the backends serving the model: none is left here.
    east.configure(fail_next=[{"status": 503}])
    r = envoy.chat("gpt-4o")
    assert r.status_code == 503 and r.headers["x-spillway-backend"] == "east"
    assert west.count() == 3
    # A model no backend serves: Azure's 404, without an upstream call.
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "DeploymentNotFound" and "gpt-5" in err.value.message
    assert envoy.chat("dall-e-3").status_code == 404
    assert (east.count(), west.count()) == (4, 3)
