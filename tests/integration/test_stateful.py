"""Stateful objects besides stored responses (files, batches) and multipart
bodies (audio, image edits) through Spillway, with the current `openai` SDK.

Files and batches exist only on the backend that created them: creations and
lists go to the home backend, everything naming an id to its owner."""

import io

import openai
import pytest
from conftest import backend_entry

API_VERSION = "2025-04-01-preview"
JSONL = (b'{"custom_id":"1","method":"POST","url":"/chat/completions",'
         b'"body":{"model":"gpt-4o-batch","messages":[{"role":"user","content":"hi"}]}}\n')


def paths_seen(mock) -> list[str]:
    return [r["method"] + " " + r["path"] for r in mock.requests()]


@pytest.mark.parametrize("home", [None, "west"])
def test_files_and_batches_live_on_the_home_backend(start_mock, start_envoy, home):
    east, west = start_mock("east", "key-east"), start_mock("west", "key-west")
    config = {"backends": [backend_entry(east), backend_entry(west)], "api_version": API_VERSION}
    if home:
        config["home_backend"] = home
    envoy = start_envoy(config)
    expected, other = (west, east) if home == "west" else (east, west)
    client = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)
    uploaded = client.files.create(file=("input.jsonl", io.BytesIO(JSONL)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert client.batches.retrieve(batch.id).id == batch.id
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.content(uploaded.id).read() == JSONL
    client.files.delete(uploaded.id)
    # Meanwhile chat is still balanced over both.
    azure = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="unused", api_version=API_VERSION, max_retries=0)
    served = {azure.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).headers["x-spillway-backend"] for _ in range(4)}
    assert served == {"east", "west"}
    assert not [p for p in paths_seen(other) if "/files" in p or "/batches" in p], paths_seen(other)
    assert len([p for p in paths_seen(expected) if "/files" in p or "/batches" in p]) == 6


def renaming_pair(start_mock, start_envoy, deployment: str, east_name: str):
    """East knows the deployment as `east_name`, west by the client's name."""
    east = start_mock("east", "key-east", "--deployments", east_name)
    west = start_mock("west", "key-west", "--deployments", deployment)
    envoy = start_envoy({"backends": [backend_entry(east, deployments={deployment: east_name}),
                                      backend_entry(west)], "api_version": API_VERSION})
    azure = openai.AzureOpenAI(azure_endpoint=envoy.url, api_key="unused", api_version=API_VERSION, max_retries=0)
    return envoy, azure, east, west


def test_multipart_audio_is_balanced_with_the_deployment_renamed(start_mock, start_envoy):
    envoy, azure, east, west = renaming_pair(start_mock, start_envoy, "whisper", "whisper-east")
    audio = b"RIFF\x24\x00\x00\x00WAVEfmt \r\n" + bytes(range(256)) * 8
    answers = [azure.audio.transcriptions.create(model="whisper", file=("speech.wav", io.BytesIO(audio)))
               for _ in range(4)]
    assert {a.text.split()[2] for a in answers} == {"east", "west"}
    assert all(f"({len(audio)} bytes)" in a.text for a in answers)
    assert {r["path"] for r in east.requests()} == {"/openai/deployments/whisper-east/audio/transcriptions"}
    assert {r["path"] for r in west.requests()} == {"/openai/deployments/whisper/audio/transcriptions"}
    # The v1 style sends the deployment as a form field of the multipart body, which is not
    # parsed: it is balanced, and each backend must know the name the client uses.
    v1 = openai.OpenAI(base_url=f"{envoy.url}/openai/v1/", api_key="unused", max_retries=0)
    west.reset()
    answer = v1.audio.transcriptions.create(model="whisper", file=("speech.wav", io.BytesIO(audio)))
    answer = answer if answer.text.startswith("Transcribed by west") else \
        v1.audio.transcriptions.create(model="whisper", file=("speech.wav", io.BytesIO(audio)))
    assert answer.text.startswith("Transcribed by west")
    assert [r["path"] for r in west.requests()][-1] == "/openai/v1/audio/transcriptions"


def test_multipart_image_edits_are_balanced_with_the_deployment_renamed(start_mock, start_envoy):
    envoy, azure, east, west = renaming_pair(start_mock, start_envoy, "gpt-image-1", "image-east")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    for _ in range(2):
        edited = azure.images.edit(model="gpt-image-1", image=("cat.png", io.BytesIO(png)), prompt="add a hat")
        assert edited.data
    assert [r["path"] for r in east.requests()] == ["/openai/deployments/image-east/images/edits"]
    assert [r["path"] for r in west.requests()] == ["/openai/deployments/gpt-image-1/images/edits"]
    # The multipart body reached each backend whole.
    for m in (east, west):
        assert m.requests()[0]["body_json"]["prompt"] == "add a hat"
        assert m.requests()[0]["body_json"]["image"] == f"cat.png ({len(png)} bytes)"
