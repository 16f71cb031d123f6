"""``python -m router.log {retention,views} --config config.yaml``: the log database's upkeep.

- ``retention [--dry-run] [--days N]``: removes old rows in bounded batches, never a running
  experiment's (``router/log/retention.py``); the experiment the registry's aliases give now is
  read from the registry, and the command fails rather than guess when it cannot be read.
- ``views``: creates the warehouse views (``router/log/warehouse.py``).

Exit 0 when done (also "nothing to remove"), 1 with one line on stderr on any error (registry or
database unreachable), 2 for bad arguments or a bad configuration (one line naming the key). Safe
to run from a CronJob at any time and from several places at once: each batch re-selects what is
still there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from router.config import (
    EXIT_BAD_CONFIG,
    ConfigError,
    Settings,
    config_error_line,
    load_settings,
)
from router.errors import RegistryUnavailable
from router.log.database import brief, create_engine
from router.log.retention import RetentionPlan, apply_retention, plan_retention
from router.log.warehouse import create_views
from router.logschema import experiment_id
from router.registry import ModelNotFound, Registry


def current_experiments(settings: Settings) -> set[str]:
    """The experiment of the registry's current aliases, as the routers resolve them (empty when
    there is no challenger: champion-only traffic is not an experiment)."""
    m = settings.model
    registry = Registry(m.tracking_uri, m.name)
    try:
        champion = registry.resolve_champion(m.champion_alias)
    except ModelNotFound:
        return set()  # no version at all: nothing is served, nothing judged
    challenger = registry.resolve_challenger(m.challenger_alias)
    if challenger is None or challenger.version == champion.version:
        return set()
    return {experiment_id(m.name, champion.version, challenger.version)}


def _plan_json(plan: RetentionPlan) -> dict[str, object]:
    return {
        "cutoff": plan.cutoff,
        "running": list(plan.running),
        "finished": list(plan.finished),
        "champion_only": list(plan.by_age),
    }


def retention(settings: Settings, days: float | None, dry_run: bool) -> dict[str, object]:
    days = days if days is not None else settings.prediction_log.retention_days
    if days is None:
        raise ConfigError("prediction_log.retention_days is not set (or pass --days)")
    current = current_experiments(settings)
    engine = create_engine(settings.prediction_log.url)
    try:
        plan = plan_retention(engine, days, current)
        if dry_run:
            return {"dry_run": True, **_plan_json(plan)}
        result = apply_retention(engine, plan, settings.prediction_log.retention_batch_rows)
    finally:
        engine.dispose()
    return {
        "dry_run": False,
        **_plan_json(plan),
        "rows_removed": result.removed,
        "outcomes_removed": result.outcomes_removed,
        "batches": result.batches,
    }


def views(settings: Settings) -> dict[str, object]:
    engine = create_engine(settings.prediction_log.url)
    try:
        with engine.begin() as conn:
            return {"views": create_views(conn)}
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.log", description=__doc__)
    parser.add_argument("--config", help="default $ROUTER_CONFIG, else config.yaml")
    commands = parser.add_subparsers(dest="command", required=True)
    keep = commands.add_parser("retention", help="remove old rows, never a running experiment's")
    keep.add_argument("--days", type=float, help="override prediction_log.retention_days")
    keep.add_argument("--dry-run", action="store_true", help="print the plan, remove nothing")
    commands.add_parser("views", help="create the warehouse views")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
        if args.command == "views":
            out = views(settings)
        else:
            if args.days is not None and not args.days > 0:
                raise ConfigError("--days must be > 0")
            out = retention(settings, args.days, args.dry_run)
    except ConfigError as exc:
        print(config_error_line(parser.prog, exc), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (RegistryUnavailable, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as exc:
        print(f"error: prediction log: {brief(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
