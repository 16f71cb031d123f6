"""Where one request's CPU goes: a sampling profiler run inside a server process.

``python -m bench.stages OUT -- -m router --config C`` runs the module after ``-m`` as
``__main__`` (the router, as users run it) with a sampler thread that sleeps until SIGUSR1, then
records every thread's Python stack every ``SAMPLE_INTERVAL_S`` until SIGUSR2 and writes the
counts per stage to ``OUT`` (JSON). Idle threads (waiting in ``select``, a lock, a queue) are not
counted. A sample is attributed to the deepest frame that names a stage: a pandas call made by the
router's parser counts as parsing, an sklearn call as the model, wherever they were called from.

The harness turns shares into microseconds with the CPU time per request it measured from
``/proc`` over the same window (``bench/cpu.py``).
"""

from __future__ import annotations

import json
import runpy
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

SAMPLE_INTERVAL_S = 0.002
SWITCH_INTERVAL_S = 0.0001
OTHER = "other Python (asyncio, logging, ...)"
# (stage, substrings of a frame's "file:function"); the deepest matching frame of a stack wins.
STAGE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("HTTP stack (uvicorn, h11/httptools, starlette)", ("/uvicorn/", "/h11/", "/starlette/")),
    ("router HTTP handler (app.py)", ("router/server/app.py",)),
    (
        "router core (service, batcher, assignment)",
        ("router/service.py", "router/scoring/batcher.py"),
    ),
    (
        "router core (service, batcher, assignment)",
        ("router/assignment.py", "router/split.py", "router/arms.py"),
    ),
    (
        "router core (service, batcher, assignment)",
        (
            "router/scoring/scorer.py",
            "router/scoring/scorers.py",
            "router/recording.py",
            "router/scoring/breaker.py",
            "router/scoring/modelkind.py",
        ),
    ),
    (
        "thread hop (anyio, futures)",
        ("/anyio/", "/concurrent/futures/", "router/scoring/bulkhead.py"),
    ),
    (
        "parse + input checks (payload, casting, columns)",
        (
            "router/input/payload.py",
            "router/input/casting.py",
            "router/input/columns.py",
            "router/input/bodies.py",
        ),
    ),
    ("model input, built once per call (rows.py)", ("router/input/rows.py",)),
    ("pyfunc wrapper (predict, inspect.signature)", ("mlflow/pyfunc/", "/inspect.py")),
    ("pyfunc schema enforcement", ("mlflow/models/utils.py", "mlflow/types/")),
    ("flavor call (flavors.py)", ("router/scoring/flavors.py",)),
    ("model (sklearn, numpy)", ("/sklearn/", "/scipy/")),
    ("outputs (outputs.py)", ("router/scoring/outputs.py",)),
    ("metrics (prometheus_client)", ("/prometheus_client/", "router/metrics.py")),
    ("prediction log (predlog.py, sqlalchemy)", ("router/log/predlog.py", "/sqlalchemy/")),
    ("bare app handler", ("bench/baseline_app.py",)),
)
# A thread whose innermost Python frame is one of these is waiting, not working.
_IDLE_LEAVES: tuple[str, ...] = (
    "selectors.py:select",
    # The worker thread woke the event loop and now waits for the GIL the loop took.
    "selector_events.py:_write_to_self",
    "threading.py:wait",
    "threading.py:_wait_for_tstate_lock",
    "queue.py:get",
    "_threads.py:get",
    "thread.py:_worker",
    "socket.py:accept",
    # uvloop's loop is C: no Python frame above asyncio.run means it waits in epoll (its own C
    # work runs in the same thread, but its callbacks run as Python frames above this one).
    "asyncio/runners.py:run",
)


def _label(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_code.co_name}"


def stage_of(frames: Sequence[str]) -> str | None:
    """The stage of one stack (frames root first), or None when the thread is idle."""
    if not frames or any(frames[-1].endswith(leaf) for leaf in _IDLE_LEAVES):
        return None
    for frame in reversed(frames):
        for stage, needles in STAGE_RULES:
            if any(needle in frame for needle in needles):
                return stage
    return OTHER


def _stack(frame: FrameType | None) -> list[str]:
    labels: list[str] = []
    while frame is not None:
        labels.append(_label(frame))
        frame = frame.f_back
    labels.reverse()
    return labels


class Sampler:
    """Samples every other thread's stack between ``start()`` and ``stop()``."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.counts: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()  # "stage <- innermost frame": to check the rules
        self.samples = 0
        self._switch_interval = sys.getswitchinterval()
        self._on = threading.Event()
        self._done = threading.Event()

    def start(self) -> None:
        # The sampler needs the GIL to look: by default it gets it when a thread blocks (I/O)
        # or every 5 ms, which would over-sample the I/O-heavy HTTP stack. Switching every
        # 100 µs while sampling spreads the samples over where the time goes.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._on.set()

    def stop(self) -> None:
        sys.setswitchinterval(self._switch_interval)
        self._done.set()
        self._on.set()

    def run(self) -> None:
        self._on.wait()
        me = threading.get_ident()
        while not self._done.is_set():
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = _stack(frame)
                stage = stage_of(stack)
                if stage is not None:
                    self.counts[stage] += 1
                    self.leaves[f"{stage} <- {stack[-1]}"] += 1
            time.sleep(self.interval_s)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[1:3] != ["--", "-m"]:
        raise SystemExit("usage: python -m bench.stages OUT -- -m MODULE [ARGS...]")
    out, module, module_args = Path(args[0]), args[3], args[4:]
    sampler = Sampler()

    def dump(signum: int, frame: FrameType | None) -> None:
        sampler.stop()
        out.write_text(
            json.dumps(
                {
                    "samples": sampler.samples,
                    "stages": dict(sampler.counts),
                    "leaves": dict(sampler.leaves.most_common(40)),
                },
                indent=1,
            ),
            encoding="utf-8",
        )

    signal.signal(signal.SIGUSR1, lambda signum, frame: sampler.start())
    signal.signal(signal.SIGUSR2, dump)
    threading.Thread(target=sampler.run, name="bench-stages", daemon=True).start()
    sys.argv = [module, *module_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
