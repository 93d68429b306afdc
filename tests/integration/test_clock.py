"""Deadlines survive wall-clock steps.

Envoy runs with a small preloaded shim (wallstep.c) that shifts its wall
clock by what the test writes to a file, monotonic time left alone: the test
steps the wall clock an hour forward or back while requests flow, as NTP or
an operator setting the date would. Throttles and client limits are kept on
the host's steady clock: a step neither releases every deadline at once nor
freezes them for the length of the step.
"""

import subprocess
import time
from pathlib import Path

import pytest

from conftest import backend_entry


@pytest.fixture(scope="module")
def wallstep(tmp_path_factory) -> Path:
    lib = tmp_path_factory.mktemp("wallstep") / "wallstep.so"
    source = Path(__file__).with_name("wallstep.c")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib


class WallClock:
    """The wall-clock offset Envoy sees."""

    def __init__(self, directory: Path, lib: Path):
        self.path = directory / "wall-offset"
        self.lib = lib
        self.step(0)

    def step(self, seconds: int) -> None:
        self.path.write_text(f"{seconds:+d}\n")
        time.sleep(0.1)  # the shim re-reads it every 50 ms

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.lib), "WALLSTEP_FILE": str(self.path)}


def _pair(start_mock, start_envoy, tmp_path, wallstep, **filter_extra):
    east = start_mock("east", "key-east")
    west = start_mock("west", "key-west")
    clock = WallClock(tmp_path, wallstep)
    config = {"backends": [backend_entry(east), backend_entry(west, priority=2)], **filter_extra}
    envoy = start_envoy(config, env=clock.env())
    return east, west, envoy, clock


def test_a_forward_step_releases_no_throttle_and_no_client_limit(start_mock, start_envoy, tmp_path, wallstep):
    east, west, envoy, clock = _pair(
        start_mock, start_envoy, tmp_path, wallstep,
        clients=[{"name": "team", "key": "key-of-the-team-1", "requests_per_minute": 5}],
    )
    team = {"api-key": "key-of-the-team-1"}
    east.configure(fail_next=[{"status": 429, "retry_after": "60"}])
    r = envoy.chat(headers=team)
    assert r.status_code == 200 and r.headers["x-spillway-backend"] == "west"
    clock.step(3600)
    # An hour later by the wall clock, a second later in fact: east is still
    # throttled and the team has 4 of its 5 requests left, not a fresh minute.
    served = [envoy.chat(headers=team) for _ in range(4)]
    assert [r.headers.get("x-spillway-backend") for r in served] == ["west"] * 4
    limited = envoy.chat(headers=team)
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "429"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert east.count() == 1 and west.count() == 5


def test_a_backward_step_freezes_no_throttle(start_mock, start_envoy, tmp_path, wallstep):
    east, west, envoy, clock = _pair(start_mock, start_envoy, tmp_path, wallstep)
    east.configure(fail_next=[{"status": 429, "retry_after": "2"}])
    assert envoy.chat().headers["x-spillway-backend"] == "west"
    clock.step(-3600)
    assert envoy.chat().headers["x-spillway-backend"] == "west"
    # Two seconds later east is back, not an hour later.
    time.sleep(2.3)
    assert envoy.chat().headers["x-spillway-backend"] == "east"
    assert east.count() == 2 and west.count() == 2
