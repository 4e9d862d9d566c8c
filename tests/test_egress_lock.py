"""The network-level egress lock (deploy/egress-lock.sh), proven in network namespaces.

One namespace stands for the pod, a second for "the internet" with a fake upstream; a veth pair joins
them (IPv4 and IPv6, addresses that exist only inside these namespaces). Before the lock, a process
running as the agent's user id reaches the upstream directly — so the network path works. After the
deploy script has installed the lock in the pod namespace:

* the agent's user id (and root, and any other user) cannot open a connection leaving the pod: TCP is
  reset at once, UDP is refused, on IPv4 and IPv6, and the upstream never sees the attempt;
* Tether, running as its own user id in the same namespace, connects out, and the agent's request made
  *through* Tether (loopback, port 8100) reaches the upstream with Tether's injected credentials;
* the admin listener, bound to the pod address like in deploy/kubernetes, is reachable from outside
  the pod (where kubelet probes and the admin Service come from) but not by the agent inside the pod.

Needs root, ``ip`` (iproute2), ``iptables``/``iptables-restore`` and ``setpriv`` (util-linux), and
the ability to create network namespaces; skipped with the reason otherwise. CI installs
``iptables iproute2``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from proxy.config import parse_rules  # noqa: E402
from proxy.policy.identity import mint_token  # noqa: E402

pytestmark = pytest.mark.slow

LOCK_SCRIPT = ROOT / "deploy" / "egress-lock.sh"
TETHER_UID = 10001  # the UID deploy/Dockerfile and deploy/kubernetes give Tether
AGENT_UID = 20001   # the agent container's UID in deploy/kubernetes
AGENT_PORT = 8100
ADMIN_PORT = 8199
UPSTREAM_PORT = 9000
# Addresses that exist only on the veth pair between the two namespaces this test creates
# (RFC 2544 benchmarking range and the RFC 3849 documentation prefix).
NET4, POD4 = "198.18.0.1", "198.18.0.2"
NET6, POD6 = "2001:db8:7e7e::1", "2001:db8:7e7e::2"
SECRET = "egress-lock-test-secret-0123456789abcdef"
UPSTREAM_TOKEN = "UPSTREAM-CREDENTIAL-ONLY-TETHER-HOLDS"
TAG = f"{os.getpid() % 100000}"
POD_NS, NET_NS = f"tether-pod-{TAG}", f"tether-net-{TAG}"
VETH_POD, VETH_NET = f"tpod{TAG}", f"tnet{TAG}"
TIMEOUT = 20


def _run(*argv: str, check: bool = True, timeout: float = TIMEOUT, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def _clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: no http_proxy and friends that would send a probe somewhere else."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
           "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


@functools.lru_cache(maxsize=1)
def _why_not() -> str | None:
    """Why this machine cannot run the test (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, switching user ids)"
    for tool in ("ip", "iptables", "iptables-restore", "setpriv", "sh"):
        if shutil.which(tool) is None:
            hint = {"ip": "iproute2", "setpriv": "util-linux"}.get(tool, "iptables")
            return f"'{tool}' not found (apt-get install -y {hint})"
    probe = f"tether-probe-{TAG}"
    try:
        res = _run("ip", "netns", "add", probe, check=False)
        if res.returncode != 0:
            return f"cannot create a network namespace: {res.stderr.strip()}"
        res = _run("ip", "netns", "exec", probe, "sh", "-c",
                   "iptables -w -A OUTPUT -m owner --uid-owner 1 -m conntrack --ctstate NEW -j REJECT "
                   "--reject-with tcp-reset -p tcp", check=False)
        if res.returncode != 0:
            return f"iptables owner/conntrack/REJECT matches do not work in a namespace: {res.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


@pytest.fixture(scope="module")
def preflight() -> None:
    reason = _why_not()
    if reason:
        pytest.skip(f"egress-lock namespace test skipped: {reason}")


class Lab:
    """Two namespaces, a fake upstream in one, the agent and Tether in the other."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.setpriv_caps: list[str] = []
        self.ipv6 = Path("/proc/sys/net/ipv6").exists()
        self.baseline: list[dict[str, Any]] = []
        self.rules_after_first_run = ""
        self.rules_after_second_run = ""
        self.tether_log = workdir / "tether.log"
        self.upstream_log = workdir / "upstream.jsonl"
        self.token = ""

    # ------------------------------------------------------------------ plumbing

    def ns(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *argv, check=check)

    def as_uid(self, uid: int) -> list[str]:
        """setpriv prefix: run as ``uid`` with no supplementary groups (and, where the checkout is not
        readable by other users, the right to read files — it changes nothing on the network)."""
        return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *self.setpriv_caps, "--"]

    def spawn(self, ns: str, argv: list[str], out: Path, uid: int | None = None) -> subprocess.Popen[bytes]:
        prefix = self.as_uid(uid) if uid is not None else []
        with open(out, "wb") as f, open(out.with_suffix(".err"), "wb") as err:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *prefix, *argv], stdout=f, stderr=err,
                                 stdin=subprocess.DEVNULL, cwd=self.dir, env=_clean_env(HOME=str(self.dir)))
        self.procs.append(p)
        return p

    def wait_for(self, p: subprocess.Popen[bytes], out: Path, pred: Any, what: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            text = out.read_text() if out.exists() else ""
            for line in text.splitlines():
                if pred(line):
                    return line
            if p.poll() is not None:
                break
            time.sleep(0.05)
        err = out.with_suffix(".err")
        raise AssertionError(f"{what} did not start (exit {p.poll()}):\n{text}\n"
                             f"{err.read_text() if err.exists() else ''}")

    def probe(self, uid: int | None, *ops: dict[str, Any]) -> list[dict[str, Any]]:
        """Run tests' probe script inside the pod namespace as ``uid`` (None: root)."""
        prefix = self.as_uid(uid) if uid is not None else []
        res = _run("ip", "netns", "exec", POD_NS, *prefix, sys.executable, str(self.dir / "probe.py"),
                   json.dumps(list(ops)), cwd=self.dir, env=_clean_env(HOME=str(self.dir)))
        return json.loads(res.stdout)

    def lock(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", POD_NS, "sh", str(LOCK_SCRIPT), *args,
                    env=_clean_env(TETHER_UID=str(TETHER_UID), TETHER_AGENT_PORTS=str(AGENT_PORT), **env))

    def rules(self, family: int = 4) -> str:
        cmd = "iptables" if family == 4 else "ip6tables"
        return self.ns(POD_NS, cmd, "-w", "-S").stdout

    def reject_hits(self, family: int = 4) -> int:
        """Packets the lock's REJECT rules have refused so far."""
        cmd = "iptables" if family == 4 else "ip6tables"
        out = self.ns(POD_NS, cmd, "-w", "-L", "TETHER_EGRESS", "-n", "-v", "-x").stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "REJECT" in line)

    def tether_log_text(self) -> str:
        parts = []
        for name in ("tether.out", "tether.err"):
            p = self.dir / name
            if p.exists():
                parts.append(p.read_text()[-3000:])
        return "\n".join(parts)

    def upstream_requests(self) -> list[dict[str, Any]]:
        if not self.upstream_log.exists():
            return []
        return [json.loads(line) for line in self.upstream_log.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ building

    def build_network(self) -> None:
        _run("ip", "netns", "add", POD_NS)
        _run("ip", "netns", "add", NET_NS)
        _run("ip", "link", "add", VETH_POD, "type", "veth", "peer", "name", VETH_NET)
        _run("ip", "link", "set", VETH_POD, "netns", POD_NS)
        _run("ip", "link", "set", VETH_NET, "netns", NET_NS)
        for ns, dev, a4, a6 in ((POD_NS, VETH_POD, POD4, POD6), (NET_NS, VETH_NET, NET4, NET6)):
            self.ns(ns, "ip", "link", "set", "lo", "up")
            self.ns(ns, "ip", "addr", "add", f"{a4}/24", "dev", dev)
            if self.ipv6:
                self.ns(ns, "ip", "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            self.ns(ns, "ip", "link", "set", dev, "up")

    def write_files(self) -> None:
        (self.dir / "probe.py").write_text(PROBE)
        (self.dir / "upstream.py").write_text(UPSTREAM)
        store = self.dir / "store"
        store.mkdir()
        secrets = self.dir / "secrets"
        secrets.mkdir()
        (secrets / "crm-token").write_text(UPSTREAM_TOKEN + "\n")
        upstreams: dict[str, Any] = {
            "crm": {"url": f"http://{NET4}:{UPSTREAM_PORT}",
                    "credentials": {"type": "bearer", "token": {"file": str(secrets / "crm-token")}}},
        }
        grants = ["contact.read"]
        caps: dict[str, Any] = {"contact.read": {"upstream": "crm", "method": "GET", "path": "/api/contacts/{id}"}}
        if self.ipv6:
            upstreams["crm6"] = {"url": f"http://[{NET6}]:{UPSTREAM_PORT}",
                                 "credentials": {"type": "bearer", "token": {"file": str(secrets / "crm-token")}}}
            grants.append("contact6.read")
            caps["contact6.read"] = {"upstream": "crm6", "method": "GET", "path": "/api/contacts/{id}"}
        doc = {
            "version": 1,
            # as in deploy/kubernetes: agents on loopback, the admin listener on the pod address
            "server": {"listen": f"127.0.0.1:{AGENT_PORT}", "admin_listen": f"{POD4}:{ADMIN_PORT}",
                       "store": str(store / "tether.db"), "log_level": "warning"},
            "identity": {"hs_secret": {"value": SECRET}},
            "upstreams": upstreams,
            "agents": {"bot": {"grants": grants}},
            "capabilities": caps,
        }
        (self.dir / "rules.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        self.token = mint_token(parse_rules(doc).identity, "bot")
        os.chmod(self.dir, 0o755)
        for p in (self.dir / "probe.py", self.dir / "rules.yaml", secrets / "crm-token"):
            os.chmod(p, 0o644)
        os.chmod(secrets, 0o755)
        os.chown(store, TETHER_UID, TETHER_UID)
        os.chmod(store, 0o700)

    def choose_privileges(self) -> None:
        """Other user ids must be able to read Python and the checkout; if they cannot (a checkout under
        /root, say), lend them CAP_DAC_READ_SEARCH — file reading only, nothing the lock looks at."""
        check = [sys.executable, "-c", "import sys, aiohttp, yaml, proxy.cli; "
                 f"sys.exit(0 if proxy.cli.__file__.startswith({str(ROOT / 'proxy')!r}) else 'not this checkout')"]
        for caps in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
            self.setpriv_caps = caps
            res = _run(*self.as_uid(AGENT_UID), *check, check=False, cwd=self.dir, env=_clean_env())
            if res.returncode == 0:
                return
        pytest.skip(f"egress-lock namespace test skipped: uid {AGENT_UID} cannot run {sys.executable} "
                    f"with this checkout: {res.stderr.strip()[-300:]}")

    def start_upstream(self) -> None:
        out = self.dir / "upstream.out"
        p = self.spawn(NET_NS, [sys.executable, str(self.dir / "upstream.py"), str(UPSTREAM_PORT),
                                str(self.upstream_log), "6" if self.ipv6 else "4"], out)
        self.wait_for(p, out, lambda line: line.strip() == "ready", "the fake upstream")

    def start_tether(self) -> None:
        out = self.dir / "tether.out"
        p = self.spawn(POD_NS, [sys.executable, "-m", "proxy", "serve", "--config", str(self.dir / "rules.yaml")],
                       out, uid=TETHER_UID)
        self.wait_for(p, out, lambda line: '"event":"ready"' in line.replace(" ", ""), "Tether")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        for ns in (POD_NS, NET_NS):
            _run("ip", "netns", "del", ns, check=False)
        if Path(f"/sys/class/net/{VETH_POD}").exists():  # set up failed before moving it into the pod
            _run("ip", "link", "del", VETH_POD, check=False)


def _targets() -> list[tuple[str, str]]:
    return [("v4", NET4)] + ([("v6", NET6)] if Path("/proc/sys/net/ipv6").exists() else [])


def _direct_attempts(label: str) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    for fam, host in _targets():
        ops.append({"kind": "tcp", "host": host, "port": UPSTREAM_PORT, "name": f"tcp-{fam}"})
        ops.append({"kind": "http", "url": f"http://{_h(host)}:{UPSTREAM_PORT}/direct/{label}/{fam}",
                    "headers": {}, "name": f"http-{fam}"})
        ops.append({"kind": "udp", "host": host, "port": 53, "name": f"udp-{fam}"})
    return ops


def _h(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _by_name(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in results}


@pytest.fixture(scope="module")
def lab(preflight: None) -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="tether-egress-lock-"))
    lab = Lab(workdir)
    try:
        lab.build_network()
        lab.write_files()
        lab.choose_privileges()
        lab.start_upstream()
        # before the lock: the agent's user id can reach the upstream directly
        lab.baseline = lab.probe(AGENT_UID, *_direct_attempts("baseline"))
        # the deploy script, twice (an init container may run again in the same pod)
        lab.lock()
        lab.rules_after_first_run = lab.rules(4) + (lab.rules(6) if lab.ipv6 else "")
        lab.lock()
        lab.rules_after_second_run = lab.rules(4) + (lab.rules(6) if lab.ipv6 else "")
        # forget the neighbours the baseline resolved: IPv6 neighbour discovery must work under the lock
        lab.ns(POD_NS, "ip", "neigh", "flush", "all")
        if lab.ipv6:
            lab.ns(POD_NS, "ip", "-6", "neigh", "flush", "all")
        lab.start_tether()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the proof


def test_without_the_lock_the_agent_reaches_the_upstream_directly(lab: Lab) -> None:
    got = _by_name(lab.baseline)
    for fam, _ in _targets():
        assert got[f"tcp-{fam}"]["result"] == "connected", got
        assert got[f"http-{fam}"]["status"] == 200, got
        assert got[f"udp-{fam}"]["result"] == "sent", got
    paths = {r["path"] for r in lab.upstream_requests()}
    assert {f"/direct/baseline/{fam}" for fam, _ in _targets()} <= paths


def test_the_lock_script_is_idempotent(lab: Lab) -> None:
    assert lab.rules_after_first_run == lab.rules_after_second_run
    for fam in (4, 6) if lab.ipv6 else (4,):
        rules = lab.rules(fam)
        assert rules.count("-A OUTPUT -j TETHER_EGRESS") == 1, rules
        assert f"--uid-owner {TETHER_UID}" in rules and "REJECT" in rules, rules


def test_agent_uid_cannot_connect_out_and_fails_fast(lab: Lab) -> None:
    before = lab.reject_hits(4) + (lab.reject_hits(6) if lab.ipv6 else 0)
    got = _by_name(lab.probe(AGENT_UID, *_direct_attempts("agent")))
    for fam, _ in _targets():
        tcp = got[f"tcp-{fam}"]
        assert tcp["result"] == "refused", got  # rejected with a TCP reset...
        assert tcp["seconds"] < 1.0, got        # ...at once, not dropped into a timeout
        assert "refused" in got[f"http-{fam}"].get("error", ""), got
        assert got[f"udp-{fam}"]["result"] == "blocked", got
    after = lab.reject_hits(4) + (lab.reject_hits(6) if lab.ipv6 else 0)
    assert after > before, "the lock's REJECT rules did not fire: the refusal came from somewhere else"
    assert not [r for r in lab.upstream_requests() if r["path"].startswith("/direct/agent")]


def test_root_and_other_uids_in_the_pod_cannot_connect_out_either(lab: Lab) -> None:
    for uid in (None, TETHER_UID + 1, 65534):  # None: root
        got = _by_name(lab.probe(uid, *_direct_attempts(f"uid-{uid}")))
        for fam, _ in _targets():
            assert got[f"tcp-{fam}"]["result"] == "refused", (uid, got)
    assert not [r for r in lab.upstream_requests() if r["path"].startswith("/direct/uid-")]


def test_tether_uid_connects_out(lab: Lab) -> None:
    got = _by_name(lab.probe(TETHER_UID, *_direct_attempts("tether-uid")))
    for fam, _ in _targets():
        assert got[f"tcp-{fam}"]["result"] == "connected", got
        assert got[f"http-{fam}"]["status"] == 200, got


def test_agent_succeeds_through_tether(lab: Lab) -> None:
    headers = {"Authorization": f"Bearer {lab.token}"}
    ops = [{"kind": "http", "url": f"http://127.0.0.1:{AGENT_PORT}/crm/api/contacts/42", "headers": headers,
            "name": "v4"}]
    if lab.ipv6:
        ops.append({"kind": "http", "url": f"http://127.0.0.1:{AGENT_PORT}/crm6/api/contacts/43",
                    "headers": headers, "name": "v6"})
    got = _by_name(lab.probe(AGENT_UID, *ops))
    for name, contact in (("v4", "42"), ("v6", "43")) if lab.ipv6 else (("v4", "42"),):
        assert got[name].get("status") == 200, (got, lab.tether_log_text())
        seen = got[name]["body"]
        assert seen["path"] == f"/api/contacts/{contact}"
        # the upstream saw Tether's credential, not the agent's token, and Tether's provenance (its log);
        # echoed back, the credential reached the agent masked
        assert seen["authorization"] == "*" * len(f"Bearer {UPSTREAM_TOKEN}")
        assert seen["agent"] == "bot"
    logged = {r["path"]: r for r in lab.upstream_requests()}
    for contact in ("42", "43") if lab.ipv6 else ("42",):
        assert logged[f"/api/contacts/{contact}"]["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    # and Tether still refuses what the agent is not granted
    denied = lab.probe(AGENT_UID, {"kind": "http", "url": f"http://127.0.0.1:{AGENT_PORT}/crm/api/secrets",
                                   "headers": headers, "name": "denied"})[0]
    assert denied["status"] == 403, denied


def test_admin_listener_is_reachable_from_outside_the_pod_but_not_by_the_agent(lab: Lab) -> None:
    # from outside the pod (where kubelet probes and the admin Service come from): reachable
    res = lab.ns(NET_NS, sys.executable, "-c",
                 "import sys, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); "
                 f"r = o.open('http://{POD4}:{ADMIN_PORT}/_tether/healthz', timeout=5); print(r.status)")
    assert res.stdout.strip() == "200"
    # from the agent inside the pod: refused on the pod address and on loopback
    got = _by_name(lab.probe(
        AGENT_UID,
        {"kind": "tcp", "host": POD4, "port": ADMIN_PORT, "name": "pod-ip"},
        {"kind": "http", "url": f"http://{POD4}:{ADMIN_PORT}/_tether/healthz", "headers": {}, "name": "http"},
        {"kind": "tcp", "host": "127.0.0.1", "port": AGENT_PORT, "name": "agent-port"},
    ))
    assert got["pod-ip"]["result"] == "refused", got
    assert "refused" in got["http"].get("error", ""), got
    assert got["agent-port"]["result"] == "connected", got
    # Tether's own user id reaches its admin listener
    got = _by_name(lab.probe(TETHER_UID, {"kind": "tcp", "host": POD4, "port": ADMIN_PORT, "name": "pod-ip"}))
    assert got["pod-ip"]["result"] == "connected", got


def test_rerun_with_new_settings_replaces_the_rules(lab: Lab) -> None:
    """Runs last: it changes the lock (allowing another port) and then restores it."""
    lab.ns(POD_NS, "iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "--dport", "7", "-j", "ACCEPT")
    try:
        lab.lock("--ports", f"{AGENT_PORT},8101-8103", "--allow-uid", "30001")
        rules = lab.rules(4)
        assert "--dport 8101:8103" in rules and "--uid-owner 30001" in rules, rules
        assert rules.count("-A OUTPUT -j TETHER_EGRESS") == 1, rules
        assert "-A OUTPUT -p tcp -m tcp --dport 7 -j ACCEPT" in rules  # others' rules are left alone
        assert rules.index("-A OUTPUT -j TETHER_EGRESS") < rules.index("--dport 7 -j ACCEPT")
        got = lab.probe(30001, {"kind": "tcp", "host": NET4, "port": UPSTREAM_PORT, "name": "x"})[0]
        assert got["result"] == "connected"
        lab.lock()
        rules = lab.rules(4)
        assert "8101:8103" not in rules and "30001" not in rules, rules
        got = lab.probe(30001, {"kind": "tcp", "host": NET4, "port": UPSTREAM_PORT, "name": "x"})[0]
        assert got["result"] == "refused"
    finally:
        lab.ns(POD_NS, "iptables", "-w", "-D", "OUTPUT", "-p", "tcp", "--dport", "7", "-j", "ACCEPT", check=False)


# --------------------------------------------------------------------------- helper programs

PROBE = r'''
"""Connection attempts, as whichever user runs this; prints one JSON list of results."""
import json, socket, sys, time, urllib.error, urllib.request

def tcp(host, port, **_):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    t = time.monotonic()
    try:
        s.connect((host, port))
        result = "connected"
    except ConnectionRefusedError:
        result = "refused"
    except socket.timeout:
        result = "timeout"
    except OSError as exc:
        result = f"error:{exc.errno}"
    finally:
        s.close()
    return {"result": result, "seconds": time.monotonic() - t}

def udp(host, port, **_):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(b"tether?", (host, port))
        return {"result": "sent"}
    except (PermissionError, ConnectionRefusedError):
        return {"result": "blocked"}
    except OSError as exc:
        return {"result": f"error:{exc.errno}"}
    finally:
        s.close()

def http(url, headers, **_):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return {"status": r.status, "body": json.loads(r.read())}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode(errors="replace")}
    except urllib.error.URLError as exc:
        return {"error": str(exc.reason).lower()}
    except OSError as exc:
        return {"error": str(exc).lower()}

out = []
for op in json.loads(sys.argv[1]):
    kind = op.pop("kind")
    out.append({"name": op.get("name"), **{"tcp": tcp, "udp": udp, "http": http}[kind](**op)})
print(json.dumps(out))
'''

UPSTREAM = r'''
"""The fake upstream "on the internet": answers every GET with what it saw, and logs it."""
import json, socket, socketserver, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, log_path, family = int(sys.argv[1]), sys.argv[2], sys.argv[3]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        seen = {"path": self.path, "client": self.client_address[0],
                "authorization": self.headers.get("Authorization"), "agent": self.headers.get("X-Tether-Agent")}
        with open(log_path, "a") as f:
            f.write(json.dumps(seen) + "\n")
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6 if family == "6" else socket.AF_INET
    daemon_threads = True

    def server_bind(self):  # dual stack, and no reverse DNS lookup of the bind address
        if family == "6":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "upstream", port

srv = Server(("::" if family == "6" else "0.0.0.0", port), Handler)
print("ready", flush=True)
srv.serve_forever()
'''
