"""Adapter for the Kubernetes API server's pods/portforward over WebSocket: a local listening port whose every
connection gets its own stream to one port of one pod (what `dasklab connect` runs on the student's machine).

The protocol is the kubelet's (k8s.io/kubernetes pkg/kubelet/cri/streaming/portforward/websocket.go, served by the
API server since PortForwardWebsockets, beta in 1.31): subprotocol v4.channel.k8s.io, binary frames whose first byte
is the channel; for one port, channel 0 carries its bytes both ways and channel 1 an error text from the server;
each channel's first frame is the port number (uint16 little-endian). The stream ends when the pod's side closes.
"""

import errno
import select
import socket
import ssl
import threading
from http import HTTPStatus
from typing import Callable
from urllib.parse import quote, urlencode

import websocket
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.stream.ws_client import create_websocket

from dasklab.adapters.kube import translate
from dasklab.core.errors import DasklabError, TransientError

PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1  # the channels of the one forwarded port
CHUNK = 65536


def build_portforward_url(host: str, namespace: str, pod: str, port: int) -> str:
    """wss://HOST/api/v1/namespaces/NS/pods/POD/portforward?ports=PORT (ws:// for an http:// host)."""
    scheme, rest = host.split("://", 1)
    path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(pod)}/portforward"
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}{path}?{urlencode({'ports': port})}"


def open_stream(api: ApiClient, namespace: str, pod: str, port: int) -> websocket.WebSocket:
    """The upgraded connection to the pod's port, its two opening frames read. The API server's refusal of the
    upgrade (a Status body) goes through the kubernetes client's one table (adapters.kube.translate): 403 and 404 are
    ours to report; no answer is transient."""
    config = api.configuration
    bearer = (config.auth_settings().get("BearerToken") or {}).get("value")
    headers = {"sec-websocket-protocol": PROTOCOL, **({"authorization": bearer} if bearer else {})}
    what = f"port-forward to {namespace}/{pod}:{port}"
    try:
        ws = create_websocket(config, build_portforward_url(config.host, namespace, pod, port), headers)
    except websocket.WebSocketBadStatusException as e:
        body = e.resp_body.decode("utf-8", "replace") if isinstance(e.resp_body, bytes) else (e.resp_body or "")
        refusal = ApiException(status=e.status_code, reason=HTTPStatus(e.status_code).phrase)
        refusal.body = body
        raise translate(refusal, what) from e
    except (websocket.WebSocketException, OSError) as e:
        raise TransientError(f"{what}: {e}") from e
    try:
        for channel in (DATA, ERROR):  # the port number, first on each channel
            opcode, frame = ws.recv_data_frame(True)
            if opcode != websocket.ABNF.OPCODE_BINARY or frame.data[:1] != bytes((channel,)) or \
                    int.from_bytes(frame.data[1:], "little") != port:
                raise TransientError(f"{what}: unexpected opening frame {frame.data[:8]!r}")
    except (websocket.WebSocketException, OSError) as e:
        ws.close(timeout=1)
        raise TransientError(f"{what}: {e}") from e
    return ws


def bind_local(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket on `port`, or on a port the system picks when that one is taken (the socket is kept: no
    port is picked and then released)."""
    for attempt in (port, 0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, attempt))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or attempt == 0:
                raise
            continue
        sock.listen(64)
        return sock
    raise AssertionError("unreachable")


class Forward:
    """127.0.0.1:PORT → one pod's port: each accepted connection is spliced through its own stream from `opener`
    (a thread per connection; a browser opens a handful). `close` stops accepting, ends every connection and joins
    every thread."""

    def __init__(self, opener: Callable[[], websocket.WebSocket], port: int, host: str = "127.0.0.1",
                 on_error: Callable[[str], None] = lambda error: None):
        self.opener, self.wanted, self.on_error = opener, port, on_error
        self.listener = bind_local(port, host)
        self.port = self.listener.getsockname()[1]
        self.errors: list[str] = []  # what the streams said went wrong (a refusal, the pod's error channel)
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._wake, self._woken = socket.socketpair()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name=f"dasklab-forward-{self.port}", daemon=True)
        self._acceptor.start()

    @property
    def moved(self) -> bool:
        """The wanted port was taken: another one listens."""
        return self.wanted != 0 and self.port != self.wanted

    def _accept(self) -> None:
        while True:
            ready, _, _ = select.select([self.listener, self._woken], [], [])
            if self._woken in ready:
                return
            client, _ = self.listener.accept()
            with self._lock:
                if self._closed:
                    client.close()
                    return
                thread = threading.Thread(target=self._splice, args=(client,), daemon=True,
                                          name=f"dasklab-forward-{self.port}-conn")
                self._clients.add(client)
                self._threads.add(thread)
            thread.start()

    def _splice(self, client: socket.socket) -> None:
        try:
            try:
                ws = self.opener()
            except DasklabError as e:  # said once per connection; the browser sees the connection close
                self._said(str(e))
                return
            try:
                self._pump(client, ws)
            finally:
                ws.close(timeout=1)
        finally:
            with self._lock:
                self._clients.discard(client)
                self._threads.discard(threading.current_thread())
            client.close()

    def _pump(self, client: socket.socket, ws: websocket.WebSocket) -> None:
        while True:
            ready, _, _ = select.select([client, ws.sock], [], [])
            if ws.sock in ready:
                while True:  # every frame already read from the socket (TLS may hold more than select sees)
                    try:
                        opcode, frame = ws.recv_data_frame(True)
                    except (websocket.WebSocketException, OSError):
                        return
                    if opcode == websocket.ABNF.OPCODE_CLOSE:
                        return
                    if opcode == websocket.ABNF.OPCODE_BINARY and frame.data[:1] == bytes((DATA,)):
                        try:
                            client.sendall(frame.data[1:])
                        except OSError:
                            return
                    elif opcode == websocket.ABNF.OPCODE_BINARY and frame.data[:1] == bytes((ERROR,)):
                        self._said(frame.data[1:].decode("utf-8", "replace"))
                        return
                    if not (isinstance(ws.sock, ssl.SSLSocket) and ws.sock.pending()):
                        break
            if client in ready:
                try:
                    data = client.recv(CHUNK)
                except OSError:
                    return
                if not data:
                    return
                try:
                    ws.send_binary(bytes((DATA,)) + data)
                except (websocket.WebSocketException, OSError):
                    return

    def _said(self, error: str) -> None:
        self.errors.append(error)
        self.on_error(error)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake.send(b"x")
        self._acceptor.join(timeout=10)  # after it, no connection is added
        with self._lock:
            clients, threads = list(self._clients), list(self._threads)
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)  # wakes its thread's select: the connection ends
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=10)
        for sock in (self.listener, self._wake, self._woken):
            sock.close()
