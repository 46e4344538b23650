"""Shared fixtures: the repo root, the test corpora (served as the corpora mirror), a loopback HTTP server,
and temporary copies of the project for real `dvc` runs.

Test corpora. The corpora are never committed: the tests read them from the mirror of ../shared/corpora (or
LM_TEST_CORPORA), checked against their SOURCES.md sha256s, and cut short excerpts of each into the
git-ignored .cache/test-corpora/ (same file names, their own sha256s), so the suite runs in minutes and
every stage sees the real files' encoding quirks (BOM, CRLF, the Gutenberg header).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE_CORPORA = Path(os.environ.get("LM_TEST_CORPORA") or ROOT.parent / "shared" / "corpora")
"""Where the full corpora are: the offline mirror beside the clone (LM_TEST_CORPORA overrides)."""
SOURCE_SHA256 = {
    "names.txt": "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d",
    "tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "wonderful_wizard_of_oz.txt": "74a6f88582b1695274607c0a65d3cf89439757a947dd5ce9b44ae6f737b118ab",
    "dorothy_and_the_wizard_in_oz.txt": "5101b2fb76257a5f9035f0b9b5ff93a1dd86c4c1c326da20b7ea5e7a8b583651",
}
"""The full corpora the excerpts are cut from (../shared/corpora/SOURCES.md)."""
FIXTURE_CORPORA = ROOT / ".cache" / "test-corpora"


def _lines(raw: bytes, n: int, sep: bytes = b"\n") -> bytes:
    return sep.join(raw.split(sep)[:n]) + sep


def _excerpts(source: Path) -> dict[str, bytes]:
    """File name → excerpt: the first 2,000 names (no newline after the last, as the original); the first 1,500
    lines of Tiny Shakespeare; the first 900 lines of The Wonderful Wizard of Oz (its last tenth then has no
    character the rest lacks, as a char tokenizer needs); Dorothy and the Wizard in Oz's Gutenberg header and
    150 lines after it, then its last 10 lines (the footer)."""
    raw = {}
    for name, expected in SOURCE_SHA256.items():
        path = source / name
        if not path.is_file():
            raise pytest.UsageError(
                f"the tests read the corpora from {source}, which lacks {name}: put the offline mirror "
                "(names.txt, tinyshakespeare.txt, ...) at ../shared/corpora beside the clone, or set LM_TEST_CORPORA"
            )
        raw[name] = path.read_bytes()
        if hashlib.sha256(raw[name]).hexdigest() != expected:
            raise pytest.UsageError(f"{path} does not have the sha256 SOURCES.md gives ({expected}): a damaged copy")
    dorothy = raw["dorothy_and_the_wizard_in_oz.txt"].split(b"\r\n")
    start = next(i for i, line in enumerate(dorothy) if line.startswith(b"*** START OF"))
    return {
        "names.txt": b"\n".join(raw["names.txt"].split(b"\n")[:2000]),
        "tinyshakespeare.txt": _lines(raw["tinyshakespeare.txt"], 1500),
        "wonderful_wizard_of_oz.txt": _lines(raw["wonderful_wizard_of_oz.txt"], 900),
        "dorothy_and_the_wizard_in_oz.txt": b"\r\n".join(dorothy[: start + 151] + dorothy[-10:]),
    }


def _write_excerpts() -> dict[str, str]:
    """Cut the excerpts into FIXTURE_CORPORA (rewritten only where they differ); return name → sha256."""
    FIXTURE_CORPORA.mkdir(parents=True, exist_ok=True)
    sums = {}
    for name, data in _excerpts(SOURCE_CORPORA).items():
        path = FIXTURE_CORPORA / name
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


FIXTURE_SHA256 = _write_excerpts()
"""File name → sha256 of each test corpus excerpt."""

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


def on_fixtures(params: dict) -> dict:
    """`params` with every corpus pointing at its fixture excerpt (same file name, the fixture's sha256)."""
    for corpus in params["corpora"].values():
        corpus["sha256"] = FIXTURE_SHA256[corpus["filename"]]
    return params


def tiny_params() -> dict:
    """presets/tiny.yaml on the fixture corpora."""
    return on_fixtures(yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The project root (where params.yaml and dvc.yaml live)."""
    return ROOT


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The test corpora folder (excerpts), used as the corpora mirror (names.txt, tinyshakespeare.txt, ...)."""
    return FIXTURE_CORPORA


@dataclass
class Response:
    """One canned HTTP response; ``content_length`` overrides the header (a larger one truncates the body)."""

    body: bytes = b""
    status: int = 200
    content_length: int | None = None


@dataclass
class LoopbackServer:
    """An http.server on 127.0.0.1 serving canned responses; unknown paths get 404.

    ``serve(path, r1, r2, ...)`` makes successive requests to ``path`` get r1, r2, ... (the last one
    repeats), which lets a test script "503, then 200". ``requests`` lists the paths asked for.
    """

    port: int = 0
    routes: dict[str, list[Response]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, *responses: Response | bytes) -> str:
        self.routes[path] = [r if isinstance(r, Response) else Response(r) for r in responses]
        return self.url(path)

    def next_response(self, path: str) -> Response:
        queue = self.routes.get(path)
        if not queue:
            return Response(b"not found", status=404)
        return queue.pop(0) if len(queue) > 1 else queue[0]


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


@pytest.fixture
def unused_port() -> int:
    """A loopback port with nothing listening (bound then released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster than two fighting (and than other processes on the box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# temporary copies of the project, for real `dvc` runs


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment `make` gives dvc: the venv first on PATH (stages run `python -m ...`), no analytics."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def sh(cwd: Path, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in `cwd` (default environment: dvc_env()); with `check`, fail showing its output tails."""
    r = subprocess.run(cmd, cwd=cwd, env=env or dvc_env(), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


GENERATED = ("dvc.lock", "metrics", "curves", "samples", "reports")
"""Pipeline outputs tracked by git: a project copy starts without them."""


def copy_project(repo_root: Path, dst: Path, params: str | dict | None = None) -> Path:
    """`dst` as a user's fresh clone: the git-tracked files (working-tree versions) without the pipeline's
    outputs, `params` (default: the tiny preset on the fixture corpora) as params.yaml, committed in a git
    repo of its own. Returns `dst`."""
    params = tiny_params() if params is None else params
    params = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    # Tracked and new (not ignored) files: what the next commit holds, so tests run before it too.
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(cmd, cwd=repo_root, capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = repo_root / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f.decode())
    for generated in GENERATED:
        p = dst / generated
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (dst / "params.yaml").write_text(params)
    sh(dst, "git", "init", "-q")
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    return dst


@contextlib.contextmanager
def mlflow_server(d: Path, port: int) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:`port` (sqlite backend and proxied artifacts in `d`); yields its URL.

    Its own process group: the CLI starts uvicorn as a child, and teardown (or a test killing it) stops both
    by the group's id (`kill_server`)."""
    url = f"http://127.0.0.1:{port}"
    log = open(d / "server.log", "a")
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{d / 'mlflow.db'}",
        "--artifacts-destination",
        str(d / "artifacts"),
    ]
    # No job runner: it would start half a dozen queue consumers the tests never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    SERVERS[url] = proc
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{(d / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        kill_server(url, signal.SIGTERM)
        log.close()


SERVERS: dict[str, subprocess.Popen] = {}
"""The servers `mlflow_server` started, by URL."""


def kill_server(url: str, sig: int = signal.SIGKILL) -> None:
    """Stop the server at `url` and its workers (SIGKILL: as if its machine died)."""
    proc = SERVERS.pop(url, None)
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
