import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Envoy, MockBackend, require_artifacts  # noqa: E402


def pytest_sessionstart(session):
    require_artifacts()


@pytest.fixture
def start_mock():
    """Starts mock backends; all are stopped after the test."""
    started: list[MockBackend] = []

    def start(name: str, api_key: str | None = None, *args: str) -> MockBackend:
        m = MockBackend(name, api_key, *args)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def start_envoy():
    """Starts Envoy with the built filter for a filter JSON; stopped after the test."""
    started: list[Envoy] = []

    def start(filter_config, env=None, **kwargs) -> Envoy:
        e = Envoy(filter_config, env=env, **kwargs)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()


def backend_entry(mock: MockBackend, **extra) -> dict:
    entry = {"name": mock.name, "url": mock.url}
    if mock.api_key:
        entry["api_key"] = mock.api_key
    entry.update(extra)
    return entry


@pytest.fixture
def trio(start_mock, start_envoy):
    """Three keyed backends: east and west at priority 1, paygo at priority 2."""

    def make(filter_extra: dict | None = None, **backend_extra):
        east = start_mock("east", "key-east")
        west = start_mock("west", "key-west")
        paygo = start_mock("paygo", "key-paygo")
        cfg = {
            "backends": [
                backend_entry(east, **backend_extra.get("east", {})),
                backend_entry(west, **backend_extra.get("west", {})),
                backend_entry(paygo, priority=2, **backend_extra.get("paygo", {})),
            ],
            "api_version": "2024-10-21",
            **(filter_extra or {}),
        }
        envoy = start_envoy(cfg)
        return envoy, east, west, paygo

    return make
