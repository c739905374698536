"""The real model-server app (pipeline.serving.app.make_server) on 127.0.0.1 in a thread, for the
tests that drive it over HTTP: ``with ThreadServer(registry, drain_timeout_s=1) as s: s.port``."""

from __future__ import annotations

import socket
import threading
import time


class ThreadServer:
    def __init__(self, registry, *, start_timeout_s: float = 10.0, **options):
        from pipeline.serving.app import make_server

        self.registry = registry
        self.start_timeout_s = start_timeout_s
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"  # tritonclient's form; add http:// for urllib
        self.server = make_server(registry, "127.0.0.1", self.port, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
