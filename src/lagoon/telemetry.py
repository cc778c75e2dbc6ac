"""Metrics, model-call spans and alerts.

`Telemetry` owns a private Prometheus `CollectorRegistry` (so two instances, e.g. two tests, never
collide) and, when `telemetry.metrics_endpoint` is set, an OpenTelemetry `MeterProvider` that
pushes the same counters, gauges and histograms over OTLP/HTTP to that URL every
`export_interval_s`. Metric names are `lagoon_*` (Prometheus style); the OTLP copies carry the same
names.

`model_call_span` wraps one model call in an OpenTelemetry span named
``"{gen_ai.operation.name} {gen_ai.request.model}"`` (kind CLIENT) with the GenAI semantic-convention
attributes; the attribute strings are defined here because the semconv package keeps moving them.

Alerts (`alert`) log a warning and count `lagoon_alerts_total{name}`; they never raise.

This module is *not* a logging setup and holds no secrets: callers pass names and numbers only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from lagoon.config import TelemetrySection

__all__ = ["Telemetry", "GenAI", "ModelCallRecord"]

log = logging.getLogger("lagoon.telemetry")


class GenAI:
    """OpenTelemetry GenAI semantic-convention attribute names."""

    OPERATION_NAME = "gen_ai.operation.name"
    PROVIDER_NAME = "gen_ai.provider.name"
    REQUEST_MODEL = "gen_ai.request.model"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    RESPONSE_MODEL = "gen_ai.response.model"
    RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
    USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    ERROR_TYPE = "error.type"


_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ModelCallRecord:
    """Filled in by the caller inside `model_call_span` (tokens, response model, finish reason)."""

    def __init__(self) -> None:
        self.input_tokens = 0
        self.output_tokens = 0
        self.response_model: str | None = None
        self.finish_reason: str | None = None


class Telemetry:
    """A metrics registry with optional OTLP export, a GenAI span helper, and alerts."""

    def __init__(self, config: TelemetrySection | None = None) -> None:
        self.config = config or TelemetrySection()
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        self._otel: dict[str, Any] = {}
        self._gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._meter_provider = None
        self._meter = None
        self._tracer_provider = None
        self._tracer = None
        if self.config.metrics_endpoint:
            self._start_otlp(self.config.metrics_endpoint)

    # ------------------------------------------------------------------ metrics
    def _get(self, kind: type, name: str, doc: str, labels: Mapping[str, str] | None, **kw: Any) -> Any:
        key = name
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                metric = kind(name, doc or name, labelnames=sorted(labels or {}), registry=self.registry, **kw)
                self._metrics[key] = metric
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, amount: float = 1.0, labels: Mapping[str, str] | None = None, doc: str = "") -> None:
        """Add to a counter (`name` should end in `_total`)."""
        self._get(Counter, _strip_total(name), doc, labels).inc(amount)
        if self._meter is not None:
            self._otel_instrument("counter", name, doc).add(amount, dict(labels or {}))

    def set(self, name: str, value: float, labels: Mapping[str, str] | None = None, doc: str = "") -> None:
        """Set a gauge."""
        self._get(Gauge, name, doc, labels).set(value)
        if self._meter is not None:
            with self._lock:
                self._gauge_values[(name, tuple(sorted((labels or {}).items())))] = float(value)
            self._otel_instrument("gauge", name, doc)

    def observe(
        self,
        name: str,
        value: float,
        labels: Mapping[str, str] | None = None,
        doc: str = "",
        buckets: tuple[float, ...] = _DEFAULT_BUCKETS,
    ) -> None:
        """Record one observation in a histogram."""
        self._get(Histogram, name, doc, labels, buckets=buckets).observe(value)
        if self._meter is not None:
            self._otel_instrument("histogram", name, doc).record(value, dict(labels or {}))

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """Current value of a counter/gauge sample (for tests and reports); None when never set."""
        return _sample(self.registry, name, labels)

    def prometheus_text(self) -> bytes:
        """The registry in Prometheus text exposition format (what /metrics serves)."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ alerts
    def alert(self, name: str, message: str) -> None:
        """Log a warning and count it; never raises."""
        log.warning("ALERT %s: %s", name, message)
        self.inc("lagoon_alerts_total", labels={"name": name}, doc="Alerts raised, by name")

    # ------------------------------------------------------------------ spans
    @contextmanager
    def model_call_span(
        self,
        *,
        operation: str,
        model: str,
        provider: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[ModelCallRecord]:
        """Span + metrics for one model call. Set tokens etc. on the yielded record."""
        record = ModelCallRecord()
        attrs: dict[str, Any] = {
            GenAI.OPERATION_NAME: operation,
            GenAI.REQUEST_MODEL: model,
            GenAI.PROVIDER_NAME: provider,
        }
        if max_tokens is not None:
            attrs[GenAI.REQUEST_MAX_TOKENS] = max_tokens
        if temperature is not None:
            attrs[GenAI.REQUEST_TEMPERATURE] = temperature
        span = None
        if self._tracer is not None:
            from opentelemetry.trace import SpanKind

            span = self._tracer.start_span(f"{operation} {model}", kind=SpanKind.CLIENT, attributes=attrs)
        self.last_span_attributes = attrs
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield record
        except BaseException as exc:
            error = exc
            attrs[GenAI.ERROR_TYPE] = type(exc).__name__
            raise
        finally:
            elapsed = time.perf_counter() - start
            attrs[GenAI.USAGE_INPUT_TOKENS] = record.input_tokens
            attrs[GenAI.USAGE_OUTPUT_TOKENS] = record.output_tokens
            if record.response_model:
                attrs[GenAI.RESPONSE_MODEL] = record.response_model
            if record.finish_reason:
                attrs[GenAI.RESPONSE_FINISH_REASONS] = (record.finish_reason,)
            labels = {"operation": operation, "model": model, "provider": provider}
            self.observe("lagoon_model_call_duration_seconds", elapsed, labels, "Model call latency")
            self.inc("lagoon_model_calls_total", labels=labels, doc="Model calls")
            if error is not None:
                self.inc(
                    "lagoon_model_call_errors_total",
                    labels={**labels, "error": type(error).__name__},
                    doc="Failed model calls, by error type",
                )
            for kind, n in (("input", record.input_tokens), ("output", record.output_tokens)):
                if n:
                    self.inc("lagoon_tokens_total", n, {"model": model, "type": kind}, "Tokens by model and type")
            if span is not None:
                span.set_attributes({k: v for k, v in attrs.items() if v is not None})
                if error is not None:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.end()

    # ------------------------------------------------------------------ OTLP
    def _start_otlp(self, endpoint: str) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": self.config.service_name})
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=endpoint, timeout=5),
            export_interval_millis=self.config.export_interval_s * 1000,
        )
        self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        self._meter = self._meter_provider.get_meter("lagoon")
        traces = _sibling_traces_url(endpoint)
        if traces:
            self._tracer_provider = TracerProvider(resource=resource)
            self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces, timeout=5)))
            self._tracer = self._tracer_provider.get_tracer("lagoon")

    def _otel_instrument(self, kind: str, name: str, doc: str) -> Any:
        with self._lock:
            inst = self._otel.get(name)
            if inst is None:
                assert self._meter is not None
                if kind == "counter":
                    inst = self._meter.create_counter(name, description=doc)
                elif kind == "histogram":
                    inst = self._meter.create_histogram(name, description=doc, unit="s")
                else:
                    inst = self._meter.create_observable_gauge(name, callbacks=[self._gauge_callback(name)], description=doc)
                self._otel[name] = inst
        return inst

    def _gauge_callback(self, name: str) -> Any:
        from opentelemetry.metrics import Observation

        def callback(_options: Any) -> list[Observation]:
            with self._lock:
                items = [(k[1], v) for k, v in self._gauge_values.items() if k[0] == name]
            return [Observation(v, dict(labels)) for labels, v in items]

        return callback

    def flush(self) -> None:
        """Push pending OTLP metrics and spans now (no-op without an endpoint)."""
        if self._meter_provider is not None:
            self._meter_provider.force_flush()
        if self._tracer_provider is not None:
            self._tracer_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop the exporters."""
        if self._meter_provider is not None:
            self._meter_provider.shutdown()
            self._meter_provider = None
            self._meter = None
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
            self._tracer_provider = None
            self._tracer = None


def _strip_total(name: str) -> str:
    # prometheus_client appends `_total` to counters itself.
    return name[: -len("_total")] if name.endswith("_total") else name


def _sample(registry: CollectorRegistry, name: str, labels: Mapping[str, str] | None) -> float | None:
    return registry.get_sample_value(name, dict(labels or {}))


def _sibling_traces_url(endpoint: str) -> str | None:
    """Spans go to `.../v1/traces` when the metrics URL is a standard `.../v1/metrics` one."""
    if endpoint.rstrip("/").endswith("/v1/metrics"):
        return endpoint.rstrip("/")[: -len("/v1/metrics")] + "/v1/traces"
    return None
