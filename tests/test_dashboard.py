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
