"""Every example filter JSON renders to a bootstrap that Envoy accepts."""

import json
from pathlib import Path

import pytest
from harness import ROOT, validate

EXAMPLES = sorted((ROOT / "examples").glob("*.json"))


def env_for(config: dict) -> dict[str, str]:
    names = [b["api_key_env"] for b in config["backends"] if "api_key_env" in b]
    names += [c["key_env"] for c in config.get("clients", []) if "key_env" in c]
    return {n: f"example-secret-for-{n.lower()}" for n in names}


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"ptu-spillover.json", "multi-region.json", "dalle3-regions.json"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_renders_and_validates(path: Path):
    config = json.loads(path.read_text())
    result = validate(config, env=env_for(config))
    assert result.returncode == 0, result.stderr[-3000:]
