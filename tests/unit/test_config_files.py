"""farmd.yaml as a file: errors name their line, duplicate keys are refused, the JSON Schema
shipped with the package is the model's, the examples follow it and show every field, and
farmd --check --print prints what farmd runs with."""
from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from nlbfarm.config import SCHEMA_FILE, Config, effective_yaml, json_schema, load_config
from nlbfarm.errors import ConfigError
from nlbfarm.node import agent

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["farmd.yaml", "modules/nginx.yaml", "modules/generic.yaml"]
MINIMAL = """\
node:
  id: n1
cluster:
  vips: [198.18.0.100]
etcd:
  endpoints: ["127.0.0.1:2379"]
"""


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "farmd.yaml"
    p.write_text(text)
    return p


def test_a_bad_field_names_its_line(tmp_path):
    p = write(tmp_path, MINIMAL + "timing:\n  lease_ttl: 3\n  fence_timeout: 9\n  keepalive_intervall: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    text = str(ei.value)
    assert ("timing.keepalive_intervall: unknown field (check the spelling against the configuration "
            "reference) (line 10)") in text, text


def test_a_missing_field_names_its_section_line(tmp_path):
    p = write(tmp_path, MINIMAL.replace("  id: n1\n", "  weight: 2\n"))
    with pytest.raises(ConfigError, match=r"node\.id: required field is missing \(line 1\)"):
        load_config(p)


def test_regression_a_duplicate_key_is_refused_not_silently_replaced(tmp_path):
    """PyYAML keeps the last of two equal keys: a second timing: section replaced the first."""
    p = write(tmp_path, MINIMAL + "timing:\n  lease_ttl: 3\ntiming:\n  lease_ttl: 5\n")
    with pytest.raises(ConfigError, match=r"key timing appears twice \(lines 7 and 9\)"):
        load_config(p)
    p = write(tmp_path, MINIMAL.replace("  id: n1\n", "  id: n1\n  id: n2\n"))
    with pytest.raises(ConfigError, match=r"key node\.id appears twice \(lines 2 and 3\)"):
        load_config(p)


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    p = write(tmp_path, MINIMAL + "timing: {lease_ttl: 3\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "\n" not in str(ei.value) and re.search(r"line \d+, column \d+", str(ei.value)), str(ei.value)


def test_a_runaway_file_is_refused_before_parsing(tmp_path):
    p = write(tmp_path, MINIMAL + "#" * (1 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(p)


def test_the_shipped_schema_is_the_models():
    assert SCHEMA_FILE.exists(), "nlbfarm/farmd.schema.json: run farmd --schema > nlbfarm/farmd.schema.json"
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "nlbfarm/farmd.schema.json is stale: run farmd --schema > nlbfarm/farmd.schema.json")
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_the_schema_ships_in_the_package():
    import configparser
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    assert "farmd.schema.json" in cp["options.package_data"]["nlbfarm"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_follow_the_schema_and_name_it(name):
    path = REPO / "deploy" / "examples" / name
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert m and (path.parent / m.group(1)).resolve() == SCHEMA_FILE, first
    jsonschema.validate(yaml.safe_load(path.read_text()), json_schema())
    load_config(path)


@pytest.mark.parametrize("doc, where", [
    ({"node": {"id": "n1"}, "cluster": {"vips": ["198.18.0.100"]}, "etcd": {"endpoints": ["a:1"]}, "nodes": {}},
     "nodes"),
    ({"node": {"id": "n1", "weight": "heavy"}, "cluster": {"vips": ["198.18.0.100"]},
      "etcd": {"endpoints": ["a:1"]}}, "weight"),
    ({"node": {"id": "n1"}, "cluster": {"vips": []}, "etcd": {"endpoints": ["a:1"]}}, "vips"),
])
def test_the_schema_refuses_what_the_model_refuses(doc, where):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json_schema())
    with pytest.raises(Exception):
        Config.model_validate(doc)


def model_fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield prefix + name
        for t in (f.annotation, *typing.get_args(f.annotation)):
            for u in (t, *typing.get_args(t)):
                if isinstance(u, type) and issubclass(u, BaseModel):
                    yield from model_fields(u, prefix + name + ".")


def test_the_example_shows_every_field():
    """deploy/examples/farmd.yaml names every field of the model, set or commented."""
    text = (REPO / "deploy" / "examples" / "farmd.yaml").read_text()
    fields = sorted(set(model_fields(Config)))
    assert len(fields) > 60
    missing = [f for f in fields if not re.search(r"(?m)^\s*(#\s*)?(-\s*)?" + re.escape(f.split(".")[-1]) + ":",
                                                   text)]
    assert missing == [], f"fields the example does not show: {missing}"


def test_check_print_shows_the_effective_configuration(tmp_path, capsys):
    p = write(tmp_path, MINIMAL)
    assert agent.main(["--config", str(p), "--check", "--print"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# farmd: configuration {p} is valid")
    printed = yaml.safe_load(out)
    assert printed["timing"]["lease_ttl"] == 3 and printed["cluster"]["buckets"] == 4096
    again = write(tmp_path, out)
    assert load_config(again) == load_config(p), "the printed configuration loads back to the same"
    assert effective_yaml(load_config(p)) in out


def test_print_needs_check_and_schema_needs_no_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        agent.main(["--config", str(write(tmp_path, MINIMAL)), "--print"])
    assert "--print goes with --check" in capsys.readouterr().err
    assert agent.main(["--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()
