"""A local HTTP server standing in for the official weights bucket, for tests only.

It serves files from a folder under their names on 127.0.0.1 (a thread of the test
process) and counts the requests per path, so tests can tell whether a load touched the
network. ``slow`` spreads each response over about that many seconds, so processes that
start together really overlap.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ReleaseServer:
    def __init__(self, folder: Path, slow: float = 0.0) -> None:
        self.folder, self.slow = folder, slow
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests[self.path.lstrip("/")] += 1
                if server.slow:
                    time.sleep(server.slow)
                super().do_GET()

            def log_message(self, *args):  # keep test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def __enter__(self) -> ReleaseServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
