"""ensemble-stdp: distributed on-device STDP learning of the Diehl & Cook 2015 network."""

__version__ = "0.1.0"
