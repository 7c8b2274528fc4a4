"""The Jupyter adapter's reading of /api/status and /api/kernels (any transport): activity, busy kernels, no
endpoints, and the token never in an error."""

import json

import pytest

from dasklab.adapters.jupyter import JupyterApi
from dasklab.core.errors import JupyterUnreachable, NoEndpoints, SchedulerUnreachable
from dasklab.core.model import NO_JUPYTER

STATUS = {"started": "2026-12-02T04:00:00.000000Z", "last_activity": "2026-12-02T04:10:00.000000Z", "kernels": 2,
          "connections": 1}
KERNELS = [{"id": "a", "execution_state": "idle", "last_activity": "2026-12-02T04:05:00.000000Z"},
           {"id": "b", "execution_state": "busy", "last_activity": "2026-12-02T04:20:00.000000Z"}]


class Answers:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def get(self, path):
        self.calls.append(path)
        if self.fail:
            raise self.fail(f"http://127.0.0.1:1{path}: connection refused")
        return json.dumps(STATUS if path.startswith("/api/status") else KERNELS).encode()


def test_activity_is_the_latest_stamp_and_busy_kernels_are_counted_without_counting_as_activity():
    transport = Answers()
    got = JupyterApi(transport, "s3cret").fetch_activity()
    assert got.last_activity == 1796185200.0  # 2026-12-02T04:20:00Z, the busy kernel's last message
    assert (got.kernels, got.busy_kernels, got.running) == (2, 1, True)
    # the token in the query string (the API server's proxy strips Authorization); kernels read untracked
    assert transport.calls == ["/api/status?token=s3cret", "/api/kernels?no_track_activity=1&token=s3cret"]


def test_a_silent_jupyter_is_unreachable_and_the_error_never_carries_the_token():
    with pytest.raises(JupyterUnreachable) as e:
        JupyterApi(Answers(SchedulerUnreachable), "s3cret").fetch_activity()
    assert "s3cret" not in str(e.value) and e.value.__cause__ is None and "token=…" in str(e.value)


def test_no_pod_behind_the_service_is_no_jupyter():
    assert JupyterApi(Answers(NoEndpoints), "s3cret").fetch_activity() == NO_JUPYTER
