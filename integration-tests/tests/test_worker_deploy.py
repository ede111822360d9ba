"""deploy/: every file parses, and every flag it passes to pilot-worker exists.

Docker, Compose, systemd and Kubernetes are not run here; the files are
parsed and their command lines are fed to the real argument parser (with the
plugins they name loaded), plus the properties each file promises (non-root,
restart policy, probes on the health endpoints, grace periods above the drain
timeout).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pilot_worker import load_plugin
from pilot_worker.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parse_worker_args(argv: list[str]) -> Any:
    """Parse argv as pilot-worker would, loading the plugins it names."""
    plugins = [load_plugin(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--plugin"]
    parser = build_parser(plugins=plugins)
    known = {flag for action in parser._actions for flag in action.option_strings}
    for arg in argv:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in known, f"unknown pilot-worker flag {arg}"
    args = parser.parse_args(argv)
    assert args.identity
    assert args.trust
    return args


def _systemd_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_unit() -> None:
    unit = _systemd_sections((DEPLOY / "systemd" / "pilot-worker.service").read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = {k: v[-1] for k, v in unit["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/pilot-worker")
    args = _parse_worker_args(argv[1:])
    assert service["User"] not in ("root", "0")
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > args.drain_timeout
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hardening in service
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert args.metrics_host == "127.0.0.1"
    # One descriptor per connection: room above pilot-rpc's 4096-connection cap.
    assert int(service["LimitNOFILE"]) > 4096


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    final_stage = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    final = instructions[final_stage:]
    by_word: dict[str, list[str]] = {}
    for word, rest in final:
        by_word.setdefault(word, []).append(rest)
    user = by_word["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    entrypoint = json.loads(by_word["ENTRYPOINT"][-1])
    cmd = json.loads(by_word["CMD"][-1])
    assert entrypoint == ["pilot-worker"]
    args = _parse_worker_args(cmd)
    # The healthcheck probes the metrics port the CMD enables, on loopback.
    health = by_word["HEALTHCHECK"][-1]
    assert f"127.0.0.1:{args.metrics_port}/healthz" in health
    assert args.metrics_host == "127.0.0.1"
    health_cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    compile(health_cmd[2], "<healthcheck>", "exec")
    assert by_word["STOPSIGNAL"] == ["SIGTERM"]
    # The wheels it installs are workspace packages that exist.
    for dist in re.findall(r"--package (\S+)", (DEPLOY / "Dockerfile").read_text()):
        assert (DEPLOY.parent / "packages" / dist / "pyproject.toml").is_file(), dist
    # pilot-worker comes with the extra the pool's --idempotency-store needs.
    (install,) = [r for r in by_word["RUN"] if r.startswith("pip install")]
    (worker_wheel,) = [w for w in shlex.split(install) if "pilot_worker-" in w]
    assert worker_wheel.endswith("[journal-postgres]"), worker_wheel
    extras = tomllib.loads(
        (DEPLOY.parent / "packages" / "pilot-worker" / "pyproject.toml").read_text()
    )["project"]["optional-dependencies"]
    assert any(dep.startswith("psycopg") for dep in extras["journal-postgres"])


def test_docker_compose() -> None:
    doc = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"worker-a", "worker-b", "state-worker"} <= set(services)
    for name, service in services.items():
        args = _parse_worker_args([str(a) for a in service["command"]])
        assert service["stop_signal"] == "SIGTERM"
        grace = int(str(service["stop_grace_period"]).rstrip("s"))
        assert grace > args.drain_timeout, name
        assert any(str(v).endswith(":/etc/pilot:ro") for v in service["volumes"]), name
    state = services["state-worker"]
    state_args = _parse_worker_args([str(a) for a in state["command"]])
    assert state_args.plugin == ["checkpoint-sqlite"]
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in state["volumes"]}
    assert "state-data" in mounts
    db = state_args.plugin__checkpoint_sqlite__checkpoint_db
    assert db.startswith(f"sqlite:///{mounts['state-data']}/")
    assert "state-data" in doc["volumes"]


def _k8s_documents() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc.get('metadata', {}).get('name', path.stem)}"] = doc
    return docs


def test_kubernetes_manifests() -> None:
    docs = _k8s_documents()
    deployment = docs["Deployment/pilot-worker"]
    secret = docs["Secret/pilot-worker-identity"]
    config = docs["ConfigMap/pilot-worker-trust"]
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    listed = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == listed

    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (worker,) = pod["containers"]
    args = _parse_worker_args([str(a) for a in worker["args"]])
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout

    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports["metrics"] == args.metrics_port
    assert args.metrics_host == "0.0.0.0"  # the kubelet probes the pod IP
    live = worker["livenessProbe"]["httpGet"]
    ready = worker["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz"
    assert ready["path"] == "/readyz"
    assert live["port"] == ready["port"] == "metrics"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    # The identity comes from the Secret (via the init container's 0600 copy).
    assert volumes["identity-secret"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "identity.key" in secret["stringData"]
    assert args.identity == f"{mounts['identity']}/identity.key"
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    compile(script, "<init>", "exec")
    assert "0o600" in script
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert f"{init_mounts['identity-secret']}/identity.key" in script
    assert f"{init_mounts['identity']}/identity.key" in script
    # The trust store comes from the ConfigMap.
    assert volumes["trust"]["configMap"]["name"] == config["metadata"]["name"]
    assert args.trust == f"{mounts['trust']}/trust.json"
    trust = json.loads(config["data"]["trust.json"])
    assert trust == {"version": 1, "peers": []}

    service = docs["Service/pilot-worker"]
    assert service["spec"]["ports"][0]["targetPort"] == "pilot"
    assert args.transport.endswith(f":{ports['pilot']}")
    # The ops port is not published by the Service, and only the monitoring
    # namespace (besides the node's kubelet) may reach it.
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["pilot"]
    policy = docs["NetworkPolicy/pilot-worker"]["spec"]
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    rules = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert set(rules) == {ports["pilot"], ports["metrics"]}
    assert "from" not in rules[ports["pilot"]]
    assert rules[ports["metrics"]]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


@pytest.mark.parametrize("path", sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")))
def test_kubernetes_files_are_valid_yaml(path: str) -> None:
    for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / path).read_text()):
        assert "apiVersion" in doc
        assert "kind" in doc


# ----------------------------------------------------------------- the pool


def _store_tier_db(args: Any) -> str:
    db = args.plugin__checkpoint_sqlite__checkpoint_db
    assert db.startswith("postgresql+psycopg://"), db
    # The password never appears on a command line: libpq reads PGPASSWORD.
    assert ":" not in db.split("://", 1)[1].split("@", 1)[0], db
    return db


def _journal_in_store_db(args: Any, store_db: str) -> None:
    """The handler workers' journal lives in the store tier's database, no password."""
    assert args.idempotency_store, "the pool's workers share an idempotency journal"
    journal, store = urlsplit(args.idempotency_store), urlsplit(store_db)
    assert journal.scheme in ("postgresql", "postgresql+psycopg"), journal  # psycopg 3
    assert journal.password is None, "libpq reads PGPASSWORD"
    assert (journal.username, journal.hostname, journal.port, journal.path) == (
        store.username,
        store.hostname,
        store.port,
        store.path,
    )


def test_pool_compose() -> None:
    doc = yaml.safe_load((DEPLOY / "compose" / "pool.yml").read_text())
    services = doc["services"]
    workers = {"worker-1", "worker-2", "worker-3"}
    stores = {"store-a", "store-b"}
    assert set(services) == workers | stores | {"postgres"}
    published: list[str] = []
    identities: set[str] = set()
    for name in workers | stores:
        service = services[name]
        args = _parse_worker_args([str(a) for a in service["command"]])
        assert service["stop_signal"] == "SIGTERM"
        grace = int(str(service["stop_grace_period"]).rstrip("s"))
        assert grace > args.drain_timeout, name
        (config,) = [str(v) for v in service["volumes"] if str(v).endswith(":/etc/pilot:ro")]
        identities.add(config.split(":")[0])
        assert args.identity.startswith("/etc/pilot/")
        published.extend(str(p).split(":")[0] for p in service["ports"])
        if name in workers:
            assert args.plugin is None, name
            assert args.handlers == ["my_handlers"], name
    assert len(identities) == len(workers | stores), "every worker has its own identity"
    assert len(set(published)) == len(published), "host ports collide"
    urls: set[str] = set()
    postgres = services["postgres"]
    for name in stores:
        service = services[name]
        args = _parse_worker_args([str(a) for a in service["command"]])
        assert args.plugin == ["checkpoint-sqlite"]
        urls.add(_store_tier_db(args))
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["env_file"] == postgres["env_file"]
    (url,) = urls  # one database behind the whole tier
    assert "@postgres:5432/" in url
    for name in workers:
        service = services[name]
        _journal_in_store_db(_parse_worker_args([str(a) for a in service["command"]]), url)
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["env_file"] == postgres["env_file"]
    assert postgres["environment"]["POSTGRES_USER"] == url.split("://")[1].split("@")[0]
    assert url.rsplit("/", 1)[1] == postgres["environment"]["POSTGRES_DB"]
    assert "ports" not in postgres, "PostgreSQL stays on the compose network"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert "postgres-data" in doc["volumes"]


def _k8s_pool_documents() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes" / "pool").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kubernetes_pool_manifests() -> None:
    pool = DEPLOY / "kubernetes" / "pool"
    kustomization = yaml.safe_load((pool / "kustomization.yaml").read_text())
    listed = {p.name for p in pool.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == listed
    docs = _k8s_pool_documents()
    for doc in docs.values():
        assert "apiVersion" in doc

    # Three handler workers.
    workers = docs["Deployment/pilot-pool-worker"]
    assert workers["spec"]["replicas"] == 3
    pod = workers["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (worker,) = pod["containers"]
    args = _parse_worker_args([str(a) for a in worker["args"]])
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert f"Secret/{volumes['identity-secret']['secret']['secretName']}" in docs
    assert f"ConfigMap/{volumes['trust']['configMap']['name']}" in docs
    assert (
        docs["Service/pilot-pool-worker"]["spec"]["selector"]
        == (workers["spec"]["selector"]["matchLabels"])
    )

    # Two store workers with stable names, one database.
    store_set = docs["StatefulSet/pilot-store"]
    assert store_set["spec"]["replicas"] == 2
    headless = docs[f"Service/{store_set['spec']['serviceName']}"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == store_set["spec"]["selector"]["matchLabels"]
    pod = store_set["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (store,) = pod["containers"]
    args = _parse_worker_args([str(a) for a in store["args"]])
    assert args.plugin == ["checkpoint-sqlite"]
    assert pod["terminationGracePeriodSeconds"] > args.drain_timeout
    url = _store_tier_db(args)
    postgres_service = docs["Service/pilot-postgres"]
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    assert host_port == f"{postgres_service['metadata']['name']}:5432"
    assert postgres_service["spec"]["ports"][0]["port"] == 5432
    password = _env(store)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert f"Secret/{password['name']}" in docs
    assert password["key"] in docs[f"Secret/{password['name']}"]["stringData"]
    ports = {p["name"]: p["containerPort"] for p in store["ports"]}
    assert args.transport.endswith(f":{ports['pilot']}")
    assert store["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ports["metrics"] == args.metrics_port
    # Each store worker installs its own key: store-N.key for pod pilot-store-N.
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    compile(script, "<init>", "exec")
    assert "0o600" in script
    assert _env(init)["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    secret_name = {v["name"]: v for v in pod["volumes"]}["identity-secret"]["secret"]["secretName"]
    keys = set(docs[f"Secret/{secret_name}"]["stringData"])
    assert keys == {f"store-{i}.key" for i in range(store_set["spec"]["replicas"])}
    mounts = {m["name"]: m["mountPath"] for m in store["volumeMounts"]}
    assert args.identity == f"{mounts['identity']}/identity.key"

    # PostgreSQL: one instance, its password from the same Secret.
    postgres_set = docs["StatefulSet/pilot-postgres"]
    (pg,) = postgres_set["spec"]["template"]["spec"]["containers"]
    pg_env = _env(pg)
    assert pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == password
    assert pg_env["POSTGRES_USER"]["value"] == url.split("://", 1)[1].split("@", 1)[0]
    assert pg_env["POSTGRES_DB"]["value"] == url.rsplit("/", 1)[1]
    assert postgres_service["spec"].get("type", "ClusterIP") == "ClusterIP"

    # The handler workers' idempotency journal: the same database and password.
    _journal_in_store_db(_parse_worker_args([str(a) for a in worker["args"]]), url)
    assert _env(worker)["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == password
