"""What happens when things go wrong, for real (README, 'What happens when things go wrong'): the train stage
run by subprocess, killed, its saved state damaged, its code edited, its tracking server killed mid-run,
its `dvc` killed; a full disk; a second trainer of the same run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import BIN, copy_project, finish, kill_server, mlflow_server, saved_step, wait_for_state
from tiny import GPT_RUN, tiny_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def stage(cwd: Path, *args: str, code: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
    """`python -m <args>` in `cwd`, importing the project's code from `code`."""
    full = {**os.environ, "PYTHONPATH": str(code), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", *args], cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def train(work: Path, out: str, *extra: str, **kw) -> subprocess.Popen:
    args = ["--tokenizer", "tokenizers/shakespeare-char", "--out", f"models/{out}", "--curve", f"curves/{out}.csv"]
    return stage(work, "stages.train", "gpt", *args, "--no-progress", *extra, **kw)


def same_weights(work: Path, a: str, b: str) -> None:
    for f in ("model.safetensors", "train.json"):
        assert (work / "models" / a / f).read_bytes() == (work / "models" / b / f).read_bytes(), f
    assert (work / "curves" / f"{a}.csv").read_bytes() == (work / "curves" / f"{b}.csv").read_bytes()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """shakespeare fetched and char-tokenized by the real stages (tracking off), and a reference run."""
    d = tmp_path_factory.mktemp("reliability")
    params = tiny_params({"gpt": GPT_RUN}, tokenizers=["shakespeare-char"], tracking=False)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["stages.fetch", "shakespeare", "--out", "data/shakespeare"],
        ["stages.tokenize", "shakespeare-char", "--data", "data/shakespeare", "--out", "tokenizers/shakespeare-char"],
        ["stages.train", "gpt", "--tokenizer", "tokenizers/shakespeare-char", "--out", "models/ref", "--curve",
         "curves/ref.csv", "--no-progress"],
    ):  # fmt: skip
        code, _, err = finish(stage(d, *args))
        assert code == 0, err
    return d


def kill_after_a_saved_state(p: subprocess.Popen, state: Path) -> int:
    wait_for_state(p, state, 200)
    p.send_signal(signal.SIGKILL)
    p.wait()
    return saved_step(state)


# ----------------------------------------------------------------------------------------------
# 1, 2: a saved state is resumed only if it is intact and was saved by the same code


def test_a_state_saved_by_other_code_is_not_resumed(work, tmp_path):
    code = tmp_path / "code"
    for pkg in ("lm", "stages"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    state = work / "models" / ".edited.resume"
    step = kill_after_a_saved_state(train(work, "edited", code=code), state)
    assert step >= 200
    trainer = code / "lm" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n# an edit: the schedule could have changed\n")

    rc, _, err = finish(train(work, "edited", code=code))
    assert rc == 0, err
    assert (
        "note: not resuming from models/.edited.resume: it was saved by other code (lm/trainer.py changed since); "
        "training from scratch" in err
    )
    same_weights(work, "ref", "edited")  # the edit was a comment: from scratch gives the reference exactly


def test_a_damaged_state_is_not_resumed(work):
    state = work / "models" / ".damaged.resume"
    kill_after_a_saved_state(train(work, "damaged"), state)
    data = bytearray((state / "state.safetensors").read_bytes())
    header = int.from_bytes(data[:8], "little")
    middle = 8 + header + (len(data) - 8 - header) // 2  # inside the tensors' bytes
    data[middle] ^= 0xFF
    data[middle + 1] ^= 0xFF
    (state / "state.safetensors").write_bytes(bytes(data))

    rc, _, err = finish(train(work, "damaged"))
    assert rc == 0, err
    assert re.search(r"note: not resuming from models/\.damaged\.resume: it is damaged: tensor '[^']+' does not "
                     r"match its sha256; training from scratch", err), err  # fmt: skip
    same_weights(work, "ref", "damaged")


# ----------------------------------------------------------------------------------------------
# 5: one trainer per run, and none outlives the `dvc` that started it


def test_a_second_trainer_of_the_same_run_is_refused(work):
    state = work / "models" / ".twice.resume"
    first = train(work, "twice")
    try:
        wait_for_state(first, state, 100)
        t0 = time.monotonic()
        rc, _, err = finish(train(work, "twice"))
        assert rc == 1 and time.monotonic() - t0 < 30
        assert f"error: train@gpt: train@gpt is already running in another process (pid {first.pid}" in err, err
        assert first.poll() is None  # the first one is untouched
    finally:
        first.kill()
        first.wait()


def test_sigterm_to_dvc_stops_the_trainer_and_a_rerun_resumes(repo_root, tmp_path):
    run = json.loads(json.dumps(GPT_RUN))
    run["train"]["max_steps"] = 2000
    params = tiny_params({"gpt": run}, tokenizers=["shakespeare-char"], tracking=False)
    project = copy_project(repo_root, tmp_path, params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    dvc = subprocess.Popen([str(BIN / "dvc"), "repro", "train@gpt"], cwd=project, env=env, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    state = project / "models" / ".gpt.resume"
    wait_for_state(dvc, state, 200)
    children = psutil.Process(dvc.pid).children(recursive=True)
    trainers = [p for p in children if "stages.train" in " ".join(p.cmdline())]
    assert trainers
    dvc.send_signal(signal.SIGTERM)  # dvc alone, as `kill <pid of dvc>` does
    _, alive = psutil.wait_procs(trainers, timeout=30)  # (dvc stays a zombie until we reap it: that is "gone")
    dvc.communicate(timeout=60)
    assert not alive, "the trainer outlived dvc"
    step = saved_step(state)
    assert 200 <= step < 2000  # it saved where it stopped

    r = subprocess.run([str(BIN / "dvc"), "repro", "train@gpt"], cwd=project, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from models/.gpt.resume at step {step}/2000" in r.stdout + r.stderr
    assert (project / "models" / "gpt" / "model.safetensors").is_file() and not state.exists()


# ----------------------------------------------------------------------------------------------
# 3, 7: the tracking server dies mid-run: the model is kept, the run is logged again later


def test_tracking_server_dying_mid_run_keeps_the_model(work, tmp_path, unused_port):
    server_dir = tmp_path / "mlflow"
    server_dir.mkdir()
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["tracking"] = {"enabled": True, "required": True, "experiment": "dying"}
    (work / "tracked.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with mlflow_server(server_dir, unused_port) as url:
        env = {"MLFLOW_TRACKING_URI": url}
        p = train(work, "tracked", "--params", "tracked.yaml", env=env)
        wait_for_state(p, work / "models" / ".tracked.resume", 100)  # the run is open and training
        kill_server(url)
        killed = time.monotonic()
        rc, out, err = finish(p)
    assert rc == 0, err
    assert time.monotonic() - killed < 90  # bounded retries, not MLflow's ~8 minutes
    assert f"warning: MLflow tracking at {url} failed to " in err, err
    same_weights(work, "ref", "tracked")  # the outputs are written, the state is gone
    assert not (work / "models" / ".tracked.resume").exists()
    relog = re.search(r"log it again later with: (python -m stages\.train .*--log-only)", err)
    assert relog, err

    with mlflow_server(server_dir, unused_port) as url:  # the same store, back up
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": url}
        cmd = relog[1].replace("python", sys.executable, 1)
        r = subprocess.run(cmd, shell=True, cwd=work, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        runs = _runs(url, "dying")
    by_status = {r["status"]: r for r in runs if r["name"] == "gpt (train)"}
    # The run the dead server left RUNNING is marked KILLED by the next start of the stage...
    assert by_status["KILLED"]["tags"]["lm.ended_by"].startswith("the next start of the same stage")
    # ... and the re-logged run has the curve, the final numbers and the files.
    again = by_status["FINISHED"]
    assert again["tags"]["lm.relogged"] == "true" and again["metrics"]["summary/steps"] == GPT_RUN["train"]["max_steps"]
    curve = (work / "curves" / "tracked.csv").read_text().splitlines()
    assert again["metrics"]["val_loss_est"] == pytest.approx(float(curve[-1].split(",")[3]), rel=1e-6)


def _runs(url: str, experiment: str) -> list[dict]:
    import urllib.parse
    import urllib.request

    def get(endpoint: str, **query: str) -> dict:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}") as r:
            return json.load(r)

    exp = get("experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    body = json.dumps({"experiment_ids": [exp], "max_results": 100}).encode()
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        raw = json.load(r)
    return [
        {
            "name": r["info"]["run_name"],
            "status": r["info"]["status"],
            "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])},
            "metrics": {m["key"]: m["value"] for m in r["data"].get("metrics", [])},
        }
        for r in raw.get("runs", [])
    ]
