"""The tests' pytest fixtures: the repo root, the test corpora (served as the corpora mirror), a loopback HTTP
server, a free port and one torch thread. What the tests share besides fixtures is in tiny.py (corpora, params,
tiny configs) and helpers.py (real processes)."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import LoopbackServer
from tiny import FIXTURE_CORPORA, ROOT

# As the Makefile: Hugging Face caches stay inside the project, never ~/.cache, and never the network,
# also when pytest is run directly rather than through `make test`.
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "huggingface"))
os.environ.setdefault("HF_DATASETS_CACHE", str(ROOT / ".cache" / "huggingface" / "datasets"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Tests start their own tracking servers; a developer's exported URI must not capture their runs.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("LM_STUDY_RUN", None)
# Stages run by tests read the excerpts, never the full mirror the Makefile found beside the clone.
os.environ["LM_DATA_MIRROR"] = str(FIXTURE_CORPORA)
# Stages and scripts the tests start train tiny models with one thread each: faster than two fighting over the 2
# cores with pytest and dvc, and bit-stable on CPUs where two threads are not (a 2-core Intel Xeon, 2026-12-05:
# one fresh evaluation of names-wavenet in 8 differed in the 8th decimal with two threads, none of 30 with one).
os.environ["OMP_NUM_THREADS"] = "1"
# One llama.cpp build for every test, also for the stages run in temp copies of the project (whose own lm/ would
# otherwise look for it in the copy's .cache): the checkout's git-ignored cache, built once (lm/llamacpp.py).
os.environ.setdefault("LM_LLAMA_CPP_DIR", str(ROOT / ".cache" / "llama.cpp"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root (where params.yaml and dvc.yaml live)."""
    return ROOT


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The test corpora folder (excerpts), used as the corpora mirror (names.txt, tinyshakespeare.txt, ...)."""
    return FIXTURE_CORPORA


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    """A real HTTP server in a thread on a free loopback port (HTTP/1.0: one request per connection)."""
    state = LoopbackServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            r = state.next_response(self.path)
            self.send_response(r.status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(r.body) if r.content_length is None else r.content_length))
            self.end_headers()
            self.wfile.write(r.body)  # then the connection closes, short of a larger Content-Length

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unused_port() -> int:
    """A loopback port with nothing listening (bound then released: connections are refused)."""
    return free_port()


@pytest.fixture
def another_unused_port(unused_port: int) -> int:
    """A second such port, for a test that needs two servers at once or one after the other."""
    while (port := free_port()) == unused_port:
        pass
    return port


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster than two fighting (and than other processes on the box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
