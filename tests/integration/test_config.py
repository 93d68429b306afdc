"""A bad filter JSON is refused with a log line naming the field; Envoy keeps the old config."""

import json
import time

import pytest
from conftest import backend_entry
from harness import RENDER, validate, wait_until

GOOD = {"backends": [{"name": "a", "url": "http://127.0.0.1:9", "api_key": "k"}]}


@pytest.mark.parametrize("raw, field", [
    ('{"backends":[{"name":"a","url":"http://127.0.0.1:9","wieght":2}]}', "unknown field `wieght`"),
    ('{"backends":[{"name":"a","url":"http://127.0.0.1:9","weight":0}]}', "backends[0].weight"),
    ('{"backends":[]}', "backends: must list at least one backend"),
    ('{"backends":[{"name":"a","url":"http://x"},{"name":"a","url":"http://y"}]}', "backends[1].name"),
    ('{"backends":[{"name":"a","url":"ftp://x"}]}', "backends[0].url"),
    ('{"backends":[{"name":"a","url":"http://x","api_key_env":"SPILLWAY_UNSET_VAR"}]}', "backends[0].api_key_env"),
    ('{"backends": [', "EOF while parsing"),
])
def test_envoy_refuses_a_bad_filter_config_naming_the_field(raw, field):
    result = validate(GOOD, raw_filter_json=raw)
    assert result.returncode != 0
    lines = [l for l in (result.stdout + result.stderr).splitlines() if "invalid spillway config" in l]
    assert lines, result.stderr[-2000:]
    assert any(field in l for l in lines), lines


def test_renderer_refuses_a_bad_config_before_envoy_sees_it(tmp_path):
    import subprocess
    bad = tmp_path / "bad.json"
    bad.write_text('{"backends":[{"name":"a","url":"http://x","weight":0}]}')
    r = subprocess.run([str(RENDER), str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "backends[0].weight" in r.stderr and r.stdout == ""


def test_a_key_never_appears_in_envoy_logs(start_mock, start_envoy):
    m = start_mock("a", "super-secret-key-123")
    envoy = start_envoy({"backends": [backend_entry(m)], "api_version": "2024-10-21"},
                        render_args=["--no-access-log"])
    assert envoy.chat(headers={"api-key": "client-secret-456"}).status_code == 200
    time.sleep(0.2)
    log = envoy.log()
    assert "configured with 1 backends" in log
    assert "super-secret-key-123" not in log and "client-secret-456" not in log


def test_bad_update_is_rejected_and_the_old_config_keeps_serving(start_mock, start_envoy):
    old, new = start_mock("old", "k-old"), start_mock("new", "k-new")
    # Clusters (and the attempt role) are static; the listener (request role) is reloadable.
    envoy = start_envoy({"backends": [backend_entry(old), backend_entry(new, priority=2)],
                         "api_version": "2024-10-21"}, lds=True)
    assert envoy.chat().headers["x-spillway-backend"] == "old"

    # A config the filter refuses: Envoy rejects the listener update and logs why.
    bad = json.dumps({"backends": [backend_entry(new)], "surprise": True})
    envoy.apply({"backends": [backend_entry(new)]}, raw_filter_json=bad)
    wait_until(lambda: envoy.stat("listener_manager.lds.update_rejected") >= 1, what="update rejected")
    assert "unknown field `surprise`" in envoy.log()
    for _ in range(3):
        r = envoy.chat()
        assert (r.status_code, r.headers["x-spillway-backend"]) == (200, "old")

    # A good update (priorities swapped) applies without a restart.
    envoy.apply({"backends": [backend_entry(old, priority=2), backend_entry(new)], "api_version": "2024-10-21"})
    wait_until(lambda: envoy.stat("listener_manager.lds.update_success") >= 2, what="update applied")
    wait_until(lambda: envoy.chat().headers.get("x-spillway-backend") == "new", what="new config serving")


def test_an_unknown_root_id_is_a_config_error_not_a_guess(tmp_path):
    """A plugin whose root_id is neither role's is refused, naming the id,
    instead of silently running as one of the roles."""
    import os
    import random
    import subprocess

    import yaml
    from harness import ENVOY, free_port, render

    path = render(GOOD, tmp_path, free_port(), free_port())
    doc = yaml.safe_load(path.read_text())
    cluster = doc["static_resources"]["clusters"][0]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    plugin = options["http_filters"][0]["typed_config"]["config"]
    assert plugin["root_id"] == "spillway_attempt"
    plugin["root_id"] = plugin["name"] = "my_attempt_role"
    path.write_text(json.dumps(doc))
    r = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                        "--base-id", str(random.randint(1000, 10_000_000))],
                       capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines() if "invalid spillway config" in l]
    assert any('root_id "my_attempt_role"' in l for l in lines), (r.stdout + r.stderr)[-2000:]


def test_a_reload_that_changes_the_backend_set_is_refused(start_mock, start_envoy):
    """Clusters (and the attempt role) change only with a restart: a listener
    update naming other backends would route to clusters that do not exist."""
    old, new, third = start_mock("old", "k-old"), start_mock("new", "k-new"), start_mock("third", "k-third")
    envoy = start_envoy({"backends": [backend_entry(old), backend_entry(new, priority=2)]}, lds=True)
    envoy.apply({"backends": [backend_entry(old), backend_entry(third, priority=2)]})
    wait_until(lambda: envoy.stat("listener_manager.lds.update_rejected") >= 1, what="update rejected")
    assert "differ from the backends the clusters serve [new,old]" in envoy.log()
    old.configure(fail_next=[{"status": 503}])
    r = envoy.chat()
    assert (r.status_code, r.headers["x-spillway-backend"]) == (200, "new")
    assert third.count() == 0


@pytest.mark.parametrize("raw, field, secret", [
    ('{"backends":[{"name":"a","url":"https://user:s3cret-pass@host.example.com/x"}]}', "backends[0].url", "s3cret-pass"),
    ('{"backends":[{"name":"a","url":"http://127.0.0.1:9","api_key":"k3y-with\\r\\nx-evil: 1"}]}', "backends[0].api_key",
     "k3y-with"),
    ('{"backends":[{"name":"a","url":"http://127.0.0.1:9"}],"clients":[{"name":"c","key":"client key 123"}]}',
     "clients[0].key", "client key 123"),
])
def test_a_refused_config_never_echoes_its_secrets(raw, field, secret):
    result = validate(GOOD, raw_filter_json=raw)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    lines = [l for l in out.splitlines() if "invalid spillway config" in l]
    assert any(field in l for l in lines), lines
    assert not any(secret in l for l in lines), lines
