"""Mutated real Parquet files against the router's Parquet decoding, each case in its own forked
process, so that an abort (SIGABRT), a CPU loop or a memory blow-up is seen and named.

``python -m tests.parquet_fuzz --cases N --seed S [--save DIR]`` prints one JSON summary: outcomes
by kind, the worst peak-RSS growth and CPU time of any case, and every failure (the mutation, what
went wrong; with ``--save`` the body too). A case fails when its process dies of a signal, uses
more than ``CPU_LIMIT_S`` of CPU (``RLIMIT_CPU``: a bound on work, not on wall-clock time), or
raises anything but a 4xx ``RouterError``, or returns columns the router cannot key by name.

Seeds are real files (pyarrow and pandas writers, flat, nested and typed columns, every codec,
v1 and v2 pages, page indexes, the fuzzer's past finds in ``tests/cases``); mutations are blind
(bytes set, cut, repeated) and structure-aware (any footer value, list or field; a page header's
sizes; the pandas metadata), so most cases get past the first check.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import decimal
import io
import json
import os
import random
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from bench import parquet_craft as craft
from router.errors import RouterError
from router.input.bodies import read_parquet
from router.input.thrift_compact import Struct, ThriftError, read_struct

MAX_ROWS = 1000
CPU_LIMIT_S = 20
ADDRESS_SPACE_HEADROOM = 4 << 30  # beyond what the worker maps: a blow-up fails, not the host
CASES = Path(__file__).parent / "cases"
INTERESTING = [0, 1, -1, 2, 7, 15, 16, 255, 256, 2**15, 2**31 - 1, -(2**31), 2**62, 2**63 - 1]


def seeds() -> list[bytes]:
    rows = 40
    flat = pa.table(
        {
            "f": pa.array([1.5, None, -3.0, 0.0] * (rows // 4)),
            "i": pa.array(range(rows), pa.int64()),
            "s": pa.array(["ab", "c", None, "ab"] * (rows // 4)),
            "b": pa.array([True, False, None, True] * (rows // 4)),
        }
    )
    nested = pa.table(
        {
            "l": pa.array([[1, 2], [], None, [3]] * (rows // 4)),
            "st": pa.array([{"a": "x", "b": 1.0}, None, {"a": None, "b": 2.0}, {}] * (rows // 4)),
            "m": pa.array(
                [[("k", 1)], [], None, [("j", 2), ("k", 3)]] * (rows // 4),
                pa.map_(pa.string(), pa.int64()),
            ),
            "ls": pa.array([["u", "v"], None, [], ["u"]] * (rows // 4)),
        }
    )
    day = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    typed = pa.table(
        {
            "t": pa.array([day, None, day, day] * (rows // 4), pa.timestamp("ms", "UTC")),
            "d": pa.array([decimal.Decimal("1.25"), None] * (rows // 2), pa.decimal128(10, 2)),
            "fx": pa.array([b"abcd", None] * (rows // 2), pa.binary(4)),
            "day": pa.array([day.date(), None] * (rows // 2), pa.date32()),
            "cat": pa.array(["x", "y", None, "x"] * (rows // 4)).dictionary_encode(),
        }
    )
    options: list[dict[str, Any]] = [
        {},
        {"compression": "zstd", "data_page_size": 64, "write_batch_size": 8},
        {"compression": "gzip", "data_page_version": "2.0", "use_dictionary": False},
        {"compression": "snappy", "write_page_index": True, "write_page_checksum": True},
        {"compression": "lz4", "row_group_size": 7},
        {"compression": "brotli", "write_statistics": False},
    ]
    found = [craft.write(table, **option) for table in (flat, nested, typed) for option in options]
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]}, index=pd.Index([10, 20], name="k"))
    sink = io.BytesIO()
    frame.to_parquet(sink)
    found.append(sink.getvalue())
    found.extend(path.read_bytes() for path in sorted(CASES.glob("*.parquet")))
    return found


# --- mutations --------------------------------------------------------------------------------


def mutate(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutated body and a short description of what was done to it."""
    kind = rng.choice(["bytes", "cut", "footer", "footer", "footer", "page", "pandas"])
    try:
        return MUTATORS[kind](body, rng)
    except (ThriftError, KeyError, IndexError, TypeError, ValueError, StopIteration):
        return _set_bytes(body, rng)  # the structure was not there to mutate: blind instead


def _set_bytes(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(body)
    tail = rng.random() < 0.5  # half the time within the footer's end of the file
    low = int(len(data) * 0.7) if tail else 0
    for _ in range(rng.choice([1, 2, 4, 8, 32])):
        data[rng.randrange(low, len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    return f"bytes{'@tail' if tail else ''}", bytes(data)


def _cut(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    at = rng.randrange(len(body))
    if rng.random() < 0.5:
        start = rng.randrange(len(body) - 8)
        piece = body[start : start + rng.randrange(1, 64)]
        return "repeat", body[:at] + piece * rng.randrange(1, 50) + body[at:]
    return "cut", body[:at] + (body[-8:] if rng.random() < 0.5 else b"")


def _footer(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    meta, start = craft.footer(body)
    done = [_change_value(meta, rng, len(body)) for _ in range(rng.choice([1, 1, 2, 3]))]
    return "footer:" + ",".join(done), craft.with_footer(body[:start], meta)


def _change_value(meta: Struct, rng: random.Random, size: int) -> str:
    slots = list(_slots(meta, ()))
    container, key, path = rng.choice(slots)
    value = container[key]
    if isinstance(value, bool):
        container[key] = not value
        return f"{path} flipped"
    if isinstance(value, int):
        candidates = [*INTERESTING, size, value + 1, value - 1, value * 2, value * 1000]
        container[key] = rng.choice(candidates)
        return f"{path}={container[key]}"
    if isinstance(value, bytes):
        names = [b"", value * 2, b"x" * 1000, rng.randbytes(8), b"\xff\xfe"]
        container[key] = rng.choice(names)
        return f"{path} bytes"
    if isinstance(value, list) and value:
        action = rng.choice(["repeat", "drop", "shuffle"])
        if action == "repeat":
            value.extend(copy.deepcopy(rng.choice(value)) for _ in range(rng.choice([1, 2, 100])))
        elif action == "drop":
            del value[rng.randrange(len(value))]
        else:
            rng.shuffle(value)
        return f"{path} {action}"
    if isinstance(container, Struct):
        del container[key]
        container.types.pop(key, None)
        return f"{path} dropped"
    return f"{path} kept"


def _slots(node: Any, path: tuple[int, ...]) -> Iterator[tuple[Any, Any, str]]:
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield node, key, ".".join(map(str, (*path, key)))
        if isinstance(value, dict | list):
            yield from _slots(value, (*path, key))


def _page(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A page header's sizes or counts changed; the footer's offsets follow the shift."""
    meta, start = craft.footer(body)
    chunk = rng.choice([c for group in meta[craft.ROW_GROUPS] for c in group[craft.COLUMNS]])
    column = chunk[craft.META_DATA]
    at = column[9] if column.get(11, 0) in (0, None) else min(column[9], column[11])
    header, end = read_struct(body, at, start)
    slots = [s for s in _slots(header, ()) if isinstance(s[0][s[1]], int)]
    container, key, path = rng.choice(slots)
    container[key] = rng.choice([*INTERESTING, container[key] * 1000])
    encoded = craft.encode(header)
    shift = len(encoded) - (end - at)
    for group in meta[craft.ROW_GROUPS]:
        for other in group[craft.COLUMNS]:
            data = other[craft.META_DATA]
            for field in (9, 10, 11):
                if isinstance(data.get(field), int) and data[field] > at:
                    data[field] += shift
            if other is chunk:
                data[7] += shift
    return f"page:{path}", craft.with_footer(body[:at] + encoded + body[end:start], meta)


def _pandas(body: bytes, rng: random.Random) -> tuple[str, bytes]:
    meta, start = craft.footer(body)
    entry = next(kv for kv in meta[5] if kv[1] == b"pandas")
    document = json.loads(entry[2])
    scalars = [s for s in _slots(document, ()) if not isinstance(s[0][s[1]], dict | list)]
    container, key, path = rng.choice(scalars)
    replacement = [None, 10**12, -1, "x", "k", "__index_level_0__", {"kind": "range"}, [1, 2]]
    container[key] = rng.choice(replacement)
    entry[2] = json.dumps(document).encode()
    return f"pandas:{path}", craft.with_footer(body[:start], meta)


MUTATORS: dict[str, Callable[[bytes, random.Random], tuple[str, bytes]]] = {
    "bytes": _set_bytes,
    "cut": _cut,
    "footer": _footer,
    "page": _page,
    "pandas": _pandas,
}


# --- running ----------------------------------------------------------------------------------


def decode(body: bytes) -> str:
    """What decoding ``body`` gives: ``ok``, ``<status>: <message>`` for a 4xx, else a failure."""
    try:
        frame = read_parquet(body, MAX_ROWS)
    except RouterError as exc:
        if 400 <= exc.status_code < 500:
            return f"{exc.status_code}: {exc.message[:300]}"
        return f"failure: {exc.status_code} {exc.message[:200]}"
    except Exception as exc:  # noqa: BLE001  (what the fuzzer is looking for: any other error)
        return f"failure: {type(exc).__name__}: {str(exc)[:200]}"
    names = [str(name) for name in frame.columns]
    return "ok" if len(set(names)) == len(names) else "failure: duplicate column names"


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_case(body: bytes) -> tuple[str, float, float]:
    """Decode ``body`` in a forked process: (outcome, peak RSS growth in MiB, CPU seconds)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(read_end)
        start_kb = _vm_kb("VmRSS")  # the child's own count: pages it maps, shared ones included
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
        limit = _vm_kb("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        outcome = decode(body)
        growth_kb = _vm_kb("VmHWM") - start_kb
        os.write(write_end, f"{growth_kb}\n{outcome}".encode("utf-8", "replace")[:4000])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        growth, _, outcome = answer.read().decode().partition("\n")
    _, status, usage = os.wait4(pid, 0)
    if os.WIFSIGNALED(status):
        outcome = f"failure: killed by signal {os.WTERMSIG(status)}"
    elif os.WEXITSTATUS(status) != 0:
        outcome = f"failure: exit status {os.WEXITSTATUS(status)}"
    return outcome, int(growth or 0) / 1024, usage.ru_utime + usage.ru_stime


def fuzz(cases: int, seed: int, save: Path | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = seeds()
    for body in bodies[: -len(list(CASES.glob("*.parquet")))]:  # mutations start from valid files
        if decode(body) != "ok":
            raise RuntimeError(f"a seed does not decode: {decode(body)}")
    outcomes: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    worst_growth = worst_cpu = 0.0
    for case in range(cases):
        origin = rng.randrange(len(bodies))
        what, body = mutate(bodies[origin], rng)
        outcome, growth, cpu = run_case(body)
        kind = outcome.partition(":")[0]
        outcomes[kind] = outcomes.get(kind, 0) + 1
        worst_growth, worst_cpu = max(worst_growth, growth), max(worst_cpu, cpu)
        if kind == "failure":
            failures.append({"case": case, "seed": origin, "mutation": what, "outcome": outcome})
            if save is not None:
                save.mkdir(parents=True, exist_ok=True)
                (save / f"case-{seed}-{case}.parquet").write_bytes(body)
    return {
        "cases": cases,
        "seed": seed,
        "outcomes": outcomes,
        "worst_rss_growth_mib": round(worst_growth, 1),
        "worst_cpu_s": round(worst_cpu, 3),
        "failures": failures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.parquet_fuzz", description=__doc__)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--save", type=Path, help="write each failing body here")
    args = parser.parse_args(argv)
    summary = fuzz(args.cases, args.seed, args.save)
    json.dump(summary, sys.stdout)
    print()
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
