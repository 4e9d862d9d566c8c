"""deploy/: the image, the Kubernetes manifests and the egress-lock script, checked without a cluster.

* Every manifest validates, strictly (unknown fields are errors), against the Kubernetes JSON schemas
  bundled by ``kubernetes-validate`` for 1.29 (the first release with native sidecars on by default)
  and 1.33 (native sidecars GA) — and the same Deployment is *refused* by the 1.27 schema, which shows
  the validation really looks at ``restartPolicy`` on an init container.
* Each kustomization renders (with ``kustomize`` or ``kubectl kustomize`` when present; the base
  kustomizations also without them) and every rendered object validates too.
* The sidecar Deployment keeps its promises: the lock runs first, Tether is a native sidecar with
  probes on its admin port, upstream secrets are mounted into Tether's container only, the agent runs
  as another UID without capabilities, the lock's ports cover every agent listener in the rules and
  exclude the admin listener, and the rules each ConfigMap carries are a valid Tether rules file whose
  secret files exist in the mounted Secret.
* The Dockerfile runs Tether as the UID the lock exempts and ships the lock script the init container
  runs; the script passes shellcheck (where installed) and refuses bad settings.

The namespace test that proves the lock on a real network stack is tests/test_egress_lock.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.cli.main import effective_rules  # noqa: E402
from proxy.config import RulesFile, parse_hostport, parse_rules  # noqa: E402

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
LOCK_SCRIPT = DEPLOY / "egress-lock.sh"
LOCK_IN_IMAGE = "/usr/local/bin/tether-egress-lock"
KUSTOMIZATIONS = ["base", "overlays/example", "shared", "shared/agents"]
SIDECAR_KUSTOMIZATIONS = ["base", "overlays/example"]
SCHEMA_VERSIONS = ["1.29.0", "1.33.0"]


def _kubernetes_validate() -> Any:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed: it belongs in the test extras")
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    return kubernetes_validate


def _schema_error(doc: dict[str, Any], version: str) -> str | None:
    """Why ``doc`` does not validate strictly against Kubernetes ``version``'s schema (None: it does)."""
    kv = _kubernetes_validate()
    try:
        kv.validate(doc, version, strict=True)
    except kv.utils.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"
    return None


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(rel: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / rel / "kustomization.yaml").read_text())


def _referenced_files(rel: str) -> list[Path]:
    k = _kustomization(rel)
    refs = [r for r in k.get("resources", [])] + [p["path"] for p in k.get("patches", []) if "path" in p]
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        refs += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    return [(K8S / rel / r).resolve() for r in refs]


def _resource_files(rel: str) -> list[Path]:
    """Manifest files a kustomization lists as resources (directories followed)."""
    out: list[Path] = []
    for r in _kustomization(rel).get("resources", []):
        p = (K8S / rel / r).resolve()
        if p.is_dir():
            out += _resource_files(str(p.relative_to(K8S)))
        else:
            out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def _render(rel: str) -> tuple[dict[str, Any], ...]:
    """The kustomization's output: by kustomize or kubectl when installed; otherwise, for a plain
    kustomization (resources, namespace, labels), by a tiny equivalent; otherwise skipped."""
    for argv in (["kustomize", "build"], ["kubectl", "kustomize"]):
        if shutil.which(argv[0]):
            res = subprocess.run([*argv, str(K8S / rel)], capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"{' '.join(argv)} {rel} failed:\n{res.stderr}"
            return tuple(d for d in yaml.safe_load_all(res.stdout) if d)
    k = _kustomization(rel)
    unsupported = set(k) - {"apiVersion", "kind", "resources", "namespace", "labels"}
    if unsupported:
        pytest.skip(f"neither kustomize nor kubectl is installed to render {rel} ({', '.join(sorted(unsupported))})")
    docs: list[dict[str, Any]] = []
    for r in k.get("resources", []):
        p = K8S / rel / r
        docs += list(_render(str(p.resolve().relative_to(K8S)))) if p.is_dir() else _load_all(p)
    for d in docs:
        if "namespace" in k:
            d["metadata"]["namespace"] = k["namespace"]
        for lab in k.get("labels", []):
            d["metadata"].setdefault("labels", {}).update(lab["pairs"])
    return tuple(docs)


def _objects(rel: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in _render(rel) if d["kind"] == kind]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _port_ranges(spec: str) -> list[tuple[int, int]]:
    out = []
    for p in spec.replace(",", " ").split():
        lo, _, hi = p.partition("-")
        out.append((int(lo), int(hi or lo)))
    return out


def _in_ranges(port: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def _rules_of(rel: str, configmap_name: str) -> RulesFile:
    (cm,) = [c for c in _objects(rel, "ConfigMap") if c["metadata"]["name"] == configmap_name]
    return parse_rules(yaml.safe_load(cm["data"]["rules.yaml"]), f"{rel}: ConfigMap {configmap_name}")


def _secret_keys(rel: str, name: str) -> set[str]:
    (s,) = [s for s in _objects(rel, "Secret") if s["metadata"]["name"] == name]
    return set(s.get("stringData", {})) | set(s.get("data", {}))


def _file_refs(node: Any) -> list[str]:
    """Every ``{file: ...}`` secret reference in a rules document."""
    if isinstance(node, dict):
        out = [node["file"]] if set(node) == {"file"} and isinstance(node["file"], str) else []
        return out + [f for v in node.values() for f in _file_refs(v)]
    if isinstance(node, list):
        return [f for v in node for f in _file_refs(v)]
    return []


# --------------------------------------------------------------------------- kustomizations & schemas


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_kustomization_references_exist(rel: str) -> None:
    for path in _referenced_files(rel):
        assert path.exists(), f"{rel}/kustomization.yaml names {path}, which does not exist"
        assert path.is_relative_to(K8S), f"{rel}/kustomization.yaml reaches outside deploy/kubernetes: {path}"


def test_every_manifest_file_is_in_a_kustomization() -> None:
    listed = {p for rel in KUSTOMIZATIONS for p in _referenced_files(rel)}
    listed |= {(K8S / rel / "kustomization.yaml").resolve() for rel in KUSTOMIZATIONS}
    on_disk = {p.resolve() for p in K8S.rglob("*.yaml")}
    assert on_disk - listed == set(), "manifest files no kustomization uses"


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_manifest_files_validate_against_the_kubernetes_schema(rel: str, version: str) -> None:
    problems = [f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {err}"
                for path in _resource_files(rel) for doc in _load_all(path)
                if (err := _schema_error(doc, version))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_rendered_manifests_validate_against_the_kubernetes_schema(rel: str, version: str) -> None:
    docs = _render(rel)
    assert docs
    problems = [f"{rel}: {doc['kind']} {doc['metadata']['name']}: {err}"
                for doc in docs if (err := _schema_error(doc, version))]
    assert not problems, "\n".join(problems)


def test_schema_validation_is_real_a_pre_sidecar_schema_refuses_the_deployment() -> None:
    (dep,) = [d for d in _load_all(K8S / "base" / "deployment.yaml") if d["kind"] == "Deployment"]
    assert _schema_error(dep, "1.29.0") is None
    assert "'restartPolicy' was unexpected" in (_schema_error(dep, "1.27.0") or "")


def test_overlay_renames_retargets_and_narrows() -> None:
    (dep,) = _objects("overlays/example", "Deployment")
    assert dep["metadata"]["namespace"] == "sales-agents"
    spec = dep["spec"]["template"]["spec"]
    names = {v["name"]: v for v in spec["volumes"]}
    assert names["rules"]["configMap"]["name"] == "renewal-bot-tether-rules"
    assert names["upstream-secrets"]["secret"]["secretName"] == "renewal-bot-tether-upstreams"
    images = {c["name"]: c["image"] for c in spec["initContainers"] + spec["containers"]}
    assert images["tether"] == images["egress-lock"] == "registry.example.com/platform/tether:0.1.0"
    assert images["agent"] == "registry.example.com/sales/renewal-bot:2.3.1"
    (np,) = _objects("overlays/example", "NetworkPolicy")
    cidrs = [t["ipBlock"]["cidr"] for rule in np["spec"]["egress"] for t in rule["to"] if "ipBlock" in t]
    assert "0.0.0.0/0" not in cidrs and cidrs


# --------------------------------------------------------------------------- the sidecar pod


def _sidecar_pod(rel: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    (dep,) = _objects(rel, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    inits = {c["name"]: c for c in spec["initContainers"]}
    return spec, inits["egress-lock"], inits["tether"], spec["containers"]


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_the_lock_runs_first_then_tether_as_a_native_sidecar(rel: str) -> None:
    spec, lock, tether, _ = _sidecar_pod(rel)
    order = [c["name"] for c in spec["initContainers"]]
    assert order.index("egress-lock") < order.index("tether")
    assert "restartPolicy" not in lock  # an ordinary init container: it must finish before anything starts
    assert tether["restartPolicy"] == "Always"
    assert lock["command"] == [LOCK_IN_IMAGE] and lock["image"] == tether["image"]
    sc = lock["securityContext"]
    assert sc["runAsUser"] == 0 and set(sc["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_tether_and_the_agent_run_as_different_unprivileged_uids(rel: str) -> None:
    spec, lock, tether, containers = _sidecar_pod(rel)
    tether_uid = tether["securityContext"]["runAsUser"]
    assert int(_env(lock)["TETHER_UID"]) == tether_uid != 0
    assert tether["securityContext"]["readOnlyRootFilesystem"] is True
    assert tether["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for c in containers:
        sc = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser") not in (None, 0, tether_uid), c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
    assert spec["automountServiceAccountToken"] is False
    assert not spec.get("shareProcessNamespace") and not spec.get("hostNetwork")


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_upstream_secrets_are_mounted_into_tether_only(rel: str) -> None:
    spec, _, tether, containers = _sidecar_pod(rel)
    secret_volumes = {v["name"] for v in spec["volumes"] if "secret" in v}
    tether_mounts = {m["name"] for m in tether["volumeMounts"]}
    assert "upstream-secrets" in tether_mounts & secret_volumes
    for c in containers + [i for i in spec["initContainers"] if i is not tether]:
        shared = {m["name"] for m in c.get("volumeMounts", [])} & tether_mounts
        assert not shared, f"{c['name']} mounts Tether's volumes {shared}"
        assert not [e for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})], c["name"]


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_probes_hit_the_admin_listener_on_the_pod_ip(rel: str) -> None:
    _, _, tether, _ = _sidecar_pod(rel)
    env = _env(tether)
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    host, admin_port = parse_hostport(env["TETHER_ADMIN_LISTEN"].replace("$(POD_IP)", "10.1.2.3"))
    assert host == "10.1.2.3"
    ports = {p["name"]: p["containerPort"] for p in tether["ports"]}
    assert ports["admin"] == admin_port
    assert tether["startupProbe"]["httpGet"] == {"path": "/_tether/readyz", "port": "admin"}
    assert tether["readinessProbe"]["httpGet"] == {"path": "/_tether/readyz", "port": "admin"}
    assert tether["livenessProbe"]["httpGet"] == {"path": "/_tether/healthz", "port": "admin"}


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_rules_match_the_pod(rel: str) -> None:
    """The ConfigMap's rules load as Tether would load them in this pod (env overrides applied), the
    lock lets the agent reach every agent listener and not the admin one, the store is on the journal
    volume, and every secret file the rules name is a key of the Secret mounted there."""
    spec, lock, tether, _ = _sidecar_pod(rel)
    mounts = {m["mountPath"]: m for m in tether["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    rules_vol = volumes[mounts["/etc/tether"]["name"]]
    assert "subPath" not in mounts["/etc/tether"]  # a subPath mount never sees ConfigMap updates
    doc = None
    for cm in _objects(rel, "ConfigMap"):
        if cm["metadata"]["name"] == rules_vol["configMap"]["name"]:
            doc = yaml.safe_load(cm["data"]["rules.yaml"])
    assert doc is not None
    assert tether["args"][-2:] == ["--config", "/etc/tether/rules.yaml"]
    rules_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tether-deploy-test-{os.getpid()}.yaml"
    rules_path.write_text(yaml.safe_dump(doc))
    try:
        env = {k: str(v).replace("$(POD_IP)", "10.1.2.3") for k, v in _env(tether).items() if isinstance(v, str)}
        rules = effective_rules(type("Args", (), {"config": str(rules_path)})(), env)
    finally:
        rules_path.unlink()
    allowed = _port_ranges(_env(lock)["TETHER_AGENT_PORTS"])
    listens = [rules.server.listen] + [u.listen for u in rules.upstreams.values() if u.listen]
    for hp in listens:
        host, port = parse_hostport(hp)
        assert host in ("127.0.0.1", "::1"), f"agent listener {hp} should be on loopback in a sidecar"
        assert _in_ranges(port, allowed), f"the lock does not let the agent reach {hp}"
    admin_host, admin_port = parse_hostport(rules.server.admin_listen)
    assert admin_host == "10.1.2.3" and not _in_ranges(admin_port, allowed)
    store_dir = str(Path(rules.server.store).parent)
    assert store_dir in mounts and "persistentVolumeClaim" in volumes[mounts[store_dir]["name"]]
    for ref in _file_refs(doc):
        directory, key = str(Path(ref).parent), Path(ref).name
        assert directory in mounts, f"the rules read {ref}, but nothing is mounted at {directory}"
        secret = volumes[mounts[directory]["name"]]["secret"]["secretName"]
        assert key in _secret_keys(rel, secret), f"the rules read {ref}, but Secret {secret} has no {key!r}"


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_network_policy_covers_the_pod_with_dns_and_https_egress_only(rel: str) -> None:
    (dep,) = _objects(rel, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (np,) = _objects(rel, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Egress" in np["spec"]["policyTypes"]
    ports = {(p["protocol"], p["port"]) for rule in np["spec"]["egress"] for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


# --------------------------------------------------------------------------- the shared gateway


def test_shared_gateway_uses_postgresql_and_listens_for_other_pods() -> None:
    (dep,) = _objects("shared", "Deployment")
    assert dep["spec"]["replicas"] >= 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ref = _env(c)["TETHER_STORE"]["secretKeyRef"]
    (secret,) = [s for s in _objects("shared", "Secret") if s["metadata"]["name"] == ref["name"]]
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    rules = _rules_of("shared", "tether-gateway-rules")
    assert parse_hostport(rules.server.listen) == ("0.0.0.0", 8100)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"agents": 8100, "admin": parse_hostport(rules.server.admin_listen)[1]}
    services = {s["metadata"]["name"]: s for s in _objects("shared", "Service")}
    assert [p["targetPort"] for p in services["tether-gateway"]["spec"]["ports"]] == ["agents"]
    assert [p["targetPort"] for p in services["tether-gateway-admin"]["spec"]["ports"]] == ["admin"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/_tether/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/_tether/healthz"
    assert c["securityContext"]["runAsUser"] == 10001 and c["securityContext"]["readOnlyRootFilesystem"]


def test_agents_of_the_shared_gateway_may_reach_only_tether_and_dns() -> None:
    (np,) = _objects("shared/agents", "NetworkPolicy")
    assert np["spec"]["policyTypes"] == ["Egress"]
    peers = [(t.get("podSelector", {}).get("matchLabels"), {(p["protocol"], p["port"]) for p in rule["ports"]})
             for rule in np["spec"]["egress"] for t in rule["to"]]
    assert peers == [({"k8s-app": "kube-dns"}, {("UDP", 53), ("TCP", 53)}),
                     ({"app.kubernetes.io/name": "tether-gateway"}, {("TCP", 8100)})]


# --------------------------------------------------------------------------- the image


def test_dockerfile_runs_tether_as_the_uid_the_lock_exempts() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    _, lock, tether, _ = _sidecar_pod("base")
    uid = tether["securityContext"]["runAsUser"]
    assert re.search(rf"^USER {uid}:{uid}$", text, re.M)
    assert f"--uid {uid}" in text and re.search(r"^ENTRYPOINT \[\"tether\"\]$", text, re.M)
    assert re.search(rf"^COPY --chmod=0755 deploy/egress-lock.sh {re.escape(LOCK_IN_IMAGE)}$", text, re.M)
    assert "HEALTHCHECK" in text and "/_tether/healthz" in text
    assert 'pip install ".[postgres,metrics]"' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", text, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"the Dockerfile copies {s}, which does not exist"
            assert f"!{s}" in ignore or f"!{s}/**" in ignore, f"{s} is excluded by Dockerfile.dockerignore"


# --------------------------------------------------------------------------- the lock script


def test_lock_script_passes_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    res = subprocess.run(["shellcheck", "-s", "sh", str(LOCK_SCRIPT)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_lock_script_is_executable_posix_sh() -> None:
    assert os.access(LOCK_SCRIPT, os.X_OK)
    assert LOCK_SCRIPT.read_text().startswith("#!/bin/sh\n")


def _dry_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(LOCK_SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})


def test_lock_script_dry_run_prints_the_rules() -> None:
    res = _dry_run("--ports", "8100,8101-8103", TETHER_UID="10001", TETHER_EGRESS_ALLOW_UIDS="10002")
    assert res.returncode == 0, res.stderr
    v4, v6 = res.stdout.split("# ip6tables-restore --noflush")
    for text, icmp in ((v4, "icmp-port-unreachable"), (v6, "icmp6-port-unreachable")):
        lines = [line for line in text.splitlines() if line.startswith("-A TETHER_EGRESS")]
        assert lines[0] == "-A TETHER_EGRESS -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
        assert "-A TETHER_EGRESS -m owner --uid-owner 10001 -j RETURN" in lines
        assert "-A TETHER_EGRESS -m owner --uid-owner 10002 -j RETURN" in lines
        assert "-A TETHER_EGRESS -o lo -p tcp -m tcp --dport 8100 -j RETURN" in lines
        assert "-A TETHER_EGRESS -o lo -p tcp -m tcp --dport 8101:8103 -j RETURN" in lines
        # reject, never drop, and reject last
        assert lines[-2:] == ["-A TETHER_EGRESS -p tcp -j REJECT --reject-with tcp-reset",
                              f"-A TETHER_EGRESS -j REJECT --reject-with {icmp}"]
        assert "DROP" not in text and "8199" not in text
    assert "neighbour-solicitation" in v6 and "neighbour-solicitation" not in v4


@pytest.mark.parametrize("env,args", [
    ({}, []),
    ({"TETHER_UID": "0"}, []),
    ({"TETHER_UID": "tether"}, []),
    ({"TETHER_UID": "10001"}, ["--ports", "0"]),
    ({"TETHER_UID": "10001"}, ["--ports", "9-3"]),
    ({"TETHER_UID": "10001"}, ["--ports", "70000"]),
    ({"TETHER_UID": "10001", "TETHER_EGRESS_ALLOW_UIDS": "0"}, []),
    ({"TETHER_UID": "10001", "TETHER_EGRESS_IPV6": "maybe"}, []),
    ({"TETHER_UID": "10001"}, ["--bogus"]),
])
def test_lock_script_refuses_bad_settings(env: dict[str, str], args: list[str]) -> None:
    res = _dry_run(*args, **env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "tether-egress-lock: error:" in res.stderr


@pytest.mark.parametrize("rel", SIDECAR_KUSTOMIZATIONS)
def test_the_agent_is_identified_by_its_projected_service_account_token(rel: str) -> None:
    """The agent container gets a kubelet-projected token for audience "tether" (no API credential),
    the rules map exactly this pod's service account to an agent, and Tether mounts the cluster keys
    its kubernetes issuer reads."""
    spec, _, tether, containers = _sidecar_pod(rel)
    (agent,) = [c for c in containers if c["name"] == "agent"]
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    token_file = _env(agent)["TETHER_TOKEN_FILE"]
    (mount,) = [m for m in agent["volumeMounts"] if token_file.startswith(m["mountPath"] + "/")]
    (source,) = volumes[mount["name"]]["projected"]["sources"]
    projected = source["serviceAccountToken"]
    assert projected["path"] == Path(token_file).name and projected["expirationSeconds"] <= 3600
    assert not any(m["name"] == mount["name"] for m in tether["volumeMounts"])  # the agent's own, not Tether's
    rules = _rules_of(rel, next(c["metadata"]["name"] for c in _objects(rel, "ConfigMap")
                                if "rules.yaml" in c.get("data", {})))
    (k8s,) = [i for i in rules.identity.issuers if i.kind == "kubernetes"]
    assert projected["audience"] in k8s.audiences
    (dep,) = _objects(rel, "Deployment")
    namespace = dep["metadata"].get("namespace", "default")
    (sa,) = _objects(rel, "ServiceAccount")
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert f"system:serviceaccount:{namespace}:{sa['metadata']['name']}" in k8s.agents
    assert set(k8s.agents.values()) <= set(rules.agents)
    assert k8s.jwks_file is not None
    (jwks_mount,) = [m for m in tether["volumeMounts"] if m["mountPath"] == str(k8s.jwks_file.parent)]
    cm_name = volumes[jwks_mount["name"]]["configMap"]["name"]
    (cm,) = [c for c in _objects(rel, "ConfigMap") if c["metadata"]["name"] == cm_name]
    assert k8s.jwks_file.name in cm["data"]
