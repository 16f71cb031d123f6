"""``evaluate_and_promote`` and ``rollback``: the command-line entry points.

Exit codes (DESIGN.md): 0 promoted (or would promote, with ``--dry-run``), 3 rejected, 4
inconclusive, 5 invalid, 1 error (config, registry or database unreachable, aliases moved during
the evaluation, another promotion under way), reported as ONE line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from experiments.evaluate import EvaluationError, evaluate, make_client
from experiments.promote import apply, rollback
from experiments.report import text_table, write_html, write_json
from router.config import ConfigError, load_settings

EXIT_ERROR = 1


def _fail(prog: str, message: str) -> int:
    one_line = " ".join(message.split())  # drivers put hints on further lines
    print(f"{prog}: error: {one_line}", file=sys.stderr)
    return EXIT_ERROR


def evaluate_and_promote_main(argv: Sequence[str] | None = None) -> int:
    """Judge the current experiment, print the table, and promote when the decision says so."""
    parser = argparse.ArgumentParser(
        prog="evaluate_and_promote",
        description="Judge the champion/challenger experiment and promote the challenger if it "
        "is better (always-valid statistics: safe to run every hour).",
    )
    parser.add_argument(
        "--config", default=None, help="config file (default: $ROUTER_CONFIG or config.yaml)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="decide and report; write nothing to MLflow"
    )
    parser.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="write everything as JSON"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a self-contained HTML report",
    )
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        settings = load_settings(args.config)
        client = make_client(settings)
        evaluation = evaluate(settings, client=client)
        print(text_table(evaluation))
        if args.json is not None:
            write_json(evaluation, args.json)
        if args.report is not None:
            write_html(evaluation, args.report)
        if args.dry_run:
            verb = (
                "would promote" if evaluation.decision == "promote" else "would keep the champion"
            )
            print(f"dry run: {verb}; nothing written to MLflow.")
            return evaluation.exit_code
        with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
            artifacts = [Path(tmp) / "evaluation.json", Path(tmp) / "report.html"]
            write_json(evaluation, artifacts[0])
            write_html(evaluation, artifacts[1])
            result = apply(client, settings, evaluation, artifacts=artifacts)
        print(result.message)
    except (ConfigError, EvaluationError) as exc:
        return _fail(prog, str(exc))
    except OSError as exc:  # --json/--report paths, temp files
        return _fail(prog, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    return evaluation.exit_code


def rollback_main(argv: Sequence[str] | None = None) -> int:
    """Move ``@champion`` back to the ``@rollback`` version (audited like a promotion)."""
    parser = argparse.ArgumentParser(
        prog="rollback", description="Move @champion back to the @rollback version."
    )
    parser.add_argument(
        "--config", default=None, help="config file (default: $ROUTER_CONFIG or config.yaml)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        result = rollback(make_client(settings), settings)
    except (ConfigError, EvaluationError) as exc:
        return _fail(parser.prog, str(exc))
    print(result.message)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m experiments.cli` evaluates
    sys.exit(evaluate_and_promote_main())
