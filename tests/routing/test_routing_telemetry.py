"""Routing telemetry leaves the process: a router built from config pushes its metrics and GenAI
spans over OTLP/HTTP to `telemetry.metrics_endpoint`, every `export_interval_s`, tagged with
`telemetry.service_name`."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lagoon.config import load_config
from lagoon.protocols import ChatMessage
from lagoon.routing import build_router
from lagoon.routing.fault_server import FaultServer

pytestmark = pytest.mark.network


class _Collector(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


WANTED = {"lagoon_routing_classifications_total", "lagoon_routing_backend_calls_total", "lagoon_model_calls_total"}


def _names(received) -> set[str]:
    return {m.name for p, b in list(received) if p == "/v1/metrics"
            for rm in ExportMetricsServiceRequest.FromString(b).resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics}


def test_router_metrics_and_spans_reach_the_collector_on_the_interval():
    _Collector.received = []
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    try:
        with FaultServer() as cheap:
            cfg = load_config({
                "telemetry": {"metrics_endpoint": f"http://127.0.0.1:{collector.server_address[1]}/v1/metrics",
                              "export_interval_s": 0.2, "service_name": "lagoon-routing-test"},
                "routing": {"retrieval_bound": {"model": "coder", "endpoint": cheap.url + "/v1"}},
            })
            router = build_router(cfg)
            router.chat([ChatMessage("user", "fix the failing lint test")])
            deadline = time.monotonic() + 20  # no flush: the periodic reader must push on its own
            while time.monotonic() < deadline and not _names(_Collector.received) >= WANTED:
                time.sleep(0.05)
            on_interval = [b for p, b in _Collector.received if p == "/v1/metrics"]  # before any flush
            router.telemetry.flush()  # spans are batched: flush them (metrics were checked above)
            router.telemetry.shutdown()
            first_batch = list(_Collector.received)

            # the contrast: a 60 s interval pushes nothing in the same kind of wait
            _Collector.received = []
            slow = load_config(cfg.model_dump(), "telemetry.export_interval_s=60")
            quiet = build_router(slow)
            quiet.chat([ChatMessage("user", "fix the failing lint test")])
            time.sleep(0.8)
            assert not any(p == "/v1/metrics" for p, _ in _Collector.received), "pushed before the interval"
            quiet.telemetry.shutdown()
    finally:
        collector.shutdown()
    metrics = [ExportMetricsServiceRequest.FromString(b) for b in on_interval]
    assert metrics, "no metrics pushed within the export interval"
    names, services = set(), set()
    for req in metrics:
        for rm in req.resource_metrics:
            services.update(a.value.string_value for a in rm.resource.attributes if a.key == "service.name")
            for sm in rm.scope_metrics:
                names.update(m.name for m in sm.metrics)
    assert services == {"lagoon-routing-test"}
    assert WANTED <= names
    spans = [s for p, b in first_batch if p == "/v1/traces"
             for rs in ExportTraceServiceRequest.FromString(b).resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert any(s.name == "chat coder" for s in spans)
