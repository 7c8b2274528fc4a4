"""Google ID tokens adapter: the caller's verified identity from a signed token (google-auth), and the CLI's token
for the command entry point; google-auth's errors mapped to ours here alone."""

from google.auth import exceptions as gauth

from dasklab.core.errors import PermanentError, TransientError

GOOGLE_CERTS = "https://www.googleapis.com/oauth2/v1/certs"  # Google's ID-token signing certificates (x509 PEM)
ISSUERS = ("accounts.google.com", "https://accounts.google.com")  # an ID token Google signs names one of these


class Unauthenticated(PermanentError):
    """The request's token is missing, unsigned, forged, expired or for another audience: HTTP 401."""


def verify_caller(authorization: str, audience: list[str], certs_url: str = GOOGLE_CERTS) -> str:
    """The verified e-mail of an `Authorization: Bearer <ID token>` header: its RS256 signature checked against
    `certs_url`'s certificates, its audience against one of `audience` (the entry point's URL first), its expiry,
    its issuer."""
    from google.auth.transport.requests import Request
    from google.oauth2 import id_token
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("no bearer ID token: call with "
                              "`Authorization: Bearer $(gcloud auth print-identity-token)`")
    if not audience or not audience[0]:
        raise PermanentError("DASKLAB_COMMAND_URL is unset: the entry point cannot check its callers' audience")
    try:
        claims = id_token.verify_token(token.strip(), Request(), audience=audience, certs_url=certs_url,
                                       clock_skew_in_seconds=10)
    except gauth.TransportError as e:
        raise TransientError(f"fetching Google's token certificates: {e}") from e
    except (ValueError, gauth.GoogleAuthError) as e:  # bad signature, audience, expiry, malformed (InvalidValue…)
        raise Unauthenticated(f"ID token refused: {e}") from None
    if claims.get("iss") not in ISSUERS:
        raise Unauthenticated(f"ID token refused: issuer {claims.get('iss')!r} is not Google")
    if not claims.get("email") or claims.get("email_verified") is False:
        raise Unauthenticated("ID token refused: it names no verified e-mail (mint it with the email claim: "
                              "`gcloud auth print-identity-token`, or --include-email for a service account)")
    return str(claims["email"]).lower()


def fetch_token(audience: str) -> str:
    """An ID token for `audience` from the caller's own credentials: a service account's (Application Default
    Credentials: a key file, or the metadata server), else a person's gcloud login (`gcloud auth
    print-identity-token`, whose audience is gcloud's own client id: the entry point lists it in
    DASKLAB_TOKEN_AUDIENCES)."""
    import subprocess
    from google.auth.transport.requests import Request
    from google.oauth2 import id_token
    try:
        return id_token.fetch_id_token(Request(), audience)
    except gauth.TransportError as e:
        raise TransientError(f"fetching an ID token for {audience}: {e}") from e
    except gauth.DefaultCredentialsError:  # a person's user credentials mint no ID token for an audience
        pass
    try:
        out = subprocess.run(["gcloud", "auth", "print-identity-token"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PermanentError(f"no ID token for {audience}: {e} (log in with `gcloud auth login`)") from None
    if out.returncode != 0 or not out.stdout.strip():
        raise PermanentError(f"no ID token for {audience}: {out.stderr.strip()} (log in with `gcloud auth login`)")
    return out.stdout.strip()


def post_command(url: str, payload: dict, request_id: str, timeout: float = 60.0) -> dict:
    """Send a command to the HTTPS entry point with the caller's ID token: its answer (202: the message id); a
    refusal (4xx, naming the field and rule) raised as PermanentError, a 5xx or no answer as TransientError."""
    import json
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST", headers={
        "Authorization": f"Bearer {fetch_token(url)}", "Content-Type": "application/json",
        "X-Request-Id": request_id})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            said = json.loads(e.read() or b"{}")
        except ValueError:
            said = {}
        reason = said.get("reason") or e.reason
        if e.code < 500 and e.code != 429:
            raise PermanentError(f"refused by the entry point (HTTP {e.code}): {reason}") from None
        raise TransientError(f"the entry point answered HTTP {e.code}: {reason}") from None
    except (urllib.error.URLError, TimeoutError) as e:
        raise TransientError(f"the entry point {url} did not answer: {e}") from None
