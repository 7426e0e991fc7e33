"""What an operator watches the service with: Prometheus metrics (`GET /metrics`) and one structured log line
per request.

Metrics are made per app (never at import), in a private registry, so tests can build many apps in one
process. Under `asirra serve --workers N` each worker writes its values to files in a folder the parent
made (prometheus-client's multiprocess mode, `PROMETHEUS_MULTIPROC_DIR`, chosen when the client is first
imported), and every scrape, whichever worker answers it, sums the files of all workers.

Every label takes a bounded set of values: site keys come from the sites file (an unknown key is refused
before anything is counted), routes are the app's route templates, refusal kinds a fixed list.

The access log carries no path, query, body, header, cookie or token: image URLs and challenge ids are
bearer values, an answer body is the answer, and a pass token is a pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Mapping

access_log = logging.getLogger("asirra.access")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Every refusal kind the service gives (ApiError.kind); the widget's error codes are these with dashes.
REFUSALS = ("rate_limited", "unavailable", "expired", "already_answered", "replaced", "unknown_challenge",
            "unknown_image", "bad_request", "unknown_sitekey", "hostname_not_allowed",
            "cross_site", "not_framed", "not_found")


class Metrics:
    """The service's counters and histograms, in a private registry or (`multiprocess`) shared through files."""

    def __init__(self, multiprocess: bool | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV)) if multiprocess is None else multiprocess
        self.registry = None if self.multiprocess else CollectorRegistry()
        # prometheus-client appends _total to counters.
        self.issued = Counter("asirra_challenges_issued", "Challenges issued, by site ('none': the service's own "
                              "page).", ["site"], registry=self.registry)
        self.answers = Counter("asirra_answers", "Challenges answered, by site and verdict (pass, almost, fail).",
                               ["site", "verdict"], registry=self.registry)
        self.refusals = Counter("asirra_refusals", "Requests refused, by kind (rate_limited, expired, ...).", ["kind"],
                                registry=self.registry)
        self.verify = Counter("asirra_verify", "/api/verify calls, by site and result (success or the error code).",
                              ["site", "result"], registry=self.registry)
        self.store_errors = Counter("asirra_store_errors", "Store operations that failed (Redis unreachable), by "
                                    "operation.", ["op"], registry=self.registry)
        self.latency = Histogram("asirra_request_duration_seconds", "Time to answer a request, by route template, "
                                 "method and status class.", ["route", "method", "status"], registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The scrape: the text exposition format and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = self.registry
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def route_of(scope: Mapping) -> str:
    """The route template a request matched ("/api/image/{token}", "/static"), never its raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class Observer:
    """Records one finished request: its latency in the histogram, its refusal, and its access-log line."""

    def __init__(self, metrics: Metrics, log_requests: bool = True):
        self.metrics = metrics
        self.log_requests = log_requests
        self._worker = os.getpid()

    def finished(self, scope: Mapping, status: int, seconds: float) -> None:
        route, method = route_of(scope), scope["method"]
        self.metrics.latency.labels(route, method, f"{status // 100}xx").observe(seconds)
        state = scope.get("state") or {}
        refusal = state.get("refusal")
        if refusal:
            self.metrics.refusals.labels(refusal).inc()
        if self.log_requests:
            fields = {"method": method, "route": route, "status": status, "ms": round(seconds * 1000, 2),
                      "client": state.get("ip", ""), "worker": self._worker}
            fields.update((name, state[name]) for name in ("site", "verdict", "refusal") if state.get(name))
            access_log.info("request", extra={"fields": fields})


# ---- log lines ----------------------------------------------------------------------------------


class LogFormatter(logging.Formatter):
    """`text`: the message, then key=value fields (logfmt); `json`: one object per line. For every logger."""

    def __init__(self, style: str = "text"):
        super().__init__()
        self.json = style == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        message = record.getMessage()
        if self.json:
            line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
                    "message": message, **fields}
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
            return json.dumps(line, default=str)
        text = " ".join([message, *(f"{key}={_logfmt(value)}" for key, value in fields.items())])
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def _logfmt(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=') else text


def log_config(style: str) -> dict:
    """A `logging.config.dictConfig` for uvicorn (`log_config=`): uvicorn's own lines and asirra's, all in `style`.

    uvicorn applies it in every worker process, so `--workers N` log alike.
    """
    formatter = {"()": "asirra.captcha.service.observe.LogFormatter", "style": style}
    handler = {"class": "logging.StreamHandler", "formatter": "asirra", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"asirra": formatter},
        "handlers": {"asirra": handler},
        "loggers": {"asirra": {"handlers": ["asirra"], "level": "INFO"},
                    **{name: {"handlers": ["asirra"], "level": "INFO", "propagate": False}
                       for name in ("uvicorn", "uvicorn.error")}},
    }


def use_log_format(style: str) -> None:
    """Lines already set up for asirra's logger (the command line's) in `style` from now on."""
    for handler in logging.getLogger("asirra").handlers:
        handler.setFormatter(LogFormatter(style))
