"""``estdp aggregator``: the upstream (site aggregator) flags and their user errors; the
hierarchy itself runs in tests/aggregator/test_hierarchy.py and tests/firmware_sim."""

from __future__ import annotations

import pytest

from estdp import cli
from estdp.commands.aggregator import upstream_config

BASE = ["aggregator", "--broker", "mqtt://127.0.0.1:9", "--nodes", "2", "--target", "5"]


def _args(*argv: str):
    return cli.build_parser().parse_args([*BASE, *argv])


def test_without_upstream_flags_it_is_a_flat_aggregator():
    assert upstream_config(_args()) is None


def test_the_site_id_defaults_to_the_fleet():
    up = upstream_config(_args("--fleet", "site-a", "--upstream-fleet", "lab"))
    assert (up.site_id, up.fleet) == ("site-a", "lab")
    named = upstream_config(_args("--upstream-fleet", "lab", "--site-id", "s7"))
    assert named.site_id == "s7"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--site-id", "s1"], "--site-id: only with --upstream-fleet"),
        (["--upstream-broker", "mqtt://h:1", "--upstream-cert", "c"], "only with --upstream-fleet"),
        (["--fleet", "lab", "--upstream-fleet", "lab"], "must differ from --fleet"),
        (["--upstream-fleet", "lab", "--site-id", "a/b"], "invalid site id"),
        (["--upstream-fleet", "lab", "--site-id", "s1", "--client-id", "s1"], "clash"),
        (["--upstream-fleet", "lab", "--upstream-broker", "ftp://x"], "bad broker URL"),
        (["--upstream-fleet", "lab", "--upstream-cert", "/nonexistent.crt"], "no such file"),
    ],
)
def test_user_errors_are_one_line_before_any_connection(argv, message, capsys, tmp_path):
    # Port 9 has no broker: each error must come before the aggregator tries to connect.
    code = cli.main([*BASE, "--state", str(tmp_path / "s"), "--connect-timeout", "0.1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("estdp aggregator: error:") and message in err, err
    assert len(err.splitlines()) == 1
