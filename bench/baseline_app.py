"""The ceiling: a bare Starlette app calling the champion's sklearn ``predict_proba`` directly.

No metrics, no prediction log, no pyfunc, no thread hop, no schema checks: parse the
``dataframe_split`` body with orjson, build a DataFrame, predict on the event loop, answer JSON.
``python -m bench.baseline_app --tracking-uri URI --model-uri models:/NAME@champion --port P``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import orjson
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def predict_body(model: Any, body: bytes) -> bytes:
    """One request's work: JSON in, ``{"predictions": [[p0, p1], ...]}`` out."""
    split = orjson.loads(body)["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    proba = model.predict_proba(frame)
    return orjson.dumps({"predictions": proba}, option=orjson.OPT_SERIALIZE_NUMPY)


def create_baseline_app(model: Any) -> Starlette:
    async def invocations(request: Request) -> Response:
        try:
            content = predict_body(model, await request.body())
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            error = {"error": {"code": "bad_request", "message": str(exc)}}
            return Response(orjson.dumps(error), status_code=400, media_type="application/json")
        return Response(content, media_type="application/json")

    async def ping(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    return Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
        ]
    )


def load_sklearn_model(tracking_uri: str, model_uri: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # import-time noise of MLflow's own modules
        import mlflow
        import mlflow.sklearn

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        return mlflow.sklearn.load_model(model_uri)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app", description=__doc__)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model-uri", required=True, help="e.g. models:/churn-predictor@champion")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    import uvicorn

    model = load_sklearn_model(args.tracking_uri, args.model_uri)
    uvicorn.run(
        create_baseline_app(model),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
