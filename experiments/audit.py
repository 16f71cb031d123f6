"""The audit trail in MLflow: where evaluation runs go, how their tags are named, and the looks
the evaluator reads back from them.

:mod:`experiments.promote` writes one run per evaluation that is not a dry run (parameters,
metrics, tags, the reports), in the MLflow experiment :func:`tracking_experiment_name`; among its
parameters is the look's record (:func:`experiments.looks.record_params`). The next evaluation of
the same experiment reads those records here (:func:`read_looks`) to rebuild its sequence of looks.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from experiments.looks import LookHistory, RecordedLook, parse_record
from router.changes import TAG_PREFIX, tracking_experiment_name, translated

__all__ = ["TAG_PREFIX", "read_looks", "tracking_experiment_name"]


def read_looks(
    client: MlflowClient, model_name: str, experiment_id: str, planned: int
) -> LookHistory:
    """The looks recorded by earlier evaluations of ``experiment_id`` (their fractions over
    ``planned``, this evaluation's N*). An unreadable trail is an error, never an empty history:
    a look that cannot see the earlier ones would spend their α again."""
    with translated(f"reading the looks of {experiment_id!r} from the audit runs"):
        found = client.get_experiment_by_name(tracking_experiment_name(model_name))
        if found is None:
            return LookHistory()
        # Filter on the parameter in the query when the id can be quoted as it is (a model name
        # may hold quotes), and always here.
        query = "" if "'" in experiment_id else f"params.experiment_id = '{experiment_id}'"
        looks: list[RecordedLook] = []
        unrecorded: list[float] = []
        token: str | None = None
        while True:
            page = client.search_runs([found.experiment_id], query, page_token=token)
            for run in page:
                # Only evaluations look at the data: a split change of the same experiment
                # (router.splitrecord) is in the same trail, with no decision.
                if run.data.params.get("experiment_id") != experiment_id:
                    continue
                if f"{TAG_PREFIX}decision" not in run.data.tags:
                    continue
                record = parse_record(run.data.params, run.data.metrics, planned)
                if isinstance(record, RecordedLook):
                    looks.append(record)
                elif record is not None:
                    unrecorded.append(record)
            token = page.token
            if not token:
                break
    return LookHistory(tuple(looks), tuple(unrecorded))
