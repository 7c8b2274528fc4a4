"""The dashboard adapter's reads: which HTTP calls a poll makes, and what it makes of the answers."""

import json

import pytest
from dasklab.adapters.dashboard import Dashboard
from dasklab.core.errors import SchedulerUnreachable


class Recorded:
    """A transport answering from a table of paths, recording every call."""

    def __init__(self, **counts):
        self.calls: list[str] = []
        self.answers = {"/json/counts.json": {"workers": 2, "processing": 0, "waiting": 0, "unrunnable": 0,
                                              "clients": 1, "desired_workers": 2, **counts},
                        "/api/v1/adaptive_target": {"workers": 4},
                        "/api/v1/check_idle": {"idle_since": 1234.5}}

    def get(self, path: str) -> bytes:
        self.calls.append(path)
        return json.dumps(self.answers[path]).encode()


def test_a_reconcile_poll_is_one_call():
    transport = Recorded()
    load = Dashboard(transport).fetch_load(idle=False)
    assert transport.calls == ["/json/counts.json"]
    assert (load.workers, load.adaptive_target, load.clients, load.idle_since) == (2, 2, 0, None)


def test_idleness_is_a_second_call_when_asked():
    transport = Recorded()
    assert Dashboard(transport).fetch_load(idle=True).idle_since == 1234.5
    assert transport.calls == ["/json/counts.json", "/api/v1/check_idle"]


def test_without_desired_workers_the_adaptive_target_is_asked():
    transport = Recorded()
    del transport.answers["/json/counts.json"]["desired_workers"]
    assert Dashboard(transport).fetch_load(idle=False).adaptive_target == 4
    assert transport.calls == ["/json/counts.json", "/api/v1/adaptive_target"]


def test_an_answer_that_is_not_json_is_an_unreachable_scheduler():
    class Html(Recorded):
        def get(self, path):
            return b"<html>502 Bad Gateway</html>"

    with pytest.raises(SchedulerUnreachable, match="counts.json: not JSON"):
        Dashboard(Html()).fetch_load()


class _Scheduler:
    """A scheduler's HTTP API on 127.0.0.1 whose retire_workers removes the workers, then fails as distributed
    < 2025.9.0 does (500 "keys must be str … not tuple") or answers after the client's timeout."""

    def __init__(self, failure: str, keep: set[str] = frozenset()):
        import http.server
        import threading
        self.workers = {"tcp://127.0.0.1:1": "w1", "tcp://127.0.0.1:2": "w2", "tcp://127.0.0.1:3": "w3"}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._answer(200, {"workers": [{"address": a, "name": n} for a, n in outer.workers.items()]})

            def do_POST(self):
                asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["workers"]
                for address in asked:
                    if address not in keep:  # a worker whose data could not move stays
                        outer.workers.pop(address, None)
                if failure == "timeout":
                    import time
                    time.sleep(1.0)
                    return self._answer(200, {a: {} for a in asked if a not in keep})
                self._answer(500, {"Error": "Internal Server Error"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("failure", ["500", "timeout"])
def test_a_failed_retire_call_reads_the_workers_again_and_counts_those_that_left(failure, caplog):
    from dasklab.adapters.dashboard import HttpTransport
    scheduler = _Scheduler(failure, keep={"tcp://127.0.0.1:2"})
    try:
        dashboard = Dashboard(HttpTransport(scheduler.url, timeout=0.5))
        retired = dashboard.apply_retire(["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"])
    finally:
        scheduler.close()
    assert retired == ["tcp://127.0.0.1:1"]  # w2 is still there: not retired, so its pod is kept
    line = json.loads(next(r.message for r in caplog.records if "retire-reread" in r.message))
    assert line["severity"] == "WARNING" and line["workers"] == ["tcp://127.0.0.1:1"]
    assert ("HTTP Error 500" if failure == "500" else "timed out") in line["reason"]
