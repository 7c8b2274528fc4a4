"""The HTTPS command entry point under functions-framework: callers verified from real RS256 ID tokens signed by a
test key pair (its certificate served as Google serves its own), the trust rules applied, the sender published."""

import base64
import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from dasklab.adapters.local import LocalBackend
from dasklab.core import config
from dasklab.core.trust import OWN_START, OWNER
from tests.test_cli import emulator_host, pump_control  # noqa: F401 (a fixture)
from tests.test_entry import local_env, outcomes  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]
URL = "https://us-central1-demo.cloudfunctions.net/dasklab-command"
ANN, BOB, ROOT = "ann@example.edu", "bob@example.edu", "root@example.edu"


def key_pair(kid: str):
    """An RSA key and its self-signed certificate, as {kid: PEM} (the format of Google's v1 certs endpoint)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return crypt.RSASigner.from_string(pem, key_id=kid), {kid: cert.public_bytes(serialization.Encoding.PEM).decode()}


SIGNER, CERTS = key_pair("test-key")
FORGER, _ = key_pair("test-key")  # same key id, another key: its signature cannot verify


def token(email: str, audience: str = URL, signer=SIGNER, **claims) -> str:
    now = int(time.time())
    body = {"iss": "https://accounts.google.com", "aud": audience, "sub": email, "email": email,
            "email_verified": True, "iat": now, "exp": now + 600, **claims}
    return jwt.encode(signer, body).decode()


@pytest.fixture
def certs_url():
    class Certs(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(CERTS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Certs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/certs"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def client(local_env, certs_url, monkeypatch):
    import functions_framework
    for name, value in {"COMMAND_URL": URL, "ID_TOKEN_CERTS_URL": certs_url, "ADMINS": ROOT}.items():
        monkeypatch.setenv(f"DASKLAB_{name}", value)
    config.current.cache_clear()
    app = functions_framework.create_app(target="command", source=str(REPO / "functions" / "main.py"),
                                         signature_type="http")
    return app.test_client()


def post(client, payload, bearer: str | None, request_id: str = ""):
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    if request_id:
        headers["X-Request-Id"] = request_id
    answer = client.post("/", data=json.dumps(payload), headers=headers, content_type="application/json")
    return answer.status_code, answer.get_json()


def test_a_start_labs_owner_is_its_verified_sender(client, local_env):
    code, answer = post(client, {"type": "start-lab", "lab": "lab-a"}, token(ANN))
    assert (code, answer["outcome"], answer["sender"]) == (202, "published", ANN)
    assert LocalBackend(local_env).fetch_lab("lab-a").spec.owner == ANN
    code, answer = post(client, {"type": "start-lab", "lab": "lab-b", "owner": ANN}, token(BOB))
    assert (code, answer["field"], answer["rule"]) == (403, "owner", OWN_START)
    assert LocalBackend(local_env).fetch_lab("lab-b") is None


def test_bob_is_refused_anns_lab_and_told_why_ann_may_stop_it(client, local_env):
    assert post(client, {"type": "start-lab", "lab": "lab-a"}, token(ANN))[0] == 202
    code, answer = post(client, {"type": "stop-lab", "lab": "lab-a"}, token(BOB), request_id="r-bob")
    assert (code, answer["field"], answer["rule"]) == (403, "lab", OWNER)
    assert "lab lab-a belongs to ann@example.edu, not bob@example.edu" in answer["reason"]
    told = [o for o in outcomes(local_env) if o.get("request_id") == "r-bob"]  # also on the status topic
    assert [(o["outcome"], o["rule"], o["lab"]) for o in told] == [("refused", OWNER, "lab-a")]
    assert LocalBackend(local_env).fetch_lab("lab-a") is not None
    code, answer = post(client, {"type": "stop-lab", "lab": "lab-a"}, token(ANN), request_id="r-ann")
    assert code == 202
    [outcome] = [o for o in outcomes(local_env) if o.get("request_id") == "r-ann"]
    assert (outcome["outcome"], outcome["message_id"]) == ("accepted", answer["message_id"])
    assert LocalBackend(local_env).fetch_lab("lab-a") is None


def test_an_administrator_acts_for_others(client, local_env):
    assert post(client, {"type": "start-lab", "lab": "lab-a", "owner": ANN}, token(ROOT))[0] == 202
    assert LocalBackend(local_env).fetch_lab("lab-a").spec.owner == ANN
    assert post(client, {"type": "scale", "lab": "lab-a", "max": 2}, token(ROOT))[0] == 202
    assert LocalBackend(local_env).fetch_lab("lab-a").spec.max_workers == 2


@pytest.mark.parametrize("bearer", [
    None,  # no token
    token(ANN, signer=FORGER),  # forged: signed by another key under the same key id
    token(ANN).rsplit(".", 1)[0] + ".",  # unsigned
    base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=") + "." + token(ANN).split(".")[1] + ".",
    token(ANN, audience="https://elsewhere.example.com"),  # for another service
    token(ANN, exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),  # expired
    token(ANN, iss="https://evil.example.com"),  # not Google's
], ids=["none", "forged", "unsigned", "alg-none", "wrong-audience", "expired", "issuer"])
def test_a_bad_token_is_401_and_nothing_is_published(client, local_env, bearer):
    code, answer = post(client, {"type": "start-lab", "lab": "lab-a"}, bearer)
    assert (code, answer["outcome"]) == (401, "unauthenticated")
    assert LocalBackend(local_env).fetch_lab("lab-a") is None and outcomes(local_env) == []


def test_a_bad_command_is_400_naming_the_field(client):
    code, answer = post(client, {"type": "scale", "lab": "Bad_Name", "max": 2}, token(ANN))
    assert (code, answer["field"]) == (400, "lab")
    code, answer = post(client, {"type": "nightly-teardown"}, token(ROOT))  # ticks are the timers' alone
    assert (code, answer["field"]) == (403, "type")


@pytest.mark.slow
def test_the_cli_sends_through_the_entry_point_and_hears_back_as_an_operator(emulator_host, certs_url, monkeypatch,
                                                                            capsys, home):
    """The CLI with DASKLAB_COMMAND_URL: its caller's ID token to the real entry point (a functions-framework app
    served on 127.0.0.1), which publishes with the sender on the emulator's control topic; a "function" thread runs
    each control message through handle_event; the CLI reads its outcome from a reply subscription it does not
    delete (an operator may not: it expires by itself)."""
    from werkzeug.serving import make_server

    import functions_framework
    from dasklab import entry
    from dasklab.adapters import idtokens, pubsub
    from dasklab.core.reconcile import Controller
    from tests.fakes import FakeBackend
    from tests.test_cli import main

    project = "entry-p1"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator_host)
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
    for topic in ("dasklab-control", "dasklab-status"):
        pubsub.ensure_topic(project, topic)
    pubsub.ensure_subscription(project, "dasklab-control", "trigger")
    ctl = Controller(FakeBackend(), pubsub.PubSubEvents(project, "dasklab-status"),
                     config.Config(backend="gke", project=project, admins=ROOT))
    monkeypatch.setattr(entry, "controller", lambda: ctl)
    app = functions_framework.create_app(target="command", source=str(REPO / "functions" / "main.py"),
                                         signature_type="http")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    url = f"http://127.0.0.1:{server.server_port}/"
    for name, value in {"HOME": str(home), "PROJECT": project, "COMMAND_URL": url, "ID_TOKEN_CERTS_URL": certs_url,
                        "ADMINS": ROOT}.items():
        monkeypatch.setenv(f"DASKLAB_{name}", value)
    monkeypatch.delenv("DASKLAB_REGION", raising=False)
    config.current.cache_clear()
    caller = {"who": ANN}
    monkeypatch.setattr(idtokens, "fetch_token", lambda audience: token(caller["who"], audience))
    stop = threading.Event()
    threads = [threading.Thread(target=server.serve_forever, daemon=True),
               threading.Thread(target=pump_control, args=(project, stop), daemon=True)]
    for t in threads:
        t.start()
    try:
        assert main("start-lab", "--lab", "lab-a", "--wait", "60") == 0
        out = capsys.readouterr().out
        assert f"to {url} as {ANN} (message " in out and "accepted: " in out
        assert ctl.backend.fetch_lab("lab-a").spec.owner == ANN
        caller["who"] = BOB
        assert main("stop-lab", "--lab", "lab-a", "--wait", "60") == 2  # bob is told why, at once
        err = capsys.readouterr().err
        assert "HTTP 403" in err and "belongs to ann@example.edu, not bob@example.edu" in err
        caller["who"] = ANN
        assert main("keep-alive", "--lab", "lab-a", "--for", "1h", "--wait", "60") == 0
        assert "done: kept alive until" in capsys.readouterr().out
    finally:
        stop.set()
        server.shutdown()
        for t in threads:
            t.join(timeout=10)
        pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
    listed = [s.name.rsplit("/", 1)[1] for s in pubsub.subscriber().list_subscriptions(project=f"projects/{project}")]
    assert "trigger" in listed and len(listed) == 4  # the three reply subscriptions: left to expire, not deleted
    pubsub.publisher.cache_clear(), pubsub.subscriber.cache_clear()
