"""Reading Prometheus exposition text the way Prometheus does: ``prometheus_client.parser``."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "parse", "scrape", "read_registry"]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample as ``{(name, sorted label pairs): value}``."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str, timeout: float = 10.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - a loopback URL of our own
        assert response.status == 200
        return parse(response.read().decode("utf-8"))


def read_registry(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode("utf-8"))
