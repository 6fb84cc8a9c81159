"""docs/operations.md agrees with the tree: the files it names exist, its numbers add up,
and the limits it quotes are the ones in the configurations."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "operations.md").read_text()


def test_every_deploy_path_named_exists():
    paths = set(re.findall(r"`(deploy/[^`\s]+)`", GUIDE))
    assert len(paths) > 10
    for path in paths:
        # deploy/systemd/estdp-{node,aggregator}.service style names expand to each file.
        expanded = [path]
        brace = re.search(r"\{([^}]*)\}", path)
        if brace:
            expanded = [
                path[: brace.start()] + part + path[brace.end() :]
                for part in brace.group(1).split(",")
            ]
        for name in expanded:
            if "*" in name:
                assert list(REPO.glob(name)), name
            else:
                assert (REPO / name).exists(), name


def test_model_size_table_is_784_inputs_of_float32():
    rows = re.findall(r"^\s*\| ([\d,]+) neurons \| ([\d,]+)", GUIDE, re.M)
    assert len(rows) >= 4
    for neurons, size in rows:
        assert int(size.replace(",", "")) == 784 * int(neurons.replace(",", "")) * 4


def test_quoted_limits_match_the_broker_configuration():
    conf = (REPO / "deploy" / "broker" / "mosquitto.conf").read_text()
    for key in ("max_packet_size", "max_queued_bytes"):
        value = re.search(rf"^{key} (\d+)$", conf, re.M).group(1)
        assert f"`{key} {value}`" in GUIDE, key
