"""The single place that states zmqfork's version."""

__version__ = "0.1.0"
