"""TLS, passwords and the per-node ACL, end to end: our transport against a Mosquitto that
runs the production ACL (deploy/broker/acl) with certificates from deploy/pki/make-certs.sh."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from estdp.broker import free_port, mosquitto_binary
from estdp.errors import TransportError
from estdp.topics import Topics
from estdp.transport import TransportConfig, mqtt_transport
from estdp.transport.mqtt import MqttTransport

REPO = Path(__file__).resolve().parents[2]
MAKE_CERTS = REPO / "deploy" / "pki" / "make-certs.sh"
ACL = REPO / "deploy" / "broker" / "acl"

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        mosquitto_binary() is None
        or shutil.which("mosquitto_passwd") is None
        or shutil.which("openssl") is None
        or not MAKE_CERTS.exists()
        or not ACL.exists(),
        reason="needs mosquitto, mosquitto_passwd, openssl and deploy/",
    ),
]
TOPICS = Topics("tls")


@dataclass
class SecureBroker:
    pki: Path
    mtls_port: int
    password_port: int

    def cert(self, identity: str) -> tuple[str, str]:
        return str(self.pki / "clients" / f"{identity}.crt"), str(
            self.pki / "clients" / f"{identity}.key"
        )

    def connect(self, cid: str, *, port: int, protocol: str = "5", **kw: object) -> MqttTransport:
        cfg = TransportConfig(
            host="127.0.0.1",
            port=port,
            client_id=cid,
            tls=True,
            ca_file=str(self.pki / "ca.crt"),
            protocol=protocol,
            reconnect_min_s=0.05,
            reconnect_max_s=0.2,
            **kw,  # type: ignore[arg-type]
        )
        t = mqtt_transport(cfg)
        t.connect(timeout=3)
        return t  # type: ignore[return-value]


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    tmp = tmp_path_factory.mktemp("tls")
    pki = tmp / "pki"
    subprocess.run(
        [
            "bash",
            str(MAKE_CERTS),
            "-d",
            str(pki),
            "--server",
            "127.0.0.1",
            "n1",
            "n2",
            "aggregator",
        ],
        check=True,
        capture_output=True,
    )
    passwd = tmp / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwd), "n1", "secret-n1"],
        check=True,
        capture_output=True,
    )
    passwd.chmod(0o600)
    mtls, pw = free_port(), free_port()
    tls = f"cafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\nkeyfile {pki / 'server.key'}\n"
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\nper_listener_settings true\npersistence false\n"
        f"listener {mtls} 127.0.0.1\n{tls}require_certificate true\nuse_identity_as_username true\n"
        f"allow_anonymous false\nacl_file {ACL}\n"
        f"listener {pw} 127.0.0.1\n{tls}require_certificate false\nallow_anonymous false\n"
        f"password_file {passwd}\nacl_file {ACL}\n"
    )
    log = open(tmp / "broker.log", "wb")  # noqa: SIM115 - open for the broker's lifetime
    proc = subprocess.Popen(
        [str(mosquitto_binary()), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
    )
    time.sleep(0.3)
    if proc.poll() is not None:
        pytest.fail(f"mosquitto did not start: {(tmp / 'broker.log').read_text()}")
    yield SecureBroker(pki, mtls, pw)
    proc.terminate()
    proc.wait(5)
    log.close()


def test_a_node_with_its_certificate_publishes_under_its_own_id_only(
    secure_broker: SecureBroker,
) -> None:
    cert, key = secure_broker.cert("aggregator")
    agg = secure_broker.connect(
        "aggregator", port=secure_broker.mtls_port, cert_file=cert, key_file=key
    )
    cert, key = secure_broker.cert("n1")
    n1 = secure_broker.connect("n1", port=secure_broker.mtls_port, cert_file=cert, key_file=key)
    try:
        agg.subscribe(f"{TOPICS.root}/nodes/#")
        time.sleep(0.2)
        n1.publish(TOPICS.update("n1"), b"mine", wait=True)
        with pytest.raises(TransportError, match="refused"):
            n1.publish(TOPICS.update("n2"), b"spoofed", wait=True, timeout=3)
        with pytest.raises(TransportError, match="refused"):
            n1.publish(TOPICS.global_model, b"fake global", wait=True, timeout=3)
        got = agg.get(3)
        assert got is not None and (got.topic, got.payload) == (TOPICS.update("n1"), b"mine")
        assert agg.get(0.5) is None  # the spoofed update never reached the aggregator
    finally:
        n1.close()
        agg.close()


def test_without_a_client_certificate_the_node_is_refused(secure_broker: SecureBroker) -> None:
    with pytest.raises(TransportError):
        secure_broker.connect("n1", port=secure_broker.mtls_port)


def test_a_certificate_from_another_ca_is_refused(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    subprocess.run(
        ["bash", str(MAKE_CERTS), "-d", str(tmp_path / "rogue"), "n1"],
        check=True,
        capture_output=True,
    )
    rogue = tmp_path / "rogue" / "clients"
    with pytest.raises(TransportError):
        secure_broker.connect(
            "n1",
            port=secure_broker.mtls_port,
            cert_file=str(rogue / "n1.crt"),
            key_file=str(rogue / "n1.key"),
        )


def test_passwords_on_the_password_listener(secure_broker: SecureBroker) -> None:
    with pytest.raises(TransportError, match="refused"):
        secure_broker.connect(
            "n1", port=secure_broker.password_port, username="n1", password="wrong"
        )
    with pytest.raises(TransportError, match="refused"):
        secure_broker.connect(
            "n1", port=secure_broker.password_port, protocol="3.1.1"
        )  # no password
    ok = secure_broker.connect(
        "n1", port=secure_broker.password_port, username="n1", password="secret-n1"
    )
    ok.publish(TOPICS.status("n1"), b"online", wait=True)
    ok.close()
