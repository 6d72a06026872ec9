"""An `slm serve` app served from a thread of this process on a free port, for tests, benchmarks and
notebooks: `with serve_in_thread(create_app(run)) as url: ...` talks to it over real HTTP, as a client would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _ThreadServer(uvicorn.Server):
    """uvicorn's server with an event set once it has started, or failed to."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve app from a thread of this process on a free port and yield its URL once it is up; for tests,
    benchmarks and notebooks. The socket is bound here, so the port is known before uvicorn starts."""
    sock = socket.create_server((host, 0))
    server = _ThreadServer(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    with contextlib.closing(sock):
        thread.start()
        server.ready.wait()
        if not server.started:
            thread.join()
            raise RuntimeError("the server failed to start; see its log above")
        try:
            yield f"http://{host}:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join()
