"""A small HTTP server that answers `GET /items/N` after a delay, like a slow API.

    python -m pipelines.slow_server --port 8000 --delay 0.05

It answers `{"n": N, "square": N*N}`, one thread per request, on 127.0.0.1 only.
"""

import argparse
import contextlib
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SlowHandler(BaseHTTPRequestHandler):
    """Answers `/items/N` with JSON after `server.delay` seconds; anything else is a 404."""

    server: "SlowServer"

    def do_GET(self) -> None:
        prefix, _, tail = self.path.rpartition("/")
        if prefix != "/items" or not tail.isdigit():
            self.send_error(404)
            return
        time.sleep(self.server.delay)
        n = int(tail)
        body = json.dumps({"n": n, "square": n * n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per request would drown the pipeline's own output."""


class SlowServer(ThreadingHTTPServer):
    """The server; `delay` is the time each answer takes."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, port: int = 0, delay: float = 0.05) -> None:
        super().__init__(("127.0.0.1", port), SlowHandler)
        self.delay = delay


def main() -> None:
    """Serve until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per answer")
    args = parser.parse_args()
    with SlowServer(args.port, args.delay) as server:
        print(f"serving on http://127.0.0.1:{server.server_port}, {args.delay}s per answer")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()


if __name__ == "__main__":
    main()
