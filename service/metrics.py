"""Prometheus metrics of the API: one registry per app (so tests can build several apps in one process).

- `tl_http_requests_total{method,route,status}` and `tl_http_request_duration_seconds{method,route,status}`:
  every request, labelled by its route template (`/v1/jobs/{job_id}`), never by the raw path;
- `tl_predictions_total` (images) and `tl_predict_batch_images` (size of each micro-batch the model ran);
- `tl_model_load_seconds{backend}` and `tl_models_loaded`;
- `tl_jobs{status}`: jobs by status, read from Redis at scrape time; `tl_job_store_up` says whether it answered.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.middleware import is_inference, routed_path
from worker.jobstore import STATUSES

UNMATCHED_ROUTE = "<unmatched>"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """Every metric the API exports, registered in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("tl_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("tl_http_request_duration_seconds", "HTTP request latency by route and status",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.predictions = Counter("tl_predictions", "images classified", registry=self.registry)
        self.batch_images = Histogram("tl_predict_batch_images", "images per micro-batch run by a model",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.model_load = Histogram("tl_model_load_seconds", "time to load and warm up a model",
                                    ["backend"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                    registry=self.registry)
        self.models_loaded = Gauge("tl_models_loaded", "models held in the predict cache", registry=self.registry)
        self.jobs = Gauge("tl_jobs", "training jobs by status (read from Redis at scrape time)", ["status"],
                          registry=self.registry)
        self.job_store_up = Gauge("tl_job_store_up", "1 when Redis answered the last scrape", registry=self.registry)
        #: Predict requests of every protocol being answered now (`MetricsMiddleware` counts them): the
        #: micro-batcher runs a request on the event loop when it is the only one.
        self.inference_in_flight = 0
        # (method, route, status) -> the request counter's and the latency histogram's children: looked up once
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def predict_alone(self) -> bool:
        """Whether at most one predict request is being answered (the caller's own)."""
        return self.inference_in_flight <= 1

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        children = self._request_children.get(key)
        if children is None:
            labels = {"method": key[0], "route": key[1], "status": key[2]}
            children = (self.requests.labels(**labels), self.latency.labels(**labels))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def set_job_counts(self, counts: dict[str, int] | None) -> None:
        """Refresh `tl_jobs`; None means Redis did not answer (the last known counts stay)."""
        self.job_store_up.set(0 if counts is None else 1)
        for status in STATUSES:
            if counts is not None:
                self.jobs.labels(status=status).set(counts.get(status, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The path template of the route that handled (or would handle) this request."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", ()):
        try:
            match, _ = candidate.matches(scope)
        except Exception:  # a route that cannot match this scope type
            continue
        if match is Match.FULL:
            return str(getattr(candidate, "path", UNMATCHED_ROUTE))
    return UNMATCHED_ROUTE


class MetricsMiddleware:
    """Counts and times every HTTP request (the outermost layer, so 401 and 413 answers count too), and keeps
    `ServiceMetrics.inference_in_flight`, the predict requests of every protocol being answered."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        inference = is_inference(routed_path(scope))

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        if inference:
            self.metrics.inference_in_flight += 1
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if inference:
                self.metrics.inference_in_flight -= 1
            self.metrics.observe_request(scope["method"], route_template(scope), status[0],
                                         time.perf_counter() - started)
