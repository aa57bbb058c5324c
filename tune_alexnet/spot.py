"""The EC2 spot interruption notice, read from the instance metadata service (IMDSv2) of the node a trial runs on.

AWS posts `spot/instance-action` about two minutes before it takes a spot instance back; until then the path
answers 404. The endpoint is found as botocore finds it: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else the link-local
default, which is asked only on a machine whose firmware says it is an EC2 instance (so a laptop or another cloud
never sends a packet there), and never with `AWS_EC2_METADATA_DISABLED=true`. Every request is short and bypasses
any proxy; a service that does not answer means no notice.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

ENDPOINT_VAR = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
DISABLED_VAR = "AWS_EC2_METADATA_DISABLED"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 21600  # what botocore asks for
TIMEOUT_S = 1.0
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
    return DEFAULT_ENDPOINT if on_ec2() else None


class NoticeReader:
    """Asks one metadata service for the notice, with an IMDSv2 session token renewed before it expires (and
    IMDSv1's plain GET where the service issues no token)."""

    def __init__(self, url: str):
        self.url = url
        self.token: str | None = None
        self.token_until = 0.0
        # No proxy: the service is on the node itself, and a proxy would ask its own.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def notice(self) -> dict | None:
        """The posted notice ({"action": ..., "time": ...}), or None: no notice, or no answer."""
        try:
            headers = self._token_header()
            request = urllib.request.Request(self.url + NOTICE_PATH, headers=headers)
            with self.opener.open(request, timeout=TIMEOUT_S) as response:
                body = response.read(4096)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # the token expired early: a fresh one next time
                self.token = None
            return None
        except (OSError, ValueError):
            return None
        try:
            notice = json.loads(body)
        except ValueError:
            notice = None
        # AWS's notice names what it will do: a body without one (an empty page, a proxy's HTML) is no notice
        is_notice = isinstance(notice, dict) and notice.get("action") in ("terminate", "stop", "hibernate")
        return notice if is_notice else None

    def _token_header(self) -> dict:
        if self.token is None or time.monotonic() > self.token_until:
            request = urllib.request.Request(
                self.url + TOKEN_PATH, method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
            )
            try:
                with self.opener.open(request, timeout=TIMEOUT_S) as response:
                    self.token = response.read(1024).decode("ascii", "replace").strip()
                self.token_until = time.monotonic() + TOKEN_TTL_S / 2
            except urllib.error.HTTPError:  # a service that issues no tokens (IMDSv1 only)
                return {}
        return {"X-aws-ec2-metadata-token": self.token}
