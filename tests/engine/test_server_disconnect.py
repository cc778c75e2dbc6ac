"""A streaming client that disconnects cancels its generation for real: the slot is freed within a
decode step, as the active-request gauge and /health show (server on 127.0.0.1)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from lagoon.config import ServerSection
from lagoon.engine import load_model
from lagoon.engine.server import start_test_server
from lagoon.engine.tiny import save_tiny_model

pytestmark = pytest.mark.network

MAX_TOKENS = 3000  # seconds of decoding on the tiny model: a request that is not cancelled shows


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("dc") / "m", "llama", max_position_embeddings=4096)
    engine = load_model(folder, precision="float32")
    submitted, cancelled_at = [], {}
    submit = engine.submit

    def spy(*args, **kw):  # keeps the engine's real requests so the test can read their token counts
        req, stream = submit(*args, **kw)
        cancel = req.cancel

        def watch():
            cancelled_at.setdefault(req.id, len(req.output_ids))
            cancel()

        req.cancel = watch
        submitted.append(req)
        return req, stream

    engine.submit = spy
    # a paced decode (4 ms a token): a disconnect noticed late shows as hundreds of extra tokens
    engine.scheduler.on_token = lambda req, now: time.sleep(0.004)
    # an API key on, so the auth middleware is in the path (it once hid disconnects from streams)
    import os

    os.environ["LAGOON_DC_TEST_KEY"] = "k3y-for-the-test"
    base, stop = start_test_server(engine, server=ServerSection(api_key_env="LAGOON_DC_TEST_KEY"))
    yield engine, base, submitted, cancelled_at
    stop()
    engine.close()
    os.environ.pop("LAGOON_DC_TEST_KEY", None)


def _gauges(root: str) -> tuple[float, int]:
    headers = {"Authorization": "Bearer k3y-for-the-test"}
    metrics = httpx.get(f"{root}/metrics", headers=headers).text
    active = float(re.search(r"^lagoon_engine_active_requests (\S+)$", metrics, re.M).group(1))
    return active, httpx.get(f"{root}/health").json()["queued"]


@pytest.mark.parametrize("path,body", [
    ("chat/completions", {"messages": [{"role": "user", "content": "talk"}]}),
    ("completions", {"prompt": "talk"}),
])
def test_dropped_stream_frees_its_slot_within_a_decode_step(live, path, body):
    engine, base, submitted, cancelled_at = live
    root = base.removesuffix("/v1")
    body = {**body, "model": engine.name, "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    with httpx.Client(timeout=30, headers={"Authorization": "Bearer k3y-for-the-test"}) as client:
        with client.stream("POST", f"{base}/{path}", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
            assert _gauges(root) == (1.0, 1)  # decoding while the client reads
    at_close = len(submitted[-1].output_ids)  # the client is gone
    deadline = time.monotonic() + 20
    while _gauges(root) != (0.0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gauges(root) == (0.0, 0)
    req = submitted[-1]
    assert req.id in cancelled_at, "the disconnect never cancelled the engine request"
    # noticed within a few paced steps (not at max_tokens), then at most one more decode step
    assert cancelled_at[req.id] - at_close <= 25, (at_close, cancelled_at[req.id])
    assert len(req.output_ids) - cancelled_at[req.id] <= 1


def test_a_finished_stream_is_counted_by_status(live):
    engine, base, _, _ = live
    root = base.removesuffix("/v1")
    headers = {"Authorization": "Bearer k3y-for-the-test"}
    body = {"model": engine.name, "prompt": "hi", "stream": True, "max_tokens": 3}
    text = httpx.post(f"{base}/completions", json=body, headers=headers, timeout=30).text
    assert text.rstrip().endswith("data: [DONE]")
    assert httpx.post(f"{base}/completions", json=body, timeout=30).status_code == 401
    metrics = httpx.get(f"{root}/metrics", headers=headers).text
    assert re.search(r'lagoon_server_requests_total\{path="/v1/completions",status="200"\} [1-9]', metrics)
    assert re.search(r'lagoon_server_requests_total\{path="/v1/completions",status="401"\} [1-9]', metrics)


@pytest.mark.parametrize("path,body", [
    ("chat/completions", {"messages": [{"role": "user", "content": "talk"}]}),
    ("completions", {"prompt": "talk"}),
])
def test_a_plain_request_whose_client_gave_up_is_cancelled(live, path, body):
    engine, base, submitted, cancelled_at = live
    root = base.removesuffix("/v1")
    body = {**body, "model": engine.name, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    headers = {"Authorization": "Bearer k3y-for-the-test"}
    with pytest.raises(httpx.ReadTimeout):  # a client timeout: the connection is closed
        httpx.post(f"{base}/{path}", json=body, headers=headers, timeout=httpx.Timeout(30, read=0.5))
    deadline = time.monotonic() + 20
    while _gauges(root) != (0.0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _gauges(root) == (0.0, 0)
    req = submitted[-1]
    # 3000 paced tokens take 12 s or more; the request was stopped soon after the client left
    assert req.id in cancelled_at and cancelled_at[req.id] < MAX_TOKENS // 3, cancelled_at.get(req.id)
    assert len(req.output_ids) - cancelled_at[req.id] <= 1
