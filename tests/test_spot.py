"""The spot notice reader against a stand-in metadata service on loopback: only AWS's notice counts as one."""

import http.server
import json
import threading

import pytest

from tune_alexnet.spot import NoticeReader


@pytest.fixture
def imds():
    """IMDSv2 on 127.0.0.1: a token, then whatever `answer` holds for the notice path (status, body)."""
    answer = {"notice": (404, b"")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            self._send(200, b"a-token")

        def do_GET(self):
            status, body = answer["notice"] if self.headers.get("X-aws-ec2-metadata-token") else (401, b"")
            self._send(status, body)

        def _send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", answer
    server.shutdown()


def test_only_awss_notice_counts_as_one(imds):
    url, answer = imds
    reader = NoticeReader(url)
    assert reader.notice() is None  # 404: no notice
    for status, body in ((200, b""), (200, b"<html>a proxy's page</html>"), (200, b'{"action": "none"}')):
        answer["notice"] = (status, body)
        assert reader.notice() is None, body
    notice = {"action": "terminate", "time": "2026-12-04T12:00:00Z"}
    answer["notice"] = (200, json.dumps(notice).encode())
    assert reader.notice() == notice
