"""The coordinator: runs federated training jobs against worker daemons."""

__version__ = "0.1.0"
