"""``estdp node`` (and the broker flags it shares with ``estdp aggregator``): user errors
are one line before any connection, and SIGTERM ends the first connection's retries."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from estdp import cli

# Port 9 (discard) has no broker here: every error must come before a connection attempt.
NODE = ["node", "--broker", "mqtt://127.0.0.1:9", "--node-id", "n1"]
AGGREGATOR = ["aggregator", "--broker", "mqtt://127.0.0.1:9", "--nodes", "2", "--target", "5"]


def test_a_state_path_under_a_file_is_one_line(capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "passwd"
    blocker.write_text("root:x:0:0\n")
    code = cli.main([*NODE, "--state", str(blocker / "x"), "--connect-timeout", "0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (
        f"estdp node: error: cannot create the node state directory {blocker / 'x'}: "
        "Not a directory"
    )


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("0/0", "the shard count (after the /) must be >= 1, got '0/0'"),
        ("1/-2", "the shard count (after the /) must be >= 1, got '1/-2'"),
        ("3/3", "shard index must be in 0..2 for 3 shard(s), got '3/3'"),
        ("-1/3", "shard index must be in 0..2 for 3 shard(s), got '-1/3'"),
        ("2", "expected INDEX/COUNT such as 0/5, got '2'"),
    ],
)
def test_bad_shards_are_one_line(shard: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*NODE, f"--shard={shard}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.endswith(f"argument --shard: {message}"), err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("verb", [NODE, AGGREGATOR])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_connect_timeout_must_be_positive_seconds(verb, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*verb, f"--connect-timeout={value}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert "argument --connect-timeout: expected a number of seconds" in err, err
    assert len(err.splitlines()) == 1


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(argv: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "wb")  # noqa: SIM115 - the child owns it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "estdp.cli", "--log-level", "INFO", *argv],
        stdout=subprocess.PIPE,
        stderr=handle,
    )


def wait_for_retry(proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while "retrying in" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < end, f"no connection retry logged:\n{log.read_text()}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["node", "aggregator"])
def test_sigterm_ends_the_connection_retries_promptly(
    verb: str, mnist_dir: Path, tmp_path: Path
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    common = ["--broker", url, "--json", "--connect-timeout", "120"]
    if verb == "node":
        argv = ["node", *common, "--node-id", "n1", "--data", str(mnist_dir), "--images", "20",
                "--test-images", "0", "--backend", "numpy", "--state", str(tmp_path / "n1")]  # fmt: skip
    else:
        argv = ["aggregator", *common, "--nodes", "1", "--target", "5",
                "--state", str(tmp_path / "agg")]  # fmt: skip
    log = tmp_path / f"{verb}.log"
    proc = start_daemon(argv, log)
    try:
        wait_for_retry(proc, log)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert took < 3.0, f"{took:.1f} s after SIGTERM\n{stderr}"
    assert "Traceback" not in stderr
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "stopped", events
    assert (events[-1]["reason"], events[-1]["phase"]) == ("SIGTERM", "connecting")
    assert "stopped (SIGTERM) before connecting to " + url in stderr
    assert proc.returncode == 0  # a clean stop
