"""The project's error hierarchy.

Every error a user can cause (bad file, bad flag, bad payload, missing GPU) is one of
these; the CLI prints its message as one line and exits non-zero.
"""


class EstdpError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(EstdpError):
    """A parameter, flag or configuration file is invalid."""


class BackendUnavailable(EstdpError):
    """An explicitly requested array backend (e.g. cupy) cannot be used."""


class DataError(EstdpError):
    """A dataset file is missing, corrupt or inconsistent."""


class ModelFileError(EstdpError):
    """A model file is missing, damaged or of an unsupported version."""


class ProtocolError(EstdpError):
    """A wire message failed to decode or validate."""


class TransportError(EstdpError):
    """The MQTT transport failed (connect, publish, subscribe)."""


class MergeError(EstdpError):
    """Sub-models cannot be merged (mismatched shapes or parameters, bad target)."""
