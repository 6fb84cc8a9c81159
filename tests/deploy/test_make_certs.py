"""deploy/pki/make-certs.sh: the CA, server and client certificates it issues, its
idempotence, its checks on names, and revocation."""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "pki" / "make-certs.sh"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def make_certs(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def openssl(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    result = make_certs(
        "--dir", pki, "--server", "broker.test", "--server", "10.1.2.3", "node-01", "aggregator"
    )
    assert result.returncode == 0, result.stderr
    return pki


def test_issues_ca_server_and_clients_that_verify(fleet):
    certs = [fleet / "server.crt", fleet / "clients/node-01.crt", fleet / "clients/aggregator.crt"]
    result = openssl("verify", "-CAfile", fleet / "ca.crt", *certs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": OK") == 3


def test_server_certificate_names_the_broker(fleet):
    out = openssl(
        "x509",
        "-in",
        fleet / "server.crt",
        "-noout",
        "-subject",
        "-ext",
        "subjectAltName,extendedKeyUsage",
    ).stdout
    assert "CN = broker.test" in out
    assert "DNS:broker.test" in out and "IP Address:10.1.2.3" in out
    assert "TLS Web Server Authentication" in out


def test_client_certificate_cn_is_the_node_id(fleet):
    out = openssl(
        "x509",
        "-in",
        fleet / "clients/node-01.crt",
        "-noout",
        "-subject",
        "-ext",
        "extendedKeyUsage",
    ).stdout
    assert "CN = node-01" in out
    assert "TLS Web Client Authentication" in out
    assert "Server Authentication" not in out


def test_private_keys_are_not_readable_by_others(fleet):
    for key in [fleet / "private/ca.key", fleet / "server.key", fleet / "clients/node-01.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_second_run_changes_nothing_and_adds_new_nodes(fleet, tmp_path):
    copy = tmp_path / "pki"
    shutil.copytree(fleet, copy)
    before = digest_tree(copy)
    args = ["--dir", copy, "--server", "broker.test", "--server", "10.1.2.3"]
    again = make_certs(*args, "node-01", "aggregator")
    assert again.returncode == 0, again.stderr
    assert digest_tree(copy) == before
    more = make_certs(*args, "node-01", "node-02")
    assert more.returncode == 0, more.stderr
    after = digest_tree(copy)
    assert after["clients/node-01.crt"] == before["clients/node-01.crt"]
    assert "clients/node-02.crt" in after
    assert after["ca.crt"] == before["ca.crt"]


def test_other_server_names_need_renew(fleet, tmp_path):
    copy = tmp_path / "pki"
    shutil.copytree(fleet, copy)
    refused = make_certs("--dir", copy, "--server", "elsewhere.test")
    assert refused.returncode != 0
    assert "--renew" in refused.stderr
    renewed = make_certs("--dir", copy, "--server", "elsewhere.test", "--renew")
    assert renewed.returncode == 0, renewed.stderr
    out = openssl("x509", "-in", copy / "server.crt", "-noout", "-ext", "subjectAltName").stdout
    assert "DNS:elsewhere.test" in out and "broker.test" not in out


@pytest.mark.parametrize("bad", ["node/1", "node+", "#", "", ".hidden", "a b", "x" * 65])
def test_ids_that_cannot_be_a_topic_level_are_refused(tmp_path, bad):
    result = make_certs("--dir", tmp_path / "pki", bad)
    assert result.returncode != 0
    assert "invalid client id" in result.stderr
    assert not (tmp_path / "pki" / "clients").exists() or not any(
        (tmp_path / "pki" / "clients").iterdir()
    )


def test_unknown_option_is_one_line_error(tmp_path):
    result = make_certs("--dir", tmp_path, "--bogus")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0


def test_revoke_puts_the_certificate_on_the_crl(fleet, tmp_path):
    copy = tmp_path / "pki"
    shutil.copytree(fleet, copy)
    cert = copy / "clients/node-01.crt"
    saved = tmp_path / "node-01.crt"
    shutil.copy(cert, saved)
    ok = openssl(
        "verify", "-crl_check", "-CAfile", copy / "ca.crt", "-CRLfile", copy / "crl.pem", saved
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = make_certs("--dir", copy, "--revoke", "node-01")
    assert result.returncode == 0, result.stderr
    assert not cert.exists() and not (copy / "clients/node-01.key").exists()
    # Still signed by the CA, but the CRL the broker loads now refuses it.
    assert openssl("verify", "-CAfile", copy / "ca.crt", saved).returncode == 0
    revoked = openssl(
        "verify", "-crl_check", "-CAfile", copy / "ca.crt", "-CRLfile", copy / "crl.pem", saved
    )
    assert revoked.returncode != 0
    assert "revoked" in (revoked.stdout + revoked.stderr)
    # Re-enrolling the board issues a fresh certificate that verifies.
    again = make_certs("--dir", copy, "node-01")
    assert again.returncode == 0, again.stderr
    fresh = openssl(
        "verify", "-crl_check", "-CAfile", copy / "ca.crt", "-CRLfile", copy / "crl.pem", cert
    )
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr


def test_revoking_an_unknown_id_fails(fleet, tmp_path):
    copy = tmp_path / "pki"
    shutil.copytree(fleet, copy)
    result = make_certs("--dir", copy, "--revoke", "never-issued")
    assert result.returncode != 0
    assert "no client certificate" in result.stderr


def test_help_exits_zero():
    result = make_certs("--help")
    assert result.returncode == 0
    assert "Usage:" in result.stdout
