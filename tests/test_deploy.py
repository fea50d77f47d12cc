"""deploy/: every Kubernetes manifest loads and is structurally sound, the pieces refer to each other
correctly (selectors, Services → container ports, volumes, ServiceAccounts, the Gateway), each
container's ports are the listeners its args open, its flags are ones ``hbone-proxy run`` accepts, and
the example configuration in the ConfigMaps passes ``hbone-proxy config check``.

No cluster here: ``kubectl kustomize`` (offline) renders the kustomization when kubectl is installed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from functools import cache

import pytest
import yaml

from proxy import settings as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")
CLI = os.path.join(ROOT, ".venv", "bin", "hbone-proxy")
TIMEOUT_S = 60  # a Python start + YAML load, or kubectl kustomize; generous for a loaded 2-core box

CONFIGMAP_NAME = "hbone-proxy-config"
# The UID/GID the Dockerfile's USER sets; the manifests must run as the same.
IMAGE_UID = 10001
WORKLOAD_KINDS = ("Deployment", "DaemonSet")
# Flags whose value is HOST:PORT, and the port each listens on when the flag is not given.
ADDR_FLAG_DEFAULTS = {
    f"--{f.name.replace('_', '-')}": f.default
    for f in dataclasses.fields(S.ProxySettings) if f.name.endswith("_addr")
}


def cli() -> list[str]:
    return [CLI] if os.path.exists(CLI) else [sys.executable, "-m", "proxy.cli"]


@cache
def run_flags() -> frozenset[str]:
    """The long options of ``hbone-proxy run``: from its --help once ``proxy/run.py`` exists, else the
    DESIGN §4 list as ``proxy.settings.ProxySettings`` spells it (field ``ca_dir`` → ``--ca-dir``)."""
    done = subprocess.run(cli() + ["run", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode == 0:
        flags = frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", done.stdout))
        assert "--config" in flags, done.stdout
        return flags
    assert "not built yet" in done.stderr, done.stderr
    names = {f.name for f in dataclasses.fields(S.ProxySettings)} - {"config_paths"}
    return frozenset({"--config"} | {"--" + n.replace("_", "-") for n in names})


def parse_args(args: list[str]) -> dict[str, list[str]]:
    """``["run", "--a=1", "--b", "2", "--a=3"]`` → ``{"--a": ["1", "3"], "--b": ["2"]}`` (after ``run``)."""
    assert args and args[0] == "run", args
    out: dict[str, list[str]] = {}
    rest = list(args[1:])
    while rest:
        tok = rest.pop(0)
        assert tok.startswith("--"), f"positional argument {tok!r} in {args}"
        name, eq, value = tok.partition("=")
        if not eq:
            assert rest and not rest[0].startswith("--"), f"{name} has no value"
            value = rest.pop(0)
        out.setdefault(name, []).append(value)
    return out


def listen_ports(flags: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """Every listener the args open, flag → (host, port), defaults filled in from ProxySettings."""
    out = {}
    for flag, default in ADDR_FLAG_DEFAULTS.items():
        if flag in flags:
            host, _, port = flags[flag][-1].rpartition(":")
            out[flag] = (host.strip("[]"), int(port))
        elif default is not None:
            out[flag] = default
    return out


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


@cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(relative path, document) for every YAML document under deploy/."""
    docs = []
    for dirpath, _, files in sorted(os.walk(DEPLOY)):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    for doc in yaml.safe_load_all(f):
                        if doc is not None:
                            docs.append((os.path.relpath(path, DEPLOY), doc))
    return tuple(docs)


@cache
def kustomization() -> dict:
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        return yaml.safe_load(f)


def resources() -> list[dict]:
    """The cluster resources the kustomization applies (its `resources:`), as written."""
    listed = set(kustomization()["resources"])
    return [doc for path, doc in documents() if path in listed]


def of_kind(kind: str) -> list[dict]:
    return [d for d in resources() if d["kind"] == kind]


def key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def workloads() -> list[dict]:
    return [d for d in resources() if d["kind"] in WORKLOAD_KINDS]


def container(workload: dict) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def resolve_port(c: dict, port) -> int:
    """A probe's or Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert port in by_name, f"port name {port!r} is not one of {sorted(by_name)}"
    return by_name[port]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- every document ----------------------------------------------------------------------------------


def test_every_document_is_a_named_kubernetes_object():
    assert len(documents()) >= 10
    for path, doc in documents():
        assert isinstance(doc, dict), path
        if path.startswith("config/") and "apiVersion" not in doc:
            assert set(doc) <= {"workloads", "services", "policies"}, path  # a ztunnel-shape inventory
            continue
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] == "Kustomization":
            continue
        name = doc.get("metadata", {}).get("name")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (path, name)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace"), f"{path}: {doc['kind']} {name} has no namespace"


def test_kustomization_lists_every_manifest_and_its_files_exist():
    k = kustomization()
    for rel in k["resources"]:
        assert os.path.isfile(os.path.join(DEPLOY, rel)), rel
    manifests = {p for p, _ in documents() if not p.startswith("config/") and p != "kustomization.yaml"}
    assert manifests <= set(k["resources"]), f"not applied: {sorted(manifests - set(k['resources']))}"
    keys = [key(d) for d in resources()]
    assert len(keys) == len(set(keys)), "duplicate resources"
    for gen in k["configMapGenerator"]:
        assert gen["name"] == CONFIGMAP_NAME
        # No hash suffix: the proxies reload changed files in place, a rename would force a rollout.
        assert gen["options"]["disableNameSuffixHash"] is True
        for rel in gen["files"]:
            assert os.path.isfile(os.path.join(DEPLOY, rel)), rel


# --- workloads ---------------------------------------------------------------------------------------


def test_the_waypoint_and_the_node_proxy_are_there():
    (deploy,) = of_kind("Deployment")
    (ds,) = of_kind("DaemonSet")
    assert deploy["spec"]["replicas"] == 2  # the seed: a waypoint with 2 replicas
    assert parse_args(container(deploy)["args"])["--mode"] == ["waypoint"]
    node_args = parse_args(container(ds)["args"])
    assert node_args["--mode"] == ["node"]
    assert node_args["--node"] == ["$(NODE_NAME)"]
    env = {e["name"]: e for e in container(ds)["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert ds["spec"]["template"]["spec"].get("hostNetwork", False) is False


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_selector_matches_template_labels(kind):
    for w in of_kind(kind):
        sel = w["spec"]["selector"]["matchLabels"]
        assert selects(sel, w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_runs_locked_down(kind):
    for w in of_kind(kind):
        pod = w["spec"]["template"]["spec"]
        psc, c = pod["securityContext"], container(w)
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] == psc["runAsGroup"] == IMAGE_UID
        assert pod.get("automountServiceAccountToken") is False
        csc = c["securityContext"]
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["allowPrivilegeEscalation"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}  # nothing added back: no NET_ADMIN, no capture
        assert not pod.get("hostNetwork") and not csc.get("privileged")
        for part in ("requests", "limits"):
            assert set(c["resources"][part]) == {"cpu", "memory"}, (kind, part)
        sa = pod["serviceAccountName"]
        assert ("ServiceAccount", w["metadata"]["namespace"], sa) in {key(d) for d in resources()}


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_flags_are_ones_run_accepts(kind):
    for w in of_kind(kind):
        unknown = set(parse_args(container(w)["args"])) - run_flags()
        assert not unknown, f"{kind}: hbone-proxy run does not accept {sorted(unknown)}"


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_args_are_parsed_by_run_itself(kind):
    """Once proxy/run.py exists: its own parser turns each container's args into settings."""
    run = pytest.importorskip("proxy.run", reason="proxy/run.py not there yet")
    for w in of_kind(kind):
        env = {e["name"]: "worker-1" for e in container(w).get("env", [])}  # the kubelet expands $(VAR)
        argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container(w)["args"][1:]]
        s = run.parse_settings(argv, {})
        assert s.mode == parse_args(container(w)["args"])["--mode"][0]
        assert s.readiness_addr == ("0.0.0.0", S.READINESS_PORT)
        if s.mode == "node":
            assert s.node == "worker-1"


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_container_ports_are_the_listeners_the_args_open(kind):
    for w in of_kind(kind):
        c = container(w)
        listeners = listen_ports(parse_args(c["args"]))
        exposed = {p for h, p in listeners.values() if not is_loopback(h)}
        declared = {p["containerPort"] for p in c["ports"]}
        assert declared == exposed, f"{kind}: containerPorts {sorted(declared)} vs listeners {sorted(exposed)}"
        assert listeners["--admin-addr"][0] == "127.0.0.1"  # admin is never reachable from outside
        assert listeners["--hbone-addr"][1] == S.HBONE_PORT
        assert listeners["--readiness-addr"][1] == S.READINESS_PORT
        assert listeners["--metrics-addr"][1] == S.METRICS_PORT
        names = [p["name"] for p in c["ports"]]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_probes_ask_the_readiness_listener(kind):
    for w in of_kind(kind):
        c = container(w)
        ready = c["readinessProbe"]["httpGet"]
        assert ready["path"] == "/healthz/ready"
        assert resolve_port(c, ready["port"]) == S.READINESS_PORT
        # Liveness must not use /healthz/ready: it answers 503 while draining, and a restart then
        # would cut the tunnels the drain is finishing.
        assert "httpGet" not in c["livenessProbe"]
        assert resolve_port(c, c["livenessProbe"]["tcpSocket"]["port"]) == S.READINESS_PORT
        grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > S.DRAIN_DEADLINE_S


@pytest.mark.parametrize("kind", WORKLOAD_KINDS)
def test_files_in_args_are_mounted(kind):
    for w in of_kind(kind):
        pod, c = w["spec"]["template"]["spec"], container(w)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] != "/tmp")

        def volume_of(path: str) -> dict:
            owners = [v for mp, v in mounts.items() if path == mp or path.startswith(mp.rstrip("/") + "/")]
            assert owners, f"{kind}: {path} is not under any volumeMount"
            return owners[0]

        args = parse_args(c["args"])
        for path in args["--config"]:
            assert volume_of(path)["configMap"]["name"] == CONFIGMAP_NAME
        for flag in ("--cert", "--key", "--ca", "--ca-dir"):
            for path in args.get(flag, []):
                assert "secretName" in volume_of(path)["secret"], (kind, flag)
        assert args.keys() & {"--cert", "--ca-dir"}, f"{kind} has no certificate source"
        # The ConfigMap must exist in the workload's namespace (a generator per namespace).
        gens = {g.get("namespace") for g in kustomization()["configMapGenerator"]}
        assert w["metadata"]["namespace"] in gens


def test_both_proxies_run_the_same_image():
    images = {container(w)["image"] for w in workloads()}
    assert len(images) == 1, images


# --- Services, PDB, Gateway --------------------------------------------------------------------------


def test_services_select_a_workload_and_target_its_ports():
    for svc in of_kind("Service"):
        ns = svc["metadata"]["namespace"]
        backends = [w for w in workloads() if w["metadata"]["namespace"] == ns
                    and selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(backends) == 1, svc["metadata"]["name"]
        c = container(backends[0])
        for port in svc["spec"]["ports"]:
            resolve_port(c, port["targetPort"])


def test_waypoint_service_ports():
    (deploy,) = of_kind("Deployment")
    (svc,) = [s for s in of_kind("Service") if s["metadata"]["namespace"] == deploy["metadata"]["namespace"]]
    c = container(deploy)
    ports = {p["port"]: resolve_port(c, p["targetPort"]) for p in svc["spec"]["ports"]}
    assert ports == {S.HBONE_PORT: S.HBONE_PORT, S.METRICS_PORT: S.METRICS_PORT,
                     S.READINESS_PORT: S.READINESS_PORT}


def test_node_service_stays_on_the_node():
    (ds,) = of_kind("DaemonSet")
    (svc,) = [s for s in of_kind("Service") if s["metadata"]["namespace"] == ds["metadata"]["namespace"]]
    # Pods must reach the node proxy of their own node: it only serves (and knows the identity of)
    # the workloads whose `node` is its node.
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert {resolve_port(container(ds), p["targetPort"]) for p in svc["spec"]["ports"]} >= {S.SOCKS5_PORT}


def test_pdb_keeps_a_waypoint_replica():
    (pdb,) = of_kind("PodDisruptionBudget")
    (deploy,) = of_kind("Deployment")
    assert pdb["metadata"]["namespace"] == deploy["metadata"]["namespace"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], deploy["spec"]["template"]["metadata"]["labels"])
    assert 1 <= pdb["spec"]["minAvailable"] < deploy["spec"]["replicas"]


def test_gateway_is_an_istio_waypoint_served_by_the_deployment():
    (gw,) = of_kind("Gateway")
    assert gw["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    assert gw["metadata"]["labels"]["istio.io/waypoint-for"] == "service"
    assert gw["spec"]["listeners"] == [{"name": "mesh", "port": S.HBONE_PORT, "protocol": "HBONE"}]
    ns, name = gw["metadata"]["namespace"], gw["metadata"]["name"]
    (deploy,) = of_kind("Deployment")
    assert parse_args(container(deploy)["args"])["--gateway"] == [f"{ns}/{name}"]
    # Istio's waypoint pods carry the gateway-name label; the Service of the same name fronts them.
    assert deploy["spec"]["template"]["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == name
    assert ("Service", ns, name) in {key(d) for d in resources()}
    # The Gateway the proxy reads is the one applied to the cluster (one file, two roles).
    gens = kustomization()["configMapGenerator"]
    assert all("config/gateway.yaml" in g["files"] for g in gens)
    # The example inventory binds the reviews Service to this waypoint by hostname.
    with open(os.path.join(DEPLOY, "config", "mesh.yaml")) as f:
        inventory = yaml.safe_load(f)
    (reviews,) = [s for s in inventory["services"] if s["name"] == "reviews"]
    assert reviews["waypoint"] == {"destination": f"{ns}/{name}.{ns}.svc.cluster.local",
                                   "hboneMtlsPort": S.HBONE_PORT}


# --- the configuration in the ConfigMaps -------------------------------------------------------------


def config_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli() + ["config", "check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def extract_configmap(data: dict[str, str], into) -> str:
    for name, text in data.items():
        assert "/" not in name and name.endswith(".yaml"), name
        (into / name).write_text(text)
    return str(into)


def generated_configmap() -> dict[str, str]:
    """The data kustomize's configMapGenerator puts in the ConfigMap: file name → file text."""
    (files,) = {tuple(g["files"]) for g in kustomization()["configMapGenerator"]}
    out = {}
    for rel in files:
        with open(os.path.join(DEPLOY, rel)) as f:
            out[os.path.basename(rel)] = f.read()
    return out


def test_configmap_config_is_valid_for_the_waypoint_and_the_node(tmp_path):
    confdir = extract_configmap(generated_configmap(), tmp_path)
    done = config_check(confdir)
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout and "warning" not in (done.stdout + done.stderr).lower()

    # What the waypoint keeps with the Deployment's own flags: the reviews Service only.
    (deploy,) = of_kind("Deployment")
    args = parse_args(container(deploy)["args"])
    done = config_check(confdir, "--scope", args["--scope"][0], "--gateway", args["--gateway"][0])
    assert done.returncode == 0, done.stderr
    assert "service default/reviews.default.svc.cluster.local" in done.stdout
    assert "service default/ratings" not in done.stdout

    # Every node named in the inventory has workloads for its node proxy.
    inventory = yaml.safe_load(generated_configmap()["mesh.yaml"])
    for node in sorted({w["node"] for w in inventory["workloads"]}):
        done = config_check(confdir, "--node", node)
        assert done.returncode == 0, done.stderr
        assert re.search(rf"node {node} serves [1-9]\d* workloads", done.stdout), done.stdout


def test_a_broken_configmap_fails_the_check(tmp_path):
    data = generated_configmap()
    data["routing.yaml"] = data["routing.yaml"].replace("weight: 10", "weight: -10", 1)
    done = config_check(extract_configmap(data, tmp_path))
    assert done.returncode == 2
    assert "routing.yaml" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (renders the kustomization)")
def test_kustomize_renders_and_its_configmaps_pass_config_check(tmp_path):
    done = subprocess.run(["kubectl", "kustomize", DEPLOY], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    assert {key(d) for d in rendered} >= {key(d) for d in resources()}
    cms = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert {cm["metadata"]["namespace"] for cm in cms} == {w["metadata"]["namespace"] for w in workloads()}
    for cm in cms:
        assert cm["metadata"]["name"] == CONFIGMAP_NAME
        assert cm["data"] == generated_configmap()
        out = tmp_path / cm["metadata"]["namespace"]
        out.mkdir()
        check = config_check(extract_configmap(cm["data"], out))
        assert check.returncode == 0, check.stderr
    for d in rendered:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "hbone-proxy"
