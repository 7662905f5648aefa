"""The fleet's deployment files keep the invariants the k-NN client depends on.

The schemas are checked by ``make deploy-check`` (kubernetes-validate, the
Compose specification); these tests check what a schema cannot: that the
numbers and names in the files agree with each other, with the service and with
the README's settings table.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from remote_vector_index_builder import __version__
from remote_vector_index_builder.core.options import DEFAULT_KEEP_ALIVE_SECONDS
from test_remote_vector_index_builder.support import readme_variables

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
IMAGE = "remote-vector-index-builder"
K8sObjects = dict[tuple[str, str], dict[str, Any]]

_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _quantity(value: str) -> int:
    """Bytes of a Kubernetes memory quantity (``16Gi``, ``512M``, ``1024``)."""
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", value)
    assert match, f"unsupported quantity {value!r}"
    return int(match[1]) * _QUANTITY.get(match[2] or "", 1)


def _duration_s(value: str) -> float:
    """Seconds of a Compose duration (``45s``, ``1m30s``)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", value)
    assert match and value, f"unsupported duration {value!r}"
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_objects() -> K8sObjects:
    objects: K8sObjects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _documents(path):
            if doc["kind"] != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _documented(name: str, documented: set[str]) -> bool:
    return name in documented or any(
        d.endswith("*") and name.startswith(d[:-1]) for d in documented
    )


def _check_fleet_timing(env: dict[str, str]) -> None:
    """Several missed heartbeats before a lease expires; a Retry-After that outlasts a failover."""
    assert float(env["RVIB_LEASE_SECONDS"]) >= 3 * float(env["RVIB_HEARTBEAT_SECONDS"])
    assert float(env["RVIB_REDIS_RETRY_AFTER_SECONDS"]) >= 10
    # Finished jobs outlive the client's 60-minute wait.
    assert float(env["REQUEST_STORE_TTL_SECONDS"]) >= 3600


def _has_flag(args: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in itertools.pairwise(args))


@pytest.fixture(scope="module")
def k8s() -> K8sObjects:
    return _k8s_objects()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def _replicas(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in compose["services"].items() if IMAGE in str(svc.get("image", ""))
    }


def _builder(k8s: K8sObjects) -> dict[str, Any]:
    (deployment,) = (o for (kind, _), o in k8s.items() if kind == "Deployment")
    return deployment


def _builder_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if IMAGE in c["image"])
    return container


def _config(k8s: K8sObjects, container: dict[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}
    for source in container.get("envFrom", []):
        data.update(k8s[("ConfigMap", source["configMapRef"]["name"])]["data"])
    return data


def test_readme_table_is_parsed() -> None:
    names = readme_variables()
    assert {"RVIB_REDIS_URL", "RVIB_SHUTDOWN_GRACE_SECONDS", "AWS_*", "S3_ENDPOINT_URL"} <= names
    assert not _documented("RVIB_NO_SUCH_SETTING", names)
    assert _documented("AWS_SECRET_ACCESS_KEY", names)


def test_kubernetes_termination_grace_covers_shutdown_grace_and_pre_stop(
    k8s: K8sObjects,
) -> None:
    deployment = _builder(k8s)
    pod = deployment["spec"]["template"]["spec"]
    container = _builder_container(deployment)
    grace = float(_config(k8s, container)["RVIB_SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep_s = float(command[1])
    assert 2 <= sleep_s <= 15
    assert pod["terminationGracePeriodSeconds"] > grace + sleep_s


def test_kubernetes_probes_ports_and_environment(
    k8s: K8sObjects,
) -> None:
    deployment = _builder(k8s)
    pod = deployment["spec"]["template"]["spec"]
    container = _builder_container(deployment)
    assert deployment["spec"]["replicas"] >= 3
    # Kubernetes would set RVIB_PORT=tcp://... for the Service named rvib.
    assert pod["enableServiceLinks"] is False
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 1025}
    assert container["readinessProbe"]["httpGet"] == {"path": "/_ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/_heart_beat", "port": "http"}
    env = {e["name"]: e for e in container["env"]}
    assert env["RVIB_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert "secretKeyRef" in env["RVIB_REDIS_URL"]["valueFrom"]
    assert "secretKeyRef" in env["RVIB_AUTH_PASSWORD"]["valueFrom"]
    assert len(secrets) == 1
    config = _config(k8s, container)
    assert "RVIB_REDIS_URL" not in config and "RVIB_AUTH_PASSWORD" not in config
    _check_fleet_timing(config)


def test_kubernetes_memory_limit_leaves_room_above_the_build_budget(
    k8s: K8sObjects,
) -> None:
    container = _builder_container(_builder(k8s))
    limit = _quantity(container["resources"]["limits"]["memory"])
    budget = int(_config(k8s, container)["CPU_MEMORY_LIMIT"])
    assert budget <= limit * 0.85
    assert _quantity(container["resources"]["requests"]["memory"]) == limit


def test_kubernetes_selectors_match_the_pods(k8s: K8sObjects) -> None:
    deployment = _builder(k8s)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (pdb,) = (o for (kind, _), o in k8s.items() if kind == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 0) == 1 or pdb["spec"]["minAvailable"] >= 2
    service = k8s[("Service", "rvib")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_kubernetes_redis_keeps_every_job(k8s: K8sObjects) -> None:
    (statefulset,) = (o for (kind, _), o in k8s.items() if kind == "StatefulSet")
    (redis,) = statefulset["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert _has_flag(args, "--appendonly", "yes")
    assert _has_flag(args, "--appendfsync", "everysec") or _has_flag(
        args, "--appendfsync", "always"
    )
    assert _has_flag(args, "--maxmemory-policy", "noeviction")
    maxmemory = _quantity(args[args.index("--maxmemory") + 1].replace("mb", "M"))
    assert maxmemory < _quantity(redis["resources"]["limits"]["memory"])
    assert statefulset["spec"]["volumeClaimTemplates"]
    # The fleet's Redis URL names this Service.
    assert ("Service", statefulset["spec"]["serviceName"]) in k8s


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_environment_names_are_documented(k8s: K8sObjects, compose: dict[str, Any]) -> None:
    container = _builder_container(_builder(k8s))
    used = {e["name"] for e in container["env"]} | set(_config(k8s, container))
    for service in _replicas(compose).values():
        used |= set(service["environment"])
    used |= {
        line.split("=", 1)[0]
        for line in (DEPLOY / "local-s3.env").read_text().splitlines()
        if line and not line.startswith("#")
    }
    # What the images set, too (Python's own variables aside).
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.api"):
        for line in (ROOT / dockerfile).read_text().splitlines():
            if line.startswith("ENV "):
                used |= {w.split("=", 1)[0] for w in line.split()[1:] if not w.startswith("PYTHON")}
    documented = readme_variables()
    assert {n for n in used if not _documented(n, documented)} == set()


def test_compose_replicas_are_distinct_and_share_redis(compose: dict[str, Any]) -> None:
    replicas = _replicas(compose)
    assert len(replicas) == 3
    ids = [svc["environment"]["RVIB_REPLICA_ID"] for svc in replicas.values()]
    assert len(set(ids)) == len(ids)
    urls = {svc["environment"]["RVIB_REDIS_URL"] for svc in replicas.values()}
    (url,) = urls
    host = re.fullmatch(r"rediss?://(?:[^@/]*@)?([^:/]+)(?::\d+)?(?:/\d+)?", url)
    assert host and host[1] in compose["services"]
    for svc in replicas.values():
        _check_fleet_timing(svc["environment"])
        grace = float(svc["environment"]["RVIB_SHUTDOWN_GRACE_SECONDS"])
        assert _duration_s(svc["stop_grace_period"]) > grace
        assert any("/_ready" in part for part in svc["healthcheck"]["test"])
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (
            int(svc["environment"]["CPU_MEMORY_LIMIT"])
            <= _quantity(svc["mem_limit"].replace("g", "Gi")) * 0.85
        )
        # Only the load balancer is published: clients must not pin one replica.
        assert "ports" not in svc


def test_compose_redis_keeps_every_job(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    assert _has_flag(command, "--appendonly", "yes")
    assert _has_flag(command, "--appendfsync", "everysec")
    assert _has_flag(command, "--maxmemory-policy", "noeviction")
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", compose["services"]["redis"]["image"])


def test_load_balancer_spreads_retries_and_times_out(compose: dict[str, Any]) -> None:
    lines = [
        line.split("#", 1)[0].split() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()
    ]
    words = [w for w in lines if w]
    assert ["balance", "roundrobin"] in words
    assert ["option", "httpchk", "GET", "/_ready"] in words
    assert not [w for w in words if w[0] in {"cookie", "stick", "stick-table", "hash-type"}]
    (retry_on,) = [w[1:] for w in words if w[0] == "retry-on"]
    assert {"conn-failure", "502", "503"} <= set(retry_on)
    (timeout,) = [w[2] for w in words if w[:2] == ["timeout", "server"]]
    assert 5 <= _duration_s(timeout) <= 60
    # Requests that reached a replica are retried only when they are idempotent.
    (no_retry,) = [w[2:] for w in words if w[:2] == ["http-request", "disable-l7-retry"]]
    assert no_retry == [
        "unless",
        "METH_GET",
        "||",
        "{",
        "method",
        "POST",
        "}",
        "{",
        "path",
        "/_build",
        "}",
    ]
    servers = {w[2].split(":")[0] for w in words if w[0] == "server"}
    assert servers == set(_replicas(compose))
    lb = compose["services"]["lb"]
    assert any(v.startswith("./haproxy.cfg:") for v in lb["volumes"])


# --- what the images install, and what they are called --------------------------------


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _closure(requirements: list[Requirement], extras: set[str]) -> dict[str, list[Requirement]]:
    """Every distribution ``requirements`` pull in (as installed here), with what asked for it."""
    wanted: dict[str, list[Requirement]] = {}
    todo = [(r, extras) for r in requirements]
    while todo:
        requirement, active = todo.pop()
        env = {"extra": ""}
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({**env, "extra": e}) for e in active | {""}
        ):
            continue
        name = canonicalize_name(requirement.name)
        first = name not in wanted
        wanted.setdefault(name, []).append(requirement)
        if first:
            nested = [Requirement(r) for r in metadata.requires(requirement.name) or []]
            todo.extend((r, set(requirement.extras)) for r in nested)
    return wanted


def test_the_images_install_pinned_versions_within_pyproject_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    direct = [Requirement(r) for r in project["dependencies"] + extras["cpu"] + extras["fleet"]]
    pins = _pins()
    needed = _closure(direct, set())
    assert sorted(set(needed) - set(pins)) == [], "constraints.txt misses these"
    assert sorted(set(pins) - set(needed)) == [], "constraints.txt pins what nothing needs"
    for name, asked in needed.items():
        for requirement in asked:
            assert requirement.specifier.contains(pins[name], prereleases=True), requirement
        # The suite runs with exactly these (make installs the venv with the constraints).
        assert metadata.version(name) == pins[name], name
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.api"):
        text = (ROOT / dockerfile).read_text()
        assert "constraints.txt" in text.split("RUN pip install", 1)[0]
        assert re.search(r"RUN pip install --no-cache-dir -c constraints\.txt \"\.\[", text)


def test_pyproject_license_is_an_spdx_expression() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    # The string form needs setuptools 77; the table form is deprecated from there on.
    assert any(r.startswith("setuptools>=77") for r in pyproject["build-system"]["requires"])


def test_make_demo_installs_the_demo_extra_only() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(DEMO_STAMP):", 1)[1].split("\n\n", 1)[0]
    (install,) = [line for line in recipe.splitlines() if "pip install" in line and "-e" in line]
    assert install.strip().endswith("-e '.[demo]'")
    assert "demo: $(DEMO_STAMP)" in makefile


def test_images_are_fully_named_with_the_release(k8s: K8sObjects, compose: dict[str, Any]) -> None:
    tag = f"{__version__}-cpu"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    registry = image["newName"].split("/")[0]
    assert "." in registry or ":" in registry, "a registry host, not Docker Hub's library"
    assert image["newName"].endswith(f"/{IMAGE}") and image["newTag"] == tag
    container = _builder_container(_builder(k8s))
    assert container["image"] == f"{IMAGE}:{tag}"  # the name kustomize replaces
    for service in _replicas(compose).values():
        assert service["image"] == f"${{RVIB_IMAGE:-{IMAGE}:{tag}}}"
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {IMAGE}:{tag} -f Dockerfile.cpu ." in readme


def test_kubernetes_gives_faiss_the_threads_it_requested(k8s: K8sObjects) -> None:
    container = _builder_container(_builder(k8s))
    (threads,) = [e for e in container["env"] if e["name"] == "RVIB_OMP_THREADS"]
    field = threads["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "requests.cpu" and field["containerName"] == container["name"]
    assert "cpu" in container["resources"]["requests"]


def test_the_proxy_lets_idle_connections_end_before_the_replicas_do() -> None:
    words = [
        line.split("#", 1)[0].split() for line in (DEPLOY / "haproxy.cfg").read_text().splitlines()
    ]
    timeouts = {w[1]: _duration_s(w[2]) for w in words if w[:1] == ["timeout"]}
    # Its client side outlasts the k-NN client's poll (5 s + 20 % jitter) ...
    assert timeouts["http-keep-alive"] > 6
    # ... and connections to a replica never idle past the replica's keep-alive.
    assert timeouts["server"] < DEFAULT_KEEP_ALIVE_SECONDS
