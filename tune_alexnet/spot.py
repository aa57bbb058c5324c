"""The EC2 spot interruption notice, read from the instance metadata service (IMDSv2) of the node a trial runs on.

AWS posts `spot/instance-action` about two minutes before it takes a spot instance back; until then the path
answers 404. The endpoint is found as botocore finds it: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else the link-local
default, which is asked only on a machine whose firmware says it is an EC2 instance (so a laptop or another cloud
never sends a packet there), and never with `AWS_EC2_METADATA_DISABLED=true`. Every request ends within a second,
whatever the service does, and bypasses any proxy; a service that does not answer means no notice.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.parse
from pathlib import Path

ENDPOINT_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DISABLED_VAR = "AWS_EC2_METADATA_DISABLED"
MODE_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE"
DEFAULT_ENDPOINTS = {"ipv4": "http://169.254.169.254", "ipv6": "http://[fd00:ec2::254]"}  # by MODE_VAR, as botocore
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # what botocore asks for
REQUEST_DEADLINE_S = 1.0  # one request to the service, start to end: it is on the node itself, it answers in ms
BODY_LIMIT = 4096  # bytes of a notice or a token read at most
HEADER_LIMIT = 8192  # bytes of an answer's status line and headers
# Where the firmware names the machine's maker: "Amazon EC2" on Nitro instances, a "...amazon" version on Xen ones.
DMI_FILES = ("sys_vendor", "board_vendor", "bios_vendor", "bios_version")
DMI = Path("/sys/devices/virtual/dmi/id")


def on_ec2(dmi: Path = DMI) -> bool:
    for name in DMI_FILES:
        try:
            if "amazon" in (dmi / name).read_text(errors="replace").lower():
                return True
        except OSError:
            continue
    return False


def endpoint(env=None) -> str | None:
    """The metadata service to ask for notices on this node, or None where there is none to ask."""
    env = os.environ if env is None else env
    if env.get(DISABLED_VAR, "").strip().lower() == "true":
        return None
    if env.get(ENDPOINT_VAR, "").strip():
        return env[ENDPOINT_VAR].strip().rstrip("/")
    default = DEFAULT_ENDPOINTS.get(env.get(MODE_VAR, "").strip().lower() or "ipv4")
    return default if default and on_ec2() else None


def endpoint_problem(env=None) -> str | None:
    """Why the endpoint set in the environment cannot be asked (an https:// URL, no host, a bad port): checked
    before a sweep starts, since a trial that cannot ask would miss every notice without a word."""
    env = os.environ if env is None else env
    if env.get(DISABLED_VAR, "").strip().lower() == "true":
        return None
    mode = env.get(MODE_VAR, "").strip()
    if mode and mode.lower() not in DEFAULT_ENDPOINTS and not env.get(ENDPOINT_VAR, "").strip():
        return f"{MODE_VAR}={ascii(mode)[1:-1]}; allowed: IPv4 or IPv6"
    url = endpoint(env) if env.get(ENDPOINT_VAR, "").strip() else None
    if url is None or not (why := _url_problem(url)):
        return None
    given = ascii(env[ENDPOINT_VAR])[1:-1]
    return f"{ENDPOINT_VAR}={given}: {why}; allowed: an http:// URL of the instance metadata service"


def _url_problem(url: str) -> str | None:
    from .settings import uri_problem

    if why := uri_problem(url):  # (its words name no part of a password that reads as a port)
        return why
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return "the service is plain HTTP on the node itself"
    if parts.port == 0:
        return "port 0"
    if not url.isprintable() or " " in url:  # it goes into the request line
        return "a space or control character"
    if parts.query or parts.fragment or "#" in url:
        return "a query or fragment, which botocore would put before the path it asks"
    return None if parts.hostname else "no host"


class NoticeReader:
    """Asks one metadata service for the notice, with an IMDSv2 session token renewed before it expires (and
    IMDSv1's plain GET where the service issues no token)."""

    def __init__(self, url: str):
        self.url = url
        self.token: str | None = None
        self.token_until = 0.0

    def notice(self) -> dict | None:
        """The posted notice ({"action": ..., "time": ...}), or None: no notice, or no answer. Takes at most
        2 x REQUEST_DEADLINE_S, whatever the service does."""
        try:
            status, body = request(self.url, "GET", NOTICE_PATH, self._token_header())
        except (OSError, ValueError):
            return None
        if status == 401:  # the token expired early: a fresh one next time
            self.token = None
        if status != 200:
            return None
        try:
            notice = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            notice = None
        # AWS's notice names what it will do: a body without one (an empty page, a proxy's HTML) is no notice
        is_notice = isinstance(notice, dict) and notice.get("action") in ("terminate", "stop", "hibernate")
        return notice if is_notice else None

    def _token_header(self) -> dict:
        if self.token is None or time.monotonic() > self.token_until:
            status, body = request(
                self.url, "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
            )
            if status != 200:  # a service that issues no tokens (IMDSv1 only)
                return {}
            token = body.decode("ascii", "replace").strip()
            if not token.isprintable():  # it goes into a header line of ours
                return {}
            self.token = token
            self.token_until = time.monotonic() + TOKEN_TTL_S / 2
        return {"X-aws-ec2-metadata-token": self.token}


def request(
    url: str, method: str, path: str, headers: dict, deadline_s: float = REQUEST_DEADLINE_S
) -> tuple[int, bytes]:
    """(status, body) of one HTTP request to the service at `url`, all of it within `deadline_s`: the connection,
    the request and every byte of the answer. A timeout on each read would not do: a server that sends a byte now
    and then holds the caller for ever. Plain HTTP/1.0, no proxy (the service is on the node itself), a body of at
    most BODY_LIMIT bytes. TimeoutError when the deadline passes, OSError or ValueError for anything else."""
    deadline = time.monotonic() + deadline_s
    if why := _url_problem(url):
        raise ValueError(f"{url}: {why}; allowed: an http:// URL")
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # (a user part is no part of the Host header)
    path = parts.path.rstrip("/") + path  # below the endpoint's own path, as botocore asks
    lines = [f"{method} {path} HTTP/1.0", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()] + (["Content-Length: 0"] if method == "PUT" else [])
    answer = b""
    with socket.create_connection((parts.hostname, 80 if parts.port is None else parts.port), _left(deadline)) as conn:
        conn.settimeout(_left(deadline))
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        while len(answer) <= BODY_LIMIT + HEADER_LIMIT and not _whole(answer):
            conn.settimeout(_left(deadline))
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    head, sep, body = answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(status[1]), body[:BODY_LIMIT]


def _whole(answer: bytes) -> bool:
    """Whether an answer holds its headers and the body they announce (a server that keeps the connection open
    despite `Connection: close` is not waited for)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:] if sep else ():
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the metadata service did not answer in time")
    return left
