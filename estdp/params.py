"""Network parameters: one frozen dataclass, two presets.

``bindsnet``: BindsNET's ``DiehlAndCook2015`` network as run by its ``eth_mnist`` example
(250 steps of 1 ms, 128 Hz maximum input rate, state reset between images).

``paper``: the protocol of Diehl & Cook (2015): 350 ms presentation followed by 150 ms
of rest, 63.75 Hz maximum input rate, and an image that drew fewer than 5 excitatory
spikes shown again with its maximum rate raised by 32 Hz.

Every field can be overridden from a TOML file (``[network]`` table) or from the CLI
(``--set name=value``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from estdp.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass(frozen=True)
class NetworkParams:
    """Parameters of the Diehl & Cook network and its learning rule (units: ms, mV, Hz)."""

    preset: str = "bindsnet"
    n_input: int = 784
    # Input encoding.
    dt: float = 1.0
    time_steps: int = 250  # presentation length in steps of dt
    rest_steps: int = 0  # steps of silence after each image (state is reset anyway)
    intensity: float = 128.0  # input rate of a pixel of value 255, Hz
    min_spikes: int = 0  # re-present an image that drew fewer excitatory spikes
    intensity_boost: float = 32.0  # Hz added to the rate on each re-presentation
    max_presentations: int = 5  # bound on re-presentations of one image
    # Excitatory LIF neurons with adaptive threshold.
    v_rest: float = -65.0
    v_reset: float = -60.0
    v_thresh: float = -52.0
    refrac: int = 5  # steps
    tc_v: float = 100.0
    theta_plus: float = 0.05
    tc_theta: float = 1e7
    one_spike: bool = True
    # Lateral inhibition through the inhibitory partner of each excitatory neuron.
    exc_strength: float = 22.5
    inh_strength: float = 120.0
    # Pre-and-post STDP on input->excitatory weights.
    tc_trace: float = 20.0
    nu_pre: float = 1e-4
    nu_post: float = 1e-2
    w_min: float = 0.0
    w_max: float = 1.0
    norm: float = 78.4
    w_init_max: float = 0.3

    def __post_init__(self) -> None:
        positive = ("dt", "time_steps", "tc_v", "tc_theta", "tc_trace", "intensity", "norm")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"parameter {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("rest_steps", "min_spikes", "refrac", "nu_pre", "nu_post", "w_init_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"parameter {name} must be >= 0, got {getattr(self, name)!r}")
        if self.max_presentations < 1:
            raise ConfigError(
                f"parameter max_presentations must be >= 1, got {self.max_presentations}"
            )
        if not self.w_min < self.w_max:
            raise ConfigError(f"w_min ({self.w_min}) must be below w_max ({self.w_max})")
        if self.n_input < 1:
            raise ConfigError(f"n_input must be >= 1, got {self.n_input}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NetworkParams:
        """Build from a mapping, refusing unknown names and wrong types."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown network parameter(s): {', '.join(unknown)}")
        preset = values.get("preset", DEFAULT_PRESET)
        base = PRESETS.get(preset) or _bad_preset(preset)
        return base.replace(**{k: v for k, v in values.items() if k != "preset"})

    def replace(self, **changes: Any) -> NetworkParams:
        """A copy with ``changes`` applied, each coerced to the field's type."""
        known = {f.name: f for f in fields(self)}
        coerced: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise ConfigError(f"unknown network parameter {name!r}")
            coerced[name] = _coerce(name, value, type(getattr(self, name)))
        return dataclasses.replace(self, **coerced)


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"parameter {name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"parameter {name} must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {name} must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"parameter {name} must be an integer, got {value!r}")
        return int(as_float)
    if kind is float:
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {name} must be a number, got {value!r}") from None
        if result != result or result in (float("inf"), float("-inf")):
            raise ConfigError(f"parameter {name} must be finite, got {value!r}")
        return result
    if not isinstance(value, str):
        raise ConfigError(f"parameter {name} must be a string, got {value!r}")
    return value


BINDSNET = NetworkParams()
PAPER = NetworkParams(
    preset="paper",
    time_steps=350,
    rest_steps=150,
    intensity=63.75,
    min_spikes=5,
    intensity_boost=32.0,
)
PRESETS: dict[str, NetworkParams] = {"bindsnet": BINDSNET, "paper": PAPER}
DEFAULT_PRESET = "bindsnet"


def load_params(
    preset: str = DEFAULT_PRESET,
    toml_path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> NetworkParams:
    """Parameters from a preset, then a TOML file's ``[network]`` table, then ``name=value`` overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    params = PRESETS[preset]
    if toml_path is not None:
        path = Path(toml_path)
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        section = table.get("network", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [network] must be a table")
        if "preset" in section:
            params = PRESETS.get(section["preset"]) or _bad_preset(section["preset"])
        params = params.replace(**{k: v for k, v in section.items() if k != "preset"})
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"override {item!r} is not of the form name=value")
        params = params.replace(**{name.strip(): value.strip()})
    return params


def _bad_preset(name: Any) -> NetworkParams:
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
