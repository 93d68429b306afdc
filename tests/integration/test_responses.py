"""The Responses API through Spillway with the current `openai` SDK, in both
styles: stored responses stay with the backend that created them.

The mock backends keep stored responses per backend, so a follow-up sent to
the wrong one fails exactly as on Azure (400 previous_response_not_found,
404 for retrieve/delete)."""

import time

import openai
import pytest
from conftest import backend_entry

API_VERSION = "2025-04-01-preview"


def sdk_clients(envoy):
    """The two ways users call Azure OpenAI with the SDK."""
    return {
        "openai-v1": openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0),
        "azure": openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="unused", api_version=API_VERSION,
                                    max_retries=0),
    }


@pytest.fixture
def pair(start_mock, start_envoy):
    east, west = start_mock("east", "key-east"), start_mock("west", "key-west")
    envoy = start_envoy({"backends": [backend_entry(east), backend_entry(west)], "api_version": API_VERSION})
    return envoy, east, west


def answered_by(response) -> str:
    return response.output_text.split()[2]


def creates_and_follow_ups(mock) -> list[str]:
    """`create`, `follow-up` or the object path, per request the mock saw."""
    seen = []
    for r in mock.requests():
        body = r["body_json"] if isinstance(r["body_json"], dict) else {}
        if r["method"] == "POST" and r["path"].endswith("/responses"):
            seen.append("follow-up" if body.get("previous_response_id") else "create")
        else:
            seen.append(r["method"] + " " + r["path"].rsplit("/", 1)[-1])
    return seen


@pytest.mark.parametrize("style", ["openai-v1", "azure"])
def test_a_conversation_stays_with_the_backend_that_stored_it(pair, style):
    envoy, east, west = pair
    client = sdk_clients(envoy)[style]
    first = client.responses.create(model="gpt-4o", input="Hello")
    owner = answered_by(first)
    chain = [first]
    for turn in range(2, 6):
        chain.append(client.responses.create(model="gpt-4o", input=f"turn {turn}",
                                             previous_response_id=chain[-1].id))
        assert answered_by(chain[-1]) == owner
        assert f"(turn {turn})" in chain[-1].output_text
    # Retrieve, input items and delete go to the owner too.
    assert client.responses.retrieve(chain[2].id).id == chain[2].id
    items = client.responses.input_items.list(chain[3].id)
    assert items.data
    client.responses.delete(chain[1].id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(chain[1].id)
    other = west if owner == "east" else east
    assert all(kind == "create" for kind in creates_and_follow_ups(other)), creates_and_follow_ups(other)
    # New conversations are still balanced across both.
    starters = {answered_by(client.responses.create(model="gpt-4o", input="hi")) for _ in range(4)}
    assert starters == {"east", "west"}


def test_a_streamed_conversation_is_followed_by_id(pair):
    envoy, east, west = pair
    client = sdk_clients(envoy)["openai-v1"]
    with client.responses.stream(model="gpt-4o", input="Hello") as stream:
        events = [e.type for e in stream]
        first = stream.get_final_response()
    assert events[0] == "response.created" and events[-1] == "response.completed"
    owner = answered_by(first)
    events = list(client.responses.create(model="gpt-4o", input="more", previous_response_id=first.id, stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.startswith(f"Hello from {owner}") and "(turn 2)" in text
    completed = events[-1].response
    # Usage from each stream's last event reached the metrics.
    time.sleep(0.3)
    tokens = sum(envoy.stat(f"wasmcustom.spillway_tokens_total.backend.{owner}.client.none.deployment.gpt-4o.kind.{k}")
                 for k in ("prompt", "completion"))
    assert tokens == first.usage.total_tokens + completed.usage.total_tokens


def test_a_throttled_owner_gets_a_429_not_a_wrong_backend(pair):
    envoy, east, west = pair
    client = sdk_clients(envoy)["openai-v1"]
    first = client.responses.create(model="gpt-4o", input="Hello")
    owner, other = (east, west) if answered_by(first) == "east" else (west, east)
    owner.configure(fail_next=[{"status": 429, "retry_after": "20"}])
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="gpt-4o", input="more", previous_response_id=first.id)
    assert 19 <= int(err.value.response.headers["retry-after"]) <= 20
    # While the owner is out, follow-ups are answered at once, locally, with its wait.
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.retrieve(first.id)
    assert err.value.response.headers["x-spillway-attempts"] == "0"
    assert creates_and_follow_ups(other) == []


def test_an_unknown_id_is_found_by_asking_the_backends_then_remembered(pair, start_envoy):
    envoy, east, west = pair
    client = sdk_clients(envoy)["openai-v1"]
    made = [client.responses.create(model="gpt-4o", input="Hello") for _ in range(2)]
    owners = {r.id: answered_by(r) for r in made}
    assert set(owners.values()) == {"east", "west"}
    # Another Envoy (a restart, another replica) knows none of these ids.
    fresh = start_envoy({"backends": [backend_entry(east), backend_entry(west)], "api_version": API_VERSION})
    client = sdk_clients(fresh)["openai-v1"]
    for r in made:
        follow = client.responses.create(model="gpt-4o", input="more", previous_response_id=r.id)
        assert answered_by(follow) == owners[r.id]
    # Learned: the next follow-up of each goes straight to its owner.
    before = {m.name: m.count() for m in (east, west)}
    for r in made:
        assert client.responses.retrieve(r.id).id == r.id
    after = {m.name: m.count() for m in (east, west)}
    assert after == {"east": before["east"] + 1, "west": before["west"] + 1}


def test_an_unknown_id_whose_possible_owner_is_out_gets_a_429_not_a_400(pair, start_envoy):
    """A follow-up nobody remembers (another Envoy, or an evicted entry) is
    looked up on the backends that are in; when the one that holds it is
    out, "not found" from the others is not the answer: the client gets a
    429 with the wait and finds its conversation once the owner is back."""
    envoy, east, west = pair
    client = sdk_clients(envoy)["openai-v1"]
    first = client.responses.create(model="gpt-4o", input="Hello")
    owner, other = (east, west) if answered_by(first) == "east" else (west, east)
    fresh = start_envoy({"backends": [backend_entry(east), backend_entry(west)], "api_version": API_VERSION})
    owner.configure(fail_next=[{"status": 429, "retry_after": "2"}])
    while owner.count() < 2:  # the owner's 429 takes it out of the fresh Envoy's rotation
        fresh.chat()
    client = sdk_clients(fresh)["openai-v1"]
    with pytest.raises(openai.RateLimitError) as err:
        client.responses.create(model="gpt-4o", input="more", previous_response_id=first.id)
    assert 1 <= int(err.value.response.headers["retry-after"]) <= 2
    assert creates_and_follow_ups(other)[-1] == "follow-up"  # the other backend was asked
    time.sleep(2.1)
    follow = client.responses.create(model="gpt-4o", input="more", previous_response_id=first.id)
    assert answered_by(follow) == answered_by(first)


def test_responses_usage_and_budget_count_against_client_limits(start_mock, start_envoy):
    east = start_mock("east", "key-east")
    envoy = start_envoy({"backends": [backend_entry(east)], "api_version": API_VERSION,
                         "clients": [{"name": "team", "key": "team-key-123", "tokens_per_minute": 8000}]})
    client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="team-key-123", max_retries=0)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Hello", max_output_tokens=5000)
    r = raw.parse()
    # The 5000-token budget was charged before the call (what was left then
    # shows it); the real usage settled it afterwards.
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 3000
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="Hello again", max_output_tokens=10)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) > 7900
    # While one request holds a 6000-token budget, another one's does not
    # fit: refused before any backend sees it.
    from concurrent.futures import ThreadPoolExecutor
    east.configure(latency_ms=1500)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.responses.create, model="gpt-4o", input="big", max_output_tokens=6000)
        time.sleep(0.5)
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model="gpt-4o", input="big", max_output_tokens=6000)
        slow.result()
    assert east.count() == 3
    time.sleep(0.5)
    line = [l for l in envoy.log().splitlines() if '"path":"/openai/v1/responses"' in l and '"status":200' in l][0]
    assert f'"total_tokens":{r.usage.total_tokens}' in line
    assert envoy.stat("wasmcustom.spillway_tokens_total.backend.east.client.team.deployment.gpt-4o.kind.completion") \
        >= r.usage.output_tokens
