"""Reading a real ``/metrics`` scrape in tests: parse the exposition text, sum matching samples.

Parsing goes through ``prometheus_client.parser``, so a scrape that is not valid exposition text
fails the test rather than being half-read by a regular expression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample as ``(name, labels, value)``."""

    samples: tuple[tuple[str, dict[str, str], float], ...]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        return cls(
            tuple(
                (sample.name, dict(sample.labels), float(sample.value))
                for family in text_string_to_metric_families(text)
                for sample in family.samples
            )
        )

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels`` (0.0 when none)."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        """Whether at least one sample called ``name`` carries ``labels``."""
        return any(
            sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
            for sample_name, sample_labels, _ in self.samples
        )

    def values(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample called ``name``, with its labels."""
        return [
            (labels, value) for sample_name, labels, value in self.samples if sample_name == name
        ]


def scrape(client: httpx.Client, base_url: str = "") -> Scrape:
    """GET ``/metrics`` and parse it; fails on a non-200 answer."""
    response = client.get(f"{base_url}/metrics")
    response.raise_for_status()
    return Scrape.parse(response.text)


def process_scrapes(directory: Path) -> dict[int, Scrape]:
    """Each live process's own metrics in a multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``):
    what ``/metrics`` sums over workers, one worker at a time. Reads prometheus_client's per-pid
    files with its own reader (a private method, in tests only)."""
    by_pid: dict[int, list[str]] = {}
    for path in directory.glob("*.db"):
        match = re.fullmatch(r"(?:counter|histogram|gauge_[a-z]+)_(\d+)\.db", path.name)
        if match is not None:
            by_pid.setdefault(int(match.group(1)), []).append(str(path))
    scrapes = {}
    for pid, files in by_pid.items():
        if not Path(f"/proc/{pid}").exists():
            continue  # a process that is gone
        metrics = MultiProcessCollector._read_metrics(files)  # type: ignore[attr-defined]
        families = MultiProcessCollector._accumulate_metrics(metrics, True)  # type: ignore[attr-defined]
        scrapes[pid] = Scrape(
            tuple(
                (sample.name, dict(sample.labels), float(sample.value))
                for family in families
                for sample in family.samples
            )
        )
    return scrapes
