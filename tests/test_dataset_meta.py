"""dataset.json of a demo build: reproducible (no loopback URL of the served world) and honestly attributed."""

from __future__ import annotations

import json

import yaml

from cmsrd.config import load_config
from cmsrd.demo import resolved_sources
from cmsrd.manifest import dataset_meta


def _meta(cfg) -> dict:
    with resolved_sources(cfg) as (live, _):
        assert "127.0.0.1" in live.hr.url  # the build itself talks to the served world
        return dataset_meta(cfg, live, {})


def test_demo_dataset_json_names_the_world_not_its_ephemeral_urls(small_world, tmp_path):
    base = load_config("demo-real").to_dict()
    base["world"] = {"path": str(small_world)}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(base))
    cfg = load_config(tmp_path / "p.yaml")
    first, second = _meta(cfg), _meta(cfg)  # two servers, two ports
    text = json.dumps(first["sources"])
    assert "127.0.0.1" not in text and "localhost" not in text
    assert first["sources"] == second["sources"]
    assert first["sources"]["hr"]["url"].startswith("cmsrd offline world ")
    lr = first["sources"]["lr"]
    assert lr["catalogue"] == first["sources"]["hr"]["url"]
    assert "Contains modified Copernicus" not in lr["attribution"] and "synthetic" in lr["attribution"]
