"""``estdp simulate`` / ``estdp experiment``: flags and user errors (runs: tests/firmware_sim)."""

from __future__ import annotations

import pytest

from estdp import cli
from estdp.commands.simulate import fleet_config


def _args(*argv: str):
    return cli.build_parser().parse_args(["simulate", *argv])


def test_defaults_are_the_seed_headline_experiment(tmp_path):
    config = fleet_config(_args(), tmp_path)
    assert (config.nodes, config.neurons, config.target, config.metric) == (5, 100, 300, "mse")
    assert (config.images, config.offset, config.rounds) == (30000, 0, 1)
    assert str(config.partition) == "iid"
    assert config.baseline_neurons == 300
    assert [d.name for d in config.devices] == ["host"] * 5
    assert config.broker_url is None  # the embedded broker
    assert config.fleet.startswith("sim-")


def test_flags_reach_the_fleet_config(tmp_path):
    config = fleet_config(
        _args(
            "--nodes", "3", "--neurons", "250", "--partition", "dirichlet:0.5",
            "--devices", "nano,agx-orin*2", "--network", "wifi", "--rounds", "3",
            "--fault", "kill-node:2@r1:50%", "--baseline-neurons", "0", "--fleet", "lab",
        ),
        tmp_path,
    )  # fmt: skip
    assert str(config.partition) == "dirichlet:0.5"
    assert [d.name for d in config.devices] == ["nano", "agx-orin", "agx-orin"]
    assert [n.name for n in config.networks] == ["wifi"] * 3
    assert config.faults[0].target == "node-2" and config.rounds == 3
    assert config.baseline_neurons == 0 and config.fleet == "lab"


def test_sites_split_the_boards_into_fleets_with_their_own_targets(tmp_path):
    config = fleet_config(_args("--sites", "2", "--nodes", "5", "--fleet", "lab"), tmp_path)
    assert config.site_nodes() == {
        "site-1": ["node-1", "node-2", "node-3"],
        "site-2": ["node-4", "node-5"],
    }
    assert config.fleet_of("node-4") == "lab.site-2" and config.site_fleet("site-1") == "lab.site-1"
    # Twice a site's share of the 300-neuron target, at most what its boards hold.
    assert [config.site_target_for(s) for s in config.site_ids()] == [300, 200]
    custom = fleet_config(_args("--sites", "2", "--site-target", "120"), tmp_path)
    assert custom.site_target_for("site-1") == 120
    flat = fleet_config(_args(), tmp_path)
    assert flat.site_ids() == [] and flat.fleet_of("node-1") == flat.fleet


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--partition", "zipf"], "unknown partition"),
        (["--devices", "raspberry"], "unknown device profile"),
        (["--fault", "kill-node:9@1s"], "no node '9'"),
        (["--fault", "restart-broker@1s", "--broker", "mqtt://127.0.0.1:1"], "embedded broker"),
        (["--min-nodes", "9"], "more than --nodes"),
        (["--nodes", "5", "--images", "3"], "cannot be split"),
        (["--nodes", "3", "--sites", "4"], "--sites must be in 1..3"),
        (["--site-target", "50"], "--site-target needs --sites"),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    assert cli.main(["simulate", "--out", str(tmp_path / "r"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("estdp simulate: error:") and message in err
    assert len(err.splitlines()) == 1


def test_missing_mnist_without_network_says_how_to_point_data(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ESTDP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("ESTDP_MNIST_MIRRORS", "http://127.0.0.1:9/")  # nothing listens there
    assert cli.main(["simulate", "--out", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--data DIR" in err and "IDX" in err
    assert not (tmp_path / "r" / "logs").exists()  # nothing was started


def test_a_non_empty_report_directory_is_refused(capsys, tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    assert cli.main(["simulate", "--out", str(tmp_path)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_experiment_lists_the_five_experiments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["experiment", "--help"])
    out = capsys.readouterr().out
    for name in ("compression", "merge-time", "ensemble", "ga", "non-iid"):
        assert name in out


@pytest.mark.parametrize(
    ("argv", "labels", "calibrate"),
    [([], "federated", 1500), (["--labels", "kept", "--calibrate-images", "0"], "kept", 0)],
)
def test_experiment_label_flags_reach_the_fleet(tmp_path, argv, labels, calibrate):
    from estdp.commands.experiment import experiment_config
    from firmware_sim.display import Display
    from firmware_sim.experiments import Context

    args = cli.build_parser().parse_args(["experiment", "ensemble", "--out", str(tmp_path), *argv])
    context = Context(experiment_config(args), Display(quiet=True), "estdp experiment ensemble")
    fleet = context.fleet("ensemble")
    assert (fleet.labels, fleet.calibrate_images) == (labels, calibrate)
