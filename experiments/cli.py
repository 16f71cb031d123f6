"""``evaluate_and_promote`` and ``rollback``: the command-line entry points and their exit codes.

The exit codes are the CLI's contract with scripts and CronJobs (README, "Exit codes"); the
domain's :class:`~experiments.judge.Evaluation` only carries a decision. Every failure is ONE
line on stderr, never a traceback: exit 2 for a bad configuration (as every command), else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from mlflow.exceptions import MlflowException

from experiments.decision import Decision
from experiments.evaluate import (
    AliasSnapshot,
    Evaluation,
    EvaluationError,
    evaluate,
    make_client,
    no_experiment_reason,
    plan,
    read_aliases,
)
from experiments.plan_report import plan_dict, plan_text
from experiments.promote import ActionResult, apply, rollback, sticky_rejection
from experiments.report import text_table, to_dict, write_html, write_json
from router.config import (
    EXIT_BAD_CONFIG,
    ConfigError,
    Settings,
    config_error_line,
    load_settings,
)
from router.errors import PredictionLogUnavailable, RegistryUnavailable
from router.redact import redact
from router.registryfault import describe, fail_fast_http, stdout_reserved

#: The exit code of each decision. 2 is argparse's (bad arguments) and a bad configuration's.
EXIT_CODES: Mapping[Decision, int] = {"promote": 0, "reject": 3, "inconclusive": 4, "invalid": 5}
EXIT_ERROR = 1
#: No ``@challenger`` (nothing is being tested, e.g. after a promotion or a rejection): a normal
#: state for a scheduled run, distinct from every decision; a CronJob treats it as success.
EXIT_NO_EXPERIMENT = 6
#: A ramp moved to its next stage (experiment.ramp): the experiment goes on at a higher weight.
EXIT_ADVANCED = 7
#: Codes a scheduler should treat as a successful run; 1 (error) and 5 (invalid) need a person.
NORMAL_EXIT_CODES = frozenset({0, 3, 4, EXIT_NO_EXPERIMENT, EXIT_ADVANCED})

STDOUT = "-"


def exit_code(decision: Decision) -> int:
    return EXIT_CODES[decision]


def evaluation_exit_code(evaluation: Evaluation) -> int:
    """The decision's code, or ``EXIT_ADVANCED`` when a ramp moves on (a real run and a dry run
    alike)."""
    if evaluation.advances_ramp:
        return EXIT_ADVANCED
    return exit_code(evaluation.decision)


def _fail(prog: str, message: str) -> int:
    return _say(f"{prog}: error: {message}", EXIT_ERROR)


def _say(line: str, code: int) -> int:
    print(redact(" ".join(line.split())), file=sys.stderr)  # drivers put hints on further lines
    return code


def _guarded(prog: str, debug: bool, run: Callable[[TextIO], int]) -> int:
    """The outermost layer: every failure becomes one line on stderr and exit 1 (2 for a bad
    configuration)."""
    try:
        with fail_fast_http(), stdout_reserved() as stdout:
            return run(stdout)
    except ConfigError as exc:
        return _say(config_error_line(prog, exc), EXIT_BAD_CONFIG)
    except (EvaluationError, RegistryUnavailable, PredictionLogUnavailable) as exc:
        return _fail(prog, str(exc))
    except MlflowException as exc:  # one the domain did not translate (e.g. an unsupported URI)
        return _fail(prog, f"MLflow: {describe(exc)}")
    except OSError as exc:  # --json/--report paths, temp files
        return _fail(prog, f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except Exception as exc:  # a bug: still one line; --debug shows the traceback
        if debug:
            raise
        return _fail(prog, f"unexpected {type(exc).__name__}: {exc} (rerun with --debug)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_and_promote",
        description="Judge the champion/challenger experiment; promote the challenger if it is "
        "better, end the experiment if it is worse (sequential statistics: each run is a look, "
        "safe to run every hour). Exit codes: 0 promoted, 3 rejected, 4 inconclusive, 5 invalid, "
        f"{EXIT_NO_EXPERIMENT} no experiment running (no @challenger), {EXIT_ADVANCED} a ramp "
        "advanced to its next stage, 1 error, "
        f"{EXIT_BAD_CONFIG} bad arguments or configuration.",
    )
    parser.add_argument(
        "--config", default=None, help="config file (default: $ROUTER_CONFIG or config.yaml)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="decide and report; write nothing to MLflow"
    )
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="write everything as JSON; '-' writes it to stdout (the table then goes to stderr)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a self-contained HTML report",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    parser.add_argument(
        "--plan",
        type=float,
        default=None,
        metavar="EFFECT",
        help="plan instead of judging: from the log so far, the N* (units) needed to promote a "
        "true improvement of EFFECT (the metric's units, positive = better) with 80%% power "
        "under the configured method, and when it is reached; writes nothing to MLflow",
    )
    return parser


def evaluate_and_promote_main(argv: Sequence[str] | None = None) -> int:
    """Judge the current experiment, print the table, and act on the decision."""
    parser = _parser()
    args = parser.parse_args(argv)

    def run(stdout: TextIO) -> int:
        # With --json - stdout carries the JSON document alone; people read stderr.
        human = sys.stderr if args.json == STDOUT else stdout
        return _run(args, human, stdout)

    return _guarded(parser.prog, args.debug, run)


def _run(args: argparse.Namespace, human: TextIO, stdout: TextIO) -> int:
    settings = load_settings(args.config)
    client = make_client(settings)
    aliases = read_aliases(client, settings)
    reason = no_experiment_reason(settings, aliases)
    if reason is not None:
        return _no_experiment(settings, aliases, reason, args, human, stdout)
    if args.plan is not None:
        eid, found = plan(settings, effect=args.plan, client=client, aliases=aliases)
        print(plan_text(eid, found), file=human)
        if args.json is not None:
            _write_document(plan_dict(eid, found), args.json, stdout)
        return 0
    evaluation = evaluate(settings, client=client, aliases=aliases)
    # A version rejected in this experiment stays rejected: dry runs report it too.
    evaluation = sticky_rejection(client, settings, evaluation)
    code = evaluation_exit_code(evaluation)
    print(text_table(evaluation), file=human)
    outcome = "ramp advanced" if code == EXIT_ADVANCED else evaluation.decision
    print(f"exit code {code} ({outcome})", file=human)
    if args.report is not None:
        write_html(evaluation, args.report)
    result: ActionResult | None = None
    if args.dry_run:
        print(f"dry run: {_would(evaluation)}; nothing written to MLflow.", file=human)
    else:
        with tempfile.TemporaryDirectory(prefix="evaluation-") as tmp:
            artifacts = [Path(tmp) / "evaluation.json", Path(tmp) / "report.html"]
            write_json(evaluation, artifacts[0])
            write_html(evaluation, artifacts[1])
            result = apply(client, settings, evaluation, artifacts=artifacts)
        print(result.message, file=human)
    if args.json is not None:
        document = {**to_dict(evaluation), "exit_code": code, "dry_run": args.dry_run}
        document["action"] = None if result is None else _action_dict(result)
        _write_document(document, args.json, stdout)
    return code


def _no_experiment(
    settings: Settings,
    aliases: AliasSnapshot,
    reason: str,
    args: argparse.Namespace,
    human: TextIO,
    stdout: TextIO,
) -> int:
    print(reason, file=human)
    print(f"exit code {EXIT_NO_EXPERIMENT} (no experiment)", file=human)
    if args.json is not None:
        document = {
            "decision": None,
            "reason": reason,
            "model_name": settings.model.name,
            "aliases": asdict(aliases),
            "exit_code": EXIT_NO_EXPERIMENT,
            "dry_run": args.dry_run,
            "action": None,
        }
        _write_document(document, args.json, stdout)
    return EXIT_NO_EXPERIMENT


def _would(evaluation: Evaluation) -> str:
    decision, ramp = evaluation.decision, evaluation.ramp
    if evaluation.advances_ramp and ramp is not None:
        return f"would move the split to the next stage's weight {ramp.next_weight:g}"
    if decision == "promote":
        return "would promote"
    if decision == "reject":
        return "would reject (remove @challenger)"
    return "would keep the champion and the experiment running"


def _action_dict(result: ActionResult) -> dict[str, Any]:
    return {
        "action": result.action,
        "run_id": result.run_id,
        "message": result.message,
        "aliases_before": asdict(result.aliases_before),
        "aliases_after": asdict(result.aliases_after),
    }


def _write_document(document: Mapping[str, Any], target: str, stdout: TextIO) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if target == STDOUT:
        stdout.write(text)
        stdout.flush()
    else:
        Path(target).write_text(text, encoding="utf-8")


def rollback_main(argv: Sequence[str] | None = None) -> int:
    """Move ``@champion`` back to the ``@rollback`` version (audited like a promotion)."""
    parser = argparse.ArgumentParser(
        prog="rollback",
        description="Move @champion back to the @rollback version (audited like a promotion). "
        f"Exit codes: 0 rolled back, {EXIT_ERROR} error (no @rollback, registry unreachable, "
        f"another promotion under way), {EXIT_BAD_CONFIG} bad arguments or configuration.",
    )
    parser.add_argument(
        "--config", default=None, help="config file (default: $ROUTER_CONFIG or config.yaml)"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    args = parser.parse_args(argv)

    def run(stdout: TextIO) -> int:
        settings = load_settings(args.config)
        print(rollback(make_client(settings), settings).message, file=stdout)
        return 0

    return _guarded(parser.prog, args.debug, run)


if __name__ == "__main__":  # pragma: no cover - `python -m experiments.cli` evaluates
    sys.exit(evaluate_and_promote_main())
