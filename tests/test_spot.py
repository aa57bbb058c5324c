"""The spot notice reader against a stand-in metadata service on loopback: only AWS's notice counts as one, and a
slow service delays neither the reader nor the trial's look at the stop flag."""

import contextlib
import http.server
import json
import socket
import threading
import time

import pytest

from tune_alexnet.settings import redacted
from tune_alexnet.spot import REQUEST_DEADLINE_S, NoticeReader
from tune_alexnet.stopping import KV_NAMESPACE, POLL_S, STOP, TrialWatch, new_key


@pytest.fixture
def imds():
    """IMDSv2 on 127.0.0.1: a token, then whatever `answer` holds for the notice path (status, body)."""
    answer = {"notice": (404, b"")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            self._send(200, b"a-token")

        def do_GET(self):
            status, body = answer["notice"] if self.headers.get("X-aws-ec2-metadata-token") else (401, b"")
            answer["host"], answer["path"] = self.headers.get("Host"), self.path
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
    answer["notice"] = (200, b"[" * 4000)  # nested past Python's stack: a RecursionError ended the watcher
    assert reader.notice() is None
    # a user part in the endpoint goes into no header line (it was sent as the Host)
    answer["notice"] = (200, json.dumps(notice).encode())
    assert NoticeReader(url.replace("http://", "http://user:pw@")).notice() == notice
    assert answer["host"] == url.removeprefix("http://")
    # an endpoint with a path of its own is asked below it, as botocore asks (it was asked at the host's root)
    assert NoticeReader(url + "/prefix/").notice() == notice
    assert answer["path"] == "/prefix/latest/meta-data/spot/instance-action"


@pytest.mark.timeout(60)
def test_the_watcher_outlives_an_odd_answer_and_a_notice_the_node_outlives(imds, monkeypatch):
    """A notice read that raised ended the watcher's thread, which then missed every later notice; a notice kept
    up past the node's end (the service's, stale) held the trial, waiting for an end that never came, for ever."""
    from tune_alexnet import stopping

    url, answer = imds
    monkeypatch.setattr(stopping, "SPOT_POLL_S", 0.1)
    monkeypatch.setattr(stopping, "SPOT_HOLD_S", 1.0)
    raised = []

    def once_odd(self, notice=NoticeReader.notice):
        if not raised:
            raised.append(1)
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        return notice(self)

    monkeypatch.setattr(NoticeReader, "notice", once_odd)
    stale = {"action": "stop", "time": "2001-01-01T00:00:00Z"}
    answer["notice"] = (200, json.dumps(stale).encode())
    watch = TrialWatch(None, url)
    try:
        deadline = time.monotonic() + 10
        while watch.requested() != stopping.SPOT and time.monotonic() < deadline:
            time.sleep(0.05)
        assert raised and watch.requested() == stopping.SPOT
        start = time.monotonic()
        watch.hold()  # the trial saved its state: it waits for the node to go, as long as that may take
        assert 1.0 <= time.monotonic() - start < 5 and watch.requested() is None
        time.sleep(0.5)
        assert watch.requested() is None  # the same notice: heeded no more
        fresh = {"action": "terminate", "time": "2026-12-06T12:00:00Z"}
        answer["notice"] = (200, json.dumps(fresh).encode())
        deadline = time.monotonic() + 10
        while watch.requested() != stopping.SPOT and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watch.requested() == stopping.SPOT and watch.notice == fresh  # a new one is
    finally:
        watch.close()


@pytest.fixture
def slow_imds():
    """A metadata service on 127.0.0.1 that accepts each connection and then trickles a byte of headers every
    0.2 s for 20 s (a timeout on each read never fires); or, with `mode["hold"]`, answers in full, the notice
    included, and keeps the connection open."""
    listener, mode = socket.create_server(("127.0.0.1", 0)), {"hold": False}
    closed = threading.Event()
    notice = json.dumps({"action": "terminate", "time": "2026-12-04T12:00:00Z"}).encode()

    def trickle(conn):
        with conn:
            if mode["hold"]:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(notice), notice))
                closed.wait(20)
                return
            for byte in b"HTTP/1.0 200 OK\r\nX-Padding: " + b"x" * 100:
                if closed.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(bytes([byte]))

    def serve():
        with contextlib.suppress(OSError):
            while True:
                threading.Thread(target=trickle, args=(listener.accept()[0],), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", mode, json.loads(notice)
    closed.set()
    listener.close()


def test_a_metadata_service_that_trickles_gets_no_longer_than_the_deadline(slow_imds):
    url, mode, notice = slow_imds
    start = time.monotonic()
    assert NoticeReader(url).notice() is None
    assert time.monotonic() - start < 2 * REQUEST_DEADLINE_S + 0.5  # the token's request, then the notice's
    mode["hold"] = True  # a whole answer on a connection left open: read as far as it says, not to the deadline
    start = time.monotonic()
    assert NoticeReader(url).notice() == notice and time.monotonic() - start < REQUEST_DEADLINE_S


@pytest.mark.slow
def test_the_stop_flag_is_seen_on_time_while_the_metadata_service_trickles(ray_local, slow_imds):
    from ray.experimental import internal_kv

    key = new_key()
    watch = TrialWatch(key, slow_imds[0])
    try:
        time.sleep(2 * POLL_S)  # the watch is asking the service by now
        internal_kv._internal_kv_put(key, STOP, namespace=KV_NAMESPACE)
        raised = time.monotonic()
        while watch.requested() is None and time.monotonic() - raised < 10:
            time.sleep(0.05)
        assert watch.requested() == STOP and time.monotonic() - raised < 2 * POLL_S + 0.5
    finally:
        watch.close()
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)


def test_the_endpoint_is_found_as_botocore_finds_it(monkeypatch):
    from tune_alexnet import spot

    monkeypatch.setattr(spot, "on_ec2", lambda: True)  # (the firmware of an EC2 instance)
    assert spot.endpoint({}) == "http://169.254.169.254"
    assert spot.endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}) == "http://[fd00:ec2::254]"
    assert spot.endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1338/"}) == "http://127.0.0.1:1338"
    assert spot.endpoint({"AWS_EC2_METADATA_DISABLED": "True"}) is None
    assert spot.endpoint_problem({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "ipv7"}).endswith("allowed: IPv4 or IPv6")
    monkeypatch.setattr(spot, "on_ec2", lambda: False)
    assert spot.endpoint({"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}) is None  # a laptop sends no packet


@pytest.mark.parametrize("given", ["https://169.254.169.254", "http://", "http://[::1", "http://127.0.0.1:99999",
                                   "http://127.0.0.1:0", "http://admin:pa55/w0rd@127.0.0.1:1338",
                                   "http://127.0.0.1:1338/?x=1", "http://127.0.0.1:1338/a b"])  # fmt: skip
def test_an_endpoint_that_cannot_be_asked_is_refused_before_the_sweep_starts(given, synthetic_dir, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    """A trial that cannot ask the service misses every notice without a word: an https:// endpoint (which the
    service never speaks) ran a whole sweep deaf to them."""
    from tune_alexnet.cli import main

    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", given)
    storage = tmp_path / "results"
    argv = ["sweep", "--data-dir", str(synthetic_dir), "--storage", str(storage), "--optimizer", "sgd", "--lr",
            "0.01", "--batch-size", "32", "--dropout", "true", "--batchnorm", "true", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "pa55" not in err[-1]  # a password's start read as the port was named in the refusal
    assert err[-1].startswith(f"tune-alexnet sweep: error: AWS_EC2_METADATA_SERVICE_ENDPOINT={redacted(given)}: ")
    assert err[-1].endswith("allowed: an http:// URL of the instance metadata service") and "Traceback" not in err
    assert not storage.exists()
