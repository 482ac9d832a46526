"""The worker: a daemon next to private data that trains what the coordinator sends and returns only updates."""

__version__ = "0.1.0"
