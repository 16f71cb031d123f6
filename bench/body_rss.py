"""How much memory can one body make the router take? ``python -m bench.body_rss``.

Starts ``python -m router`` (default limits: 1,000 rows, 1 MiB bodies, 4 MiB feedback) over the
benchmark's registry, then sends hostile bodies, each within the body limit, one kind at a time:
alone, then ``CONCURRENCY`` at once. For each kind it resets the process's peak RSS (``VmHWM``, via
``/proc/PID/clear_refs``), sends, and reports the peak over the RSS before: the most memory that
kind of body made the process take; and the CPU time the process spent on the body sent alone
(``/proc/PID/stat``: user + system). Prints a table; the largest figures are the bounds to state.
The Parquet bodies include those of issue 20 (``bench/parquet_craft.py``): nested strings that
decoded densely, row groups naming one chunk, footers that aborted the process.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from bench import parquet_craft as craft
from bench.registry import split_body, train_registry
from bench.servers import free_port, running
from bench.targets import clean_env
from demo.data import FEATURES

CONCURRENCY = 8
MIB = 1_048_576
BODY_LIMIT = MIB
JSON = "application/json"
PARQUET = "application/vnd.apache.parquet"
CSV = "text/csv"


def _parquet(table: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", **options)
    return sink.getvalue()


def _features_table(text: str, rows: int) -> pa.Table:
    """All features as strings of ``text`` (dictionary-encoded: a few KB on the wire)."""
    return pa.table({name: pa.array([text] * rows) for name in FEATURES})


def bodies() -> dict[str, tuple[str, Callable[[], bytes]]]:
    """Kind -> (content type, body maker). Every body is at most ``BODY_LIMIT`` bytes."""
    return {
        "parquet 10M rows (RLE)": (
            PARQUET,
            lambda: _parquet(pa.table({"x": pa.array([0.0] * 10_000_000)})),
        ),
        "parquet 1000 rows x 12 strings of 1.3 KB (just under the decoded limit)": (
            PARQUET,
            lambda: _parquet(_features_table("a" * 1_300, 1000)),
        ),
        "parquet 1000 rows x 1 string of 400 KB (dictionary)": (
            PARQUET,
            lambda: _parquet(pa.table({"x": pa.array(["a" * 400_000] * 1000)})),
        ),
        "parquet struct<s: string>, 1000 rows of one 1 MiB string (was 1 GB)": (
            PARQUET,
            lambda: craft.nested_strings("struct", 1000, MIB),
        ),
        "parquet list<string>, 1000 rows of one 1 MiB string (was 1 GB)": (
            PARQUET,
            lambda: craft.nested_strings("list", 1000, MIB),
        ),
        "parquet 1000 list columns x 1000 rows (pandas objects; was 160 MiB)": (
            PARQUET,
            lambda: craft.many_lists(1000, 1000),
        ),
        "parquet 70 list columns x 1000 rows (just under the limit)": (
            PARQUET,
            lambda: craft.many_lists(70, 1000),
        ),
        "parquet 1000 row groups naming one chunk of 1000 pages (overlapping)": (
            PARQUET,
            lambda: craft.overlapping_row_groups(1000),
        ),
        "parquet 4096 columns, one value each (largest footer and page walk)": (
            PARQUET,
            lambda: craft.write(
                pa.table({f"c{i}": [0.0] for i in range(4096)}),
                compression="none",
                write_statistics=False,
            ),
        ),
        "parquet footer padded with 1M empty structs": (
            PARQUET,
            lambda: craft.padded_footer(1_000_000),
        ),
        "parquet more column chunks than columns (aborted the process)": (
            PARQUET,
            craft.chunks_beyond_schema,
        ),
        "parquet a mutated level histogram (aborted the process)": (
            PARQUET,
            craft.mutated_level_histogram,
        ),
        "json 1000 rows of long strings": (
            JSON,
            lambda: json.dumps(
                {"dataframe_split": {"columns": FEATURES, "data": [["a" * 80] * 12] * 1000}}
            ).encode(),
        ),
        "json 1 MiB of empty objects": (
            JSON,
            lambda: b'{"dataframe_records": [' + b",".join([b"{}"] * 340_000) + b"]}",
        ),
        "json 100,000 empty objects (the container limit)": (
            JSON,
            lambda: b'{"dataframe_records": [' + b",".join([b"{}"] * 99_990) + b"]}",
        ),
        "json 1 MiB of one-letter strings": (
            JSON,
            lambda: json.dumps({"inputs": {"x": ["a"] * 200_000}}).encode(),
        ),
        "json 1 MiB of numbers in one column": (
            JSON,
            lambda: json.dumps({"inputs": {"x": [0.5] * 200_000}}).encode(),
        ),
        "json 1000 valid rows": (JSON, lambda: split_body(1000).encode()),
        "csv 4096 columns": (
            CSV,
            lambda: (",".join(f"c{i}" for i in range(4096)) + "\n" + "0," * 4095 + "0\n").encode(),
        ),
        "csv 1 MiB of rows": (CSV, lambda: b"x\n" + b"1\n" * 500_000),
        "feedback 10,000 outcomes (the batch limit)": (
            JSON,
            lambda: json.dumps(
                {"outcomes": [{"request_id": f"r{i}", "outcome": 1} for i in range(10_000)]}
            ).encode(),
        ),
        "feedback 1 MiB of one outcome nested in lists": (
            JSON,
            lambda: b'{"request_id": "r1", "outcome": [' + b",".join([b"[1]"] * 99_000) + b"]}",
        ),
    }


def _pids(leader: int) -> list[int]:
    """The process and its children (``--workers`` supervisors fork)."""
    found = [leader]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == leader:
                found.append(int(entry))
    return found


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _measure(pids: Sequence[int], send: Callable[[], None]) -> tuple[float, float]:
    """Peak RSS growth (MiB) and CPU seconds over all ``pids`` while ``send`` runs."""
    before = sum(_status_kb(pid, "VmRSS") for pid in pids)
    cpu = sum(_cpu_s(pid) for pid in pids)
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    send()
    peak = sum(_status_kb(pid, "VmHWM") for pid in pids)
    return (peak - before) / 1024, sum(_cpu_s(pid) for pid in pids) - cpu


def _send(
    client: httpx.Client, path: str, body: bytes, content_type: str, statuses: list[int]
) -> None:
    answer = client.post(path, content=body, headers={"Content-Type": content_type})
    statuses.append(answer.status_code)


def _concurrently(send: Callable[[], None]) -> None:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for future in [pool.submit(send) for _ in range(CONCURRENCY)]:
            future.result()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="body_rss", description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="body-rss-"))
    registry = train_registry(work / "registry")
    port = free_port()
    config = work / "router.yaml"
    config.write_text(
        "\n".join(
            [
                "model:",
                f"  name: {registry.model_name}",
                f"  tracking_uri: {registry.tracking_uri}",
                "prediction_log:",
                f"  url: sqlite:///{work / 'log.db'}",
                "feedback:",
                "  wait_for_prediction_s: 0",
                "",
            ]
        ),
        encoding="utf-8",
    )
    cmd = [sys.executable, "-m", "router", "--config", str(config), "--port", str(port)]
    with (
        running(
            "router",
            cmd,
            port=port,
            ready_path="/readyz",
            log_path=work / "router.log",
            env=clean_env(),
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=120) as client,
    ):
        pids = _pids(server.pid)
        warm = bodies()["json 1000 valid rows"][1]()
        for _ in range(20):  # allocator and caches warm, as in service
            client.post("/invocations", content=warm, headers={"Content-Type": JSON})
        print(
            f"{'body':<74} {'bytes':>9} {'status':>6} {'alone MiB':>9} {'x8 MiB':>8} "
            f"{'alone CPU s':>11}"
        )
        worst = worst_cpu = 0.0
        for kind, (content_type, make) in bodies().items():
            body = make()
            assert len(body) <= BODY_LIMIT, kind
            path = "/feedback" if kind.startswith("feedback") else "/invocations"
            statuses: list[int] = []
            send_one = functools.partial(_send, client, path, body, content_type, statuses)
            send_many = functools.partial(_concurrently, send_one)
            alone, cpu = _measure(pids, send_one)
            many, _ = _measure(pids, send_many)
            worst, worst_cpu = max(worst, alone, many), max(worst_cpu, cpu)
            print(
                f"{kind:<74} {len(body):>9} {statuses[0]:>6} {alone:>9.1f} {many:>8.1f} "
                f"{cpu:>11.2f}"
            )
            assert all(status < 500 for status in statuses), (kind, statuses)
        assert client.get("/healthz").status_code == 200
    print(f"largest peak RSS growth: {worst:.1f} MiB; most CPU for one body: {worst_cpu:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
