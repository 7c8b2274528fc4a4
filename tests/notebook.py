"""A student at a notebook, through Jupyter Server's REST API (kernels) and its kernel websocket channels."""

import json
import time
import urllib.request
import uuid
from datetime import datetime, timezone

import websocket


class Notebook:
    def __init__(self, base_url: str, token: str):
        self.base, self.token = base_url.rstrip("/"), token
        self.session = uuid.uuid4().hex
        self.ws = None
        self.pending: dict[str, dict] = {}

    def rest(self, method: str, path: str, body: dict | None = None, token: bool = True):
        req = urllib.request.Request(self.base + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"} if token else {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def open(self) -> str:
        """Start a kernel (POST /api/kernels) and connect to its channels; returns its id."""
        kernel = self.rest("POST", "/api/kernels", {"name": "python3"})
        url = self.base.replace("http://", "ws://") + f"/api/kernels/{kernel['id']}/channels?token={self.token}"
        self.ws = websocket.create_connection(url, timeout=120)
        self.kernel = kernel["id"]
        return kernel["id"]

    def close(self) -> None:
        """Close the browser tab: the websocket goes, the kernel keeps running (the notebook is left open)."""
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def send(self, code: str) -> str:
        """An execute_request on the shell channel; returns its msg_id (the reply is read by `wait`)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "student",
                       "session": self.session, "date": datetime.now(timezone.utc).isoformat(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        self.pending[msg_id] = {"out": [], "reply": None, "idle": False}
        return msg_id

    def wait(self, msg_id: str, timeout: float = 120.0) -> str:
        """Read the channels until the cell is done; returns what it printed and its result, raises on an error."""
        deadline = time.monotonic() + timeout
        cell = self.pending[msg_id]
        while not (cell["reply"] and cell["idle"]):
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            msg = json.loads(self.ws.recv())
            parent = msg.get("parent_header", {}).get("msg_id")
            if parent not in self.pending:
                continue
            kind, content, got = msg["header"]["msg_type"], msg["content"], self.pending[parent]
            if kind == "stream":
                got["out"].append(content["text"])
            elif kind == "execute_result":
                got["out"].append(content["data"]["text/plain"])
            elif kind == "error":
                got["out"].append("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                got["idle"] = True
            elif kind == "execute_reply":
                got["reply"] = content["status"]
        if cell["reply"] != "ok":
            raise AssertionError(f"cell failed: {''.join(cell['out'])}")
        return "".join(cell["out"]).strip()

    def run(self, code: str, timeout: float = 120.0) -> str:
        return self.wait(self.send(code), timeout)


# The seed's 04-dask-array exercise (a large array, a transpose, a slice, a mean), with a deterministic array so
# the answer is known exactly: x[i, j] = j, so y = x + x.T has y[i, j] = i + j; z = y[::2, 2000:].mean(axis=1) is
# i + 2999.5 for even i < 4000, and z.sum() = (0 + 2 + … + 3998) + 2000 × 2999.5 = 3,998,000 + 5,999,000.
DASK_ARRAY_CELL = """
import dask.array as da
from distributed import Client
client = Client()  # DASK_SCHEDULER_ADDRESS: the lab's scheduler
x = da.ones((4000, 4000), chunks=(1000, 1000)) * da.arange(4000, chunks=1000)
y = x + x.T
z = y[::2, 2000:].mean(axis=1)
print(client.scheduler.address)
print(float(z.sum().compute()))
"""
DASK_ARRAY_SUM = 9_997_000.0
