"""Real processes for the tests: temporary copies of the project for real `dvc` runs, stages run as
`python -m`, real `mlflow server`s on 127.0.0.1, and the canned responses of the loopback HTTP server (the
``http_server`` fixture)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tiny import ROOT, tiny_params

BIN = Path(sys.executable).parent


TIMEOUT_S = 300
"""How long a test waits for one command (a stage, a benchmark) before it kills it."""


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s whole process group (it was started in a session of its own), so nothing it spawned (the
    fresh processes a benchmark measures in, DVC's stages) outlives a test that gave up on it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(cmd: list[str], *, timeout: float = TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with stdout and stderr captured as text, in a session of its own: when `timeout` fires, the
    command and everything it started are killed and the test fails naming the command and its output so far."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw
    ) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
            out, err = p.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd))}: no end after {timeout:g} s, killed:\n{out[-2000:]}\n"
                                 f"{err[-2000:]}") from None  # fmt: skip
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment `make` gives dvc: the venv first on PATH (stages run `python -m ...`), no analytics."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def sh(
    cwd: Path, *cmd: str, check: bool = True, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `cwd` in dvc_env() updated with `env` (a None value unsets a variable); with `check`, fail
    showing its output tails."""
    full = {k: v for k, v in {**dvc_env(), **(env or {})}.items() if v is not None}
    r = run(list(cmd), cwd=cwd, env=full, timeout=4 * TIMEOUT_S)  # a whole tiny `dvc repro` fits easily
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


GENERATED = ("dvc.lock", "metrics", "curves", "samples", "inside", "reports")
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


# ----------------------------------------------------------------------------------------------
# stages as processes


def stage(cwd: Path, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """`python -m <args>` in `cwd`, with this checkout importable and `env` added to the environment, in a session
    of its own; stdout and stderr captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw
    )  # fmt: skip


def finish(p: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for a `stage` process; past `timeout`, kill its process group and fail."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        raise AssertionError(f"{' '.join(p.args)}: no end after {timeout:g} s, killed:\n{err[-2000:]}") from None
    return p.returncode, out, err


def saved_step(state: Path) -> int:
    """The step of the training state saved in `state` (0 if none yet)."""
    try:
        return json.loads((state / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def wait_for_state(p: subprocess.Popen, state: Path, at_least: int) -> None:
    """Wait until the trainer `p` has saved a state of step `at_least` or later."""
    deadline = time.monotonic() + 120
    while saved_step(state) < at_least:
        assert p.poll() is None, f"finished before it could be interrupted: {p.communicate()}"
        assert time.monotonic() < deadline, "no training state appeared"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# the loopback HTTP server's canned responses


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
