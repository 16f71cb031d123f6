"""``set_weight --config C [WEIGHT]``: the fleet's traffic split, without HTTP.

With a weight: makes it the split of record of the experiment behind ``@champion`` and
``@challenger`` (``router/splitrecord.py``: under the registry's change lock, audited), exactly as
``PUT /admin/weights`` does; every worker of every replica follows within
``model.poll_interval_s``. Without one: prints the split in force and where it comes from.

Exit status: 0 done; 1 an error (one line on stderr: registry unreachable, no experiment running,
the aliases moved, another change under way); 2 bad arguments or a bad configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

from router.changes import actor, alias_versions
from router.config import EXIT_BAD_CONFIG, ConfigError, Settings, config_error_line, load_settings
from router.errors import RouterError
from router.logschema import serves_challenger
from router.redact import redact
from router.registry import connect
from router.registryfault import (
    REGISTRY_FAILURES,
    fail_fast_http,
    registry_unavailable,
    stdout_reserved,
)
from router.splitrecord import SplitTagInvalid, read_split, write_split

EXIT_ERROR = 1


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="set_weight",
        description="Set the challenger's share of traffic for every worker of every replica "
        "(the split of record in the registry, audited); without WEIGHT, show the split in "
        f"force. Exit codes: 0 done, 1 error, {EXIT_BAD_CONFIG} bad arguments or configuration.",
    )
    parser.add_argument(
        "--config", default=None, help="config file (default: $ROUTER_CONFIG or config.yaml)"
    )
    parser.add_argument("weight", nargs="?", type=_weight, help="challenger weight in [0, 1]")
    parser.add_argument("--reason", default="set_weight", help="why, for the audit run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _experiment(settings: Settings, aliases: dict[str, str]) -> tuple[str, str]:
    m = settings.model
    champion, challenger = aliases.get(m.champion_alias), aliases.get(m.challenger_alias)
    if champion is None or challenger is None or not serves_challenger(champion, challenger):
        raise ValueError(
            f"no experiment running: registered model {m.name!r} needs @{m.champion_alias} and a "
            f"distinct @{m.challenger_alias} (the split of record is kept on the challenger's "
            "version)"
        )
    return champion, challenger


def _run(args: argparse.Namespace, stdout: TextIO) -> int:
    settings = load_settings(args.config)
    client = connect(settings.model.tracking_uri)
    name = settings.model.name
    try:
        aliases = alias_versions(client, name)
    except REGISTRY_FAILURES as exc:
        raise registry_unavailable(settings.model.tracking_uri, exc) from exc
    champion, challenger = _experiment(settings, aliases)
    poll = settings.model.poll_interval_s
    if args.weight is None:
        split = read_split(client, settings, champion, challenger)
        result = {"champion": champion, "challenger": challenger, **split.to_json()}
        text = (
            f"v{champion} vs v{challenger}: challenger weight {split.challenger_weight:g} "
            f"(from {split.source}, epoch {split.epoch})"
        )
    else:
        record = write_split(
            client,
            settings,
            champion=champion,
            challenger=challenger,
            weight=args.weight,
            by=actor(),
            reason=args.reason,
        )
        by = datetime.fromtimestamp(record.changed_at + poll, UTC).isoformat(timespec="seconds")
        result = {
            "champion": champion,
            "challenger": challenger,
            "challenger_weight": record.challenger_weight,
            "previous": record.previous,
            "epoch": record.epoch,
            "audit_run_id": record.run_id,
            "in_force_everywhere_by": record.changed_at + poll,
        }
        text = (
            f"v{champion} vs v{challenger}: challenger weight {record.previous:g} -> "
            f"{record.challenger_weight:g} (epoch {record.epoch}, audit run {record.run_id}); "
            f"every router follows within model.poll_interval_s ({poll:g} s), by {by}"
        )
    print(json.dumps(result) if args.json else text, file=stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # MLflow prints "View run ..." to stdout when the audit run ends: stdout is the result's.
        with fail_fast_http(), stdout_reserved() as stdout:
            return _run(args, stdout)
    except ConfigError as exc:
        print(redact(config_error_line("set_weight", exc)), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (RouterError, SplitTagInvalid, ValueError) as exc:
        message = exc.message if isinstance(exc, RouterError) else str(exc)
        print(f"set_weight: error: {redact(' '.join(message.split()))}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover - python -m router.setweight
    sys.exit(main())
