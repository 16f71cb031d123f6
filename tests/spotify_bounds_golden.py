"""Write spotify-confidence's group-sequential bounds on a grid of look schedules to
tests/cases/spotify_bounds.json.

spotify-confidence (Spotify's experimentation statistics, its ``sequential_bound_solver``, a port of
R's ``ldbounds``) pulls in pandas, chartify and a notebook stack this project does not install, so
its figures are recorded once, from a separate environment, and ``tests/test_sequential.py``
compares this project's boundaries with them:

    python3 -m venv /tmp/spc && /tmp/spc/bin/pip install spotify-confidence==4.1.0
    /tmp/spc/bin/python tests/spotify_bounds_golden.py > tests/cases/spotify_bounds.json

Its solver spends the power family α·t^ρ on one side (``sides=2`` halves α and keeps the lower
boundary inactive). Two sets of figures: ``z`` as shipped, with the arguments Spotify's own z-test
passes (``ztrun=8``, ``max_nints=1000``), whose grid (trapezoid rule, step 0.05) and search
tolerance (1e-7 in probability) limit it to about 1e-4 in z (1e-3 where a look spends < 1e-4);
``z_refined``, the same code with its step set to 0.005, its tolerance to 1e-12 and no cap on the
grid (the module's source patched at run time, nothing else changed), accurate to ~1e-6.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings
from importlib.metadata import version
from types import ModuleType
from typing import Any

import numpy as np
from spotify_confidence.analysis.frequentist import sequential_bound_solver
from spotify_confidence.analysis.frequentist.sequential_bound_solver import bounds


def _refined() -> Any:
    source = inspect.getsource(sequential_bound_solver)
    for old, new in (("h = 0.05", "h = 0.005"), ("tol = 1e-7", "tol = 1e-12")):
        assert old in source, old
        source = source.replace(old, new)
    module = ModuleType("sequential_bound_solver_refined")
    exec(compile(source, "sequential_bound_solver_refined", "exec"), module.__dict__)
    return module.bounds


SCHEDULES: dict[str, list[float]] = {
    "2 equal": [0.5, 1.0],
    "3 equal": [1 / 3, 2 / 3, 1.0],
    "4 equal": [0.25, 0.5, 0.75, 1.0],
    "5 equal": [0.2, 0.4, 0.6, 0.8, 1.0],
    "10 equal": [k / 10 for k in range(1, 11)],
    "20 equal": [k / 20 for k in range(1, 21)],
    "unequal": [0.1, 0.3, 0.35, 0.8, 1.0],
    "late first look": [0.6, 0.9, 1.0],
    "repeated look": [0.2, 0.5, 0.5, 1.0],
    "interim only": [0.15, 0.4, 0.7],
}


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # pandas, inside the solver
    refined_bounds = _refined()
    cases = []
    for name, fractions in SCHEDULES.items():
        for alpha, rho in ((0.05, 2.0), (0.05, 1.0), (0.025, 3.0), (0.1, 2.0)):
            t = np.asarray(fractions, dtype=float)
            z = bounds(t, alpha, rho=rho, ztrun=8, sides=1, max_nints=1000).bounds
            z_refined = refined_bounds(t, alpha, rho=rho, ztrun=8, sides=1).bounds
            cases.append(
                {
                    "schedule": name,
                    "fractions": fractions,
                    "alpha": alpha,
                    "rho": rho,
                    "z": [float(v) for v in z],
                    "z_refined": [float(v) for v in z_refined],
                }
            )
    json.dump(
        {
            "source": f"spotify-confidence {version('spotify-confidence')}, "
            "sequential_bound_solver.bounds(t, alpha, rho, ztrun=8, sides=1, max_nints=1000); "
            "z_refined: the same with step 0.005, tolerance 1e-12, no max_nints",
            "cases": cases,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
