"""Fixtures for the deploy/ tests: a generated PKI, Mosquitto brokers started from the
deploy configurations on free loopback ports, and small paho-mqtt probes.

The configurations are tested as shipped: only ports, file paths and the bridge address
are rewritten (``render_config``), and a path the test does not know fails the test, so a
new directive in a shipped file cannot slip through untested.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
MAKE_CERTS = DEPLOY / "pki" / "make-certs.sh"
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)

FLEET = "lab"
NODES = ("node-1", "node-2")
# Identities issued by the fleet CA in the session PKI.
# "site-a" is the upstream identity of site a's aggregator (a node of the root fleet).
IDENTITIES = ("aggregator", "operator", "bridge-site-a", "site-a", *NODES, "node-revoked")
PASSWORDS = {"node-pw": "correct horse battery staple", "aggregator": "aggregator-secret"}

# Directives that name a file or directory; render_config maps each of their values.
PATH_DIRECTIVES = {
    "cafile",
    "certfile",
    "keyfile",
    "crlfile",
    "password_file",
    "acl_file",
    "persistence_location",
    "include_dir",
    "bridge_cafile",
    "bridge_certfile",
    "bridge_keyfile",
}


def render_config(
    text: str,
    *,
    ports: Mapping[int, int] | None = None,
    paths: Mapping[str, str] | None = None,
    addresses: Mapping[str, str] | None = None,
    main: bool = True,
) -> str:
    """Rewrite a shipped Mosquitto configuration for a test run.

    ``listener PORT [BIND]`` gets ``ports[PORT]`` on 127.0.0.1; each path directive gets
    ``paths[value]``; a bridge ``address`` gets ``addresses[value]``. A value missing from
    its mapping raises KeyError, so that the test is updated with the configuration. A
    ``main`` configuration (not a conf.d snippet) also gets the current user.
    """
    ports, paths, addresses = ports or {}, paths or {}, addresses or {}
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            out.append(line)
            continue
        key = words[0]
        if key == "listener":
            out.append(f"listener {ports[int(words[1])]} 127.0.0.1")
        elif key in PATH_DIRECTIVES:
            out.append(f"{key} {paths[words[1]]}")
        elif key == "address":
            out.append(f"address {addresses[words[1]]}")
        else:
            out.append(line)
    if main:
        # Started as root, mosquitto would switch to the "mosquitto" user, which cannot
        # read the test's private temporary files.
        out.append(f"user {pwd.getpwuid(os.getuid()).pw_name}")
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mosquitto did not listen on {port} within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def render_mosquitto_config() -> Callable[..., str]:
    return render_config


@dataclass
class Broker:
    """One mosquitto process started from a rendered configuration."""

    conf: Path
    ports: dict[int, int]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        for port in self.ports.values():
            _wait_for_port(port, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM lets mosquitto write its persistence database before it exits.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def port(self, shipped: int) -> int:
        return self.ports[shipped]


@dataclass
class Pki:
    """The certificates of one test fleet (generated by deploy/pki/make-certs.sh)."""

    dir: Path
    rogue_dir: Path
    passwd: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def cert(self, identity: str) -> tuple[Path, Path]:
        return self.dir / "clients" / f"{identity}.crt", self.dir / "clients" / f"{identity}.key"

    def revoked_cert(self) -> tuple[Path, Path]:
        base = self.dir.parent / "revoked"
        return base / "node-revoked.crt", base / "node-revoked.key"

    def rogue_cert(self, identity: str) -> tuple[Path, Path]:
        base = self.rogue_dir / "clients"
        return base / f"{identity}.crt", base / f"{identity}.key"


def run_make_certs(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MAKE_CERTS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    base = tmp_path_factory.mktemp("pki")
    good, rogue = base / "fleet", base / "rogue"
    revoked = base / "revoked"
    for args in (
        ("--dir", good, "--server", "localhost", "--server", "127.0.0.1", *IDENTITIES),
        ("--dir", good, "--revoke", "node-revoked"),
        # Another CA that issues a certificate for the same node id.
        ("--dir", rogue, "--server", "localhost", "--ca-name", "rogue CA", "node-1"),
    ):
        if "--revoke" in args:
            # Keep a copy of the pair: revoking deletes the key from the PKI directory.
            revoked.mkdir()
            for suffix in (".crt", ".key"):
                shutil.copy(good / "clients" / f"node-revoked{suffix}", revoked)
        result = run_make_certs(*args)
        assert result.returncode == 0, result.stderr
    passwd = base / "passwd"
    if shutil.which("mosquitto_passwd"):
        for i, (user, password) in enumerate(PASSWORDS.items()):
            create = ["-c"] if i == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwd), user, password],
                check=True,
                timeout=30,
            )
    else:
        passwd.touch()
    return Pki(good, rogue, passwd)


@pytest.fixture
def production_broker(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """A factory: start deploy/broker/mosquitto.conf, with conf.d snippets if given."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    started: list[Broker] = []

    def start(
        name: str = "central",
        *,
        snippets: Mapping[str, str] = {},  # noqa: B006 - read-only
        data_dir: Path | None = None,
    ) -> Broker:
        home = tmp_path / name
        confd = home / "conf.d"
        confd.mkdir(parents=True, exist_ok=True)
        for fname, text in snippets.items():
            (confd / fname).write_text(text)
        data = data_dir or home / "data"
        data.mkdir(parents=True, exist_ok=True)
        ports = {8883: free_port(), 8884: free_port()}
        shipped = (DEPLOY / "broker" / "mosquitto.conf").read_text()
        conf = home / "mosquitto.conf"
        conf.write_text(
            render_config(
                shipped,
                ports=ports,
                paths={
                    "/etc/mosquitto/estdp/ca.crt": str(pki.ca),
                    "/etc/mosquitto/estdp/server.crt": str(pki.dir / "server.crt"),
                    "/etc/mosquitto/estdp/server.key": str(pki.dir / "server.key"),
                    "/etc/mosquitto/estdp/crl.pem": str(pki.dir / "crl.pem"),
                    "/etc/mosquitto/estdp/acl": str(DEPLOY / "broker" / "acl"),
                    "/etc/mosquitto/estdp/passwd": str(pki.passwd),
                    "/var/lib/mosquitto/": f"{data}/",
                    "/etc/mosquitto/conf.d": str(confd),
                },
            )
        )
        broker = Broker(conf=conf, ports=ports, log=home / "mosquitto.log")
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def dev_broker(tmp_path: Path) -> Iterator[Broker]:
    """deploy/broker/mosquitto-dev.conf as shipped, on a free loopback port."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "dev" / "mosquitto-dev.conf"
    conf.parent.mkdir(parents=True)
    shipped = (DEPLOY / "broker" / "mosquitto-dev.conf").read_text()
    conf.write_text(render_config(shipped, ports={1883: port}))
    broker = Broker(conf=conf, ports={1883: port}, log=tmp_path / "dev" / "mosquitto.log")
    yield broker.start()
    broker.stop()


@dataclass
class Fleet:
    """`estdp` processes of one test: started with their output in a log each, killed at
    the end of the test if still running."""

    dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: object) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "estdp.cli", "--log-level", "INFO", *map(str, args)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        """The tail of every log under the test's directory (brokers' too), for failures."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
            for p in sorted(self.dir.rglob("*.log"))
        )

    def events(self, name: str) -> list[dict]:
        """The JSON event lines a process printed (``--json``)."""
        lines = (self.dir / f"{name}.log").read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish within {timeout:.0f} s\n{self.logs()}")

    def installed_round(self, state: Path) -> int:
        try:
            return json.loads((state / "node.json").read_text()).get("installed_round", 0)
        except (OSError, ValueError):
            return 0

    def wait_installed(self, states: list[Path], round_id: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.installed_round(s) == round_id for s in states):
            if time.monotonic() > deadline:
                pytest.fail(f"the nodes did not install round {round_id}\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def estdp_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A factory of `estdp` processes for this test (see :class:`Fleet`)."""
    pytest.importorskip("aggregator.daemon", reason="the aggregator daemon is not in this tree")
    pytest.importorskip("edge_node.daemon", reason="the node daemon is not in this tree")
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.stop()


@dataclass
class Probe:
    """A paho-mqtt client that records what the broker does with it."""

    client: object
    connected: bool = False
    reason: str = ""
    messages: queue.Queue = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> str:
        """Publish and wait for the PUBACK; its reason (MQTT 5) or "Success"."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        # A QoS 1 publish completes on PUBACK, which the broker sends even when the ACL
        # drops the message: waiting here orders this publish before the next one.
        info.wait_for_publish(timeout=10)
        return self.acks.get(info.mid, "Success")

    def subscribe(self, topic: str, qos: int = 1) -> list:
        granted: queue.Queue = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, props: granted.put(codes)
        self.client.subscribe(topic, qos=qos)
        return granted.get(timeout=5)

    def expect(self, topic: str, timeout: float = 5.0) -> bytes:
        """The payload of the next message on ``topic`` (others are kept for ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message on {topic} within {timeout} s")
            try:
                msg = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(msg)
            if msg.topic == topic:
                return msg.payload

    def drain(self) -> list[str]:
        """Topics of every message received so far."""
        while True:
            try:
                self.seen.append(self.messages.get_nowait())
            except queue.Empty:
                return [m.topic for m in self.seen]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __post_init__(self) -> None:
        self.seen: list = []
        self.acks: dict[int, str] = {}


@pytest.fixture
def mqtt_connect() -> Iterator[Callable[..., Probe]]:
    """A factory: connect a paho client over TLS and report whether the broker accepted it."""
    mqtt = pytest.importorskip("paho.mqtt.client")
    probes: list[Probe] = []

    def connect(
        port: int,
        *,
        ca: Path,
        cert: tuple[Path, Path] | None = None,
        username: str | None = None,
        password: str | None = None,
        client_id: str = "",
        tls: bool = True,
        timeout: float = 5.0,
        mqtt5: bool = False,
    ) -> Probe:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{len(probes)}-{os.getpid()}",
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
        )
        probe = Probe(client)
        done = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties):
            probe.connected = not reason_code.is_failure
            probe.reason = str(reason_code)
            done.set()

        def on_disconnect(c, userdata, flags, reason_code, properties):
            probe.reason = probe.reason or f"disconnected: {reason_code}"
            probe.disconnected.set()
            done.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = lambda c, u, msg: probe.messages.put(msg)

        def on_publish(c, userdata, mid, reason_code, properties):
            probe.acks[mid] = str(reason_code)

        client.on_publish = on_publish
        if tls:
            ctx = ssl.create_default_context(cafile=str(ca))
            if cert is not None:
                ctx.load_cert_chain(str(cert[0]), str(cert[1]))
            client.tls_set_context(ctx)
        if username is not None:
            client.username_pw_set(username, password)
        probes.append(probe)
        try:
            client.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            probe.reason = f"{type(exc).__name__}: {exc}"
            return probe
        client.loop_start()
        if not done.wait(timeout):
            probe.reason = "no CONNACK"
        if not probe.connected:
            client.loop_stop()
        return probe

    yield connect
    for probe in probes:
        # Best effort: a test may have left the client half-closed.
        with contextlib.suppress(Exception):
            probe.close()
