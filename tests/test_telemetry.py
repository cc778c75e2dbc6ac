"""Telemetry: private registries, GenAI span attributes, alerts, and OTLP/HTTP export to a local receiver."""

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lagoon.config import TelemetrySection
from lagoon.telemetry import GenAI, Telemetry


def test_registries_are_private_per_instance():
    a, b = Telemetry(), Telemetry()
    a.inc("lagoon_things_total", labels={"kind": "x"})
    a.inc("lagoon_things_total", 2, labels={"kind": "x"})
    assert a.value("lagoon_things_total", {"kind": "x"}) == 3
    assert b.value("lagoon_things_total", {"kind": "x"}) is None
    b.set("lagoon_level", 7.5)
    assert b.value("lagoon_level") == 7.5 and b"lagoon_level 7.5" in b.prometheus_text()


def test_model_call_span_records_genai_attributes_and_metrics():
    t = Telemetry()
    with t.model_call_span(operation="chat", model="m1", provider="openai", max_tokens=64) as rec:
        rec.input_tokens, rec.output_tokens, rec.finish_reason = 11, 5, "stop"
    attrs = t.last_span_attributes
    assert attrs[GenAI.OPERATION_NAME] == "chat" and attrs[GenAI.REQUEST_MODEL] == "m1"
    assert attrs[GenAI.USAGE_INPUT_TOKENS] == 11 and attrs[GenAI.USAGE_OUTPUT_TOKENS] == 5
    assert t.value("lagoon_tokens_total", {"model": "m1", "type": "input"}) == 11
    assert t.value("lagoon_model_calls_total", {"operation": "chat", "model": "m1", "provider": "openai"}) == 1


def test_model_call_span_counts_errors():
    t = Telemetry()
    with pytest.raises(ValueError), t.model_call_span(operation="chat", model="m", provider="p"):
        raise ValueError("boom")
    assert t.last_span_attributes[GenAI.ERROR_TYPE] == "ValueError"
    labels = {"operation": "chat", "model": "m", "provider": "p", "error": "ValueError"}
    assert t.value("lagoon_model_call_errors_total", labels) == 1


def test_alert_logs_and_counts(caplog):
    t = Telemetry()
    with caplog.at_level(logging.WARNING, logger="lagoon.telemetry"):
        t.alert("reasoning_share", "share 0.55 > 0.40")
    assert "reasoning_share" in caplog.text
    assert t.value("lagoon_alerts_total", {"name": "reasoning_share"}) == 1


class _Receiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.network
def test_otlp_http_export_to_local_receiver():
    _Receiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        t = Telemetry(TelemetrySection(metrics_endpoint=f"http://127.0.0.1:{port}/v1/metrics", export_interval_s=60))
        t.inc("lagoon_classifications_total", labels={"type": "REASONING_BOUND"})
        t.set("lagoon_reasoning_share", 0.5)
        with t.model_call_span(operation="chat", model="m1", provider="local") as rec:
            rec.input_tokens = 3
        t.flush()
        t.shutdown()
    finally:
        server.shutdown()
    paths = {p for p, _ in _Receiver.received}
    assert "/v1/metrics" in paths and "/v1/traces" in paths
    names = set()
    for path, body in _Receiver.received:
        if path == "/v1/metrics":
            req = ExportMetricsServiceRequest.FromString(body)
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    names.update(m.name for m in sm.metrics)
    assert {"lagoon_classifications_total", "lagoon_reasoning_share", "lagoon_tokens_total"} <= names
    spans = [
        s
        for p, body in _Receiver.received
        if p == "/v1/traces"
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    ]
    assert any(s.name == "chat m1" for s in spans)
