"""docker-compose.yml and the Dockerfile agree with the code: the services exist, start in the
right order, and every ``tsptq`` command they run parses with the real ``tsptq`` parser."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("postgres", "ray-head", "ray-worker", "migrate", "api", "dispatcher")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _image_entrypoint() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert m, "the Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(m.group(1))


def tsptq_commands(service: dict) -> list[list[str]]:
    """The argument lists of every ``tsptq`` invocation a service runs (through the image's
    ``tsptq`` entrypoint, or inside an ``sh -c`` script)."""
    entrypoint = _as_list(service["entrypoint"]) if "entrypoint" in service else (
        _image_entrypoint() if "build" in service or "tsptq" in str(service.get("image"))
        else [])
    argv = entrypoint + _as_list(service.get("command"))
    if argv[:1] == ["tsptq"]:
        return [argv[1:]]
    if argv[:1] in (["sh"], ["bash"], ["/bin/sh"]) and "-c" in argv:
        script = argv[argv.index("-c") + 1]
        found = []
        for part in re.split(r"&&|\|\||;|\n", script):
            words = shlex.split(part)
            if words[:1] == ["exec"]:
                words = words[1:]
            if words[:1] == ["tsptq"]:
                found.append(words[1:])
        return found
    return []


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_services_exist(compose):
    assert set(SERVICES) <= set(compose["services"])
    assert "pgdata" in compose.get("volumes", {})


def test_start_order(compose):
    s = compose["services"]

    def needs(name: str) -> dict[str, str]:
        deps = s[name].get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must name conditions"
        return {k: v["condition"] for k, v in deps.items()}

    assert "pg_isready" in " ".join(_as_list(s["postgres"]["healthcheck"]["test"]))
    assert s["postgres"]["image"] == "postgres:15"
    assert "ray status" in " ".join(_as_list(s["ray-head"]["healthcheck"]["test"]))
    assert "/healthz" in " ".join(_as_list(s["api"]["healthcheck"]["test"]))
    assert needs("ray-worker") == {"ray-head": "service_healthy"}
    assert needs("migrate") == {"postgres": "service_healthy"}
    assert needs("api") == {"migrate": "service_completed_successfully"}
    assert needs("dispatcher") == {"migrate": "service_completed_successfully",
                                   "ray-head": "service_healthy"}
    for name in SERVICES:
        assert "healthcheck" in s[name] or s[name].get("depends_on"), name


def test_ray_and_database_wiring(compose):
    s = compose["services"]
    head = _as_list(s["ray-head"]["entrypoint"]) + _as_list(s["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--port=6379" in head
    assert "--block" in head and "--dashboard-host=0.0.0.0" in head
    worker = _as_list(s["ray-worker"]["entrypoint"]) + _as_list(s["ray-worker"]["command"])
    assert worker[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker
    assert s["dispatcher"]["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    for name in ("migrate", "api", "dispatcher"):
        assert s[name]["environment"]["TSPTQ_DATABASE_URL"] == (
            "postgresql://postgres:postgres@postgres:5432/tsptq")
    assert s["migrate"]["restart"] == "no"


def test_every_tsptq_command_parses(compose):
    """Against the real parser: fails until ``serve``, ``worker`` and ``db upgrade`` exist."""
    parser = build_parser()
    commands = {name: tsptq_commands(svc) for name, svc in compose["services"].items()}
    assert commands["migrate"] == [["db", "upgrade"]]
    assert commands["api"] == [["serve", "--api-only", "--host", "0.0.0.0", "--port", "8000"]]
    assert commands["dispatcher"] == [["worker"]]
    known = _subparsers(parser)
    missing = []
    for name, argvs in commands.items():
        for argv in argvs:
            if argv[0] not in known:
                missing.append(f"{name}: tsptq {argv[0]}")
                continue
            nested = _subparsers(known[argv[0]])
            if nested and len(argv) > 1 and argv[1] not in nested:
                missing.append(f"{name}: tsptq {argv[0]} {argv[1]}")
    assert not missing, f"not subcommands of tsptq: {missing}"
    for argvs in commands.values():
        for argv in argvs:
            parser.parse_args(argv)  # flags too: SystemExit(2) if one is unknown


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "torch==2.14.1 torchvision==0.29.1" in text
    assert re.search(r"^RUN pip install \. ", text, re.M)
    assert _image_entrypoint() == ["tsptq"]
    # every package pyproject finds is copied into the build
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r'include = \[(.*?)\]', pyproject, re.S).group(1)
    for pkg in re.findall(r'"(\w+)\*"', include):
        assert re.search(rf"^COPY {pkg} \./{pkg}$", text, re.M), pkg


def test_ci_workflow_in_docs_parses():
    """docs/ci.md's GitHub Actions workflow is valid YAML and its gate command parses."""
    text = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert len(blocks) == 2  # the workflow, then the action's `uses:` steps
    workflow = yaml.safe_load(blocks[0])
    steps = workflow["jobs"]["gate"]["steps"]
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    gate = next(s for s in steps if s.get("name") == "Quantization gate")
    argv = shlex.split(gate["run"].replace("\\\n", " "))
    assert argv[0].endswith("tsptq") and argv[1] == "gate"
    args = build_parser().parse_args(argv[1:])
    assert args.baseline == Path("ci/baseline.json") and args.junit is not None
    assert args.max_drop == 0.5
    serve = next(s for s in steps if s.get("name") == "Start a local service")
    assert "tsptq serve" in serve["run"]


def test_action_use_in_docs_names_only_its_inputs():
    """docs/ci.md's `uses:` step of the composite action passes inputs that action.yml has,
    and every required one."""
    text = (ROOT / "docs" / "ci.md").read_text()
    steps = yaml.safe_load(re.findall(r"```yaml\n(.*?)```", text, re.S)[1])
    step = next(s for s in steps if s.get("name") == "Quantization gate")
    inputs = yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
    assert set(step["with"]) <= set(inputs), set(step["with"]) - set(inputs)
    assert {k for k, v in inputs.items() if v.get("required")} <= set(step["with"])
