"""MLflow tracking with real parts: a real `mlflow server` on 127.0.0.1, a real `dvc repro` of a
trimmed tiny study logging to it, the REST API to read back what was logged, a dead URI, and a
`dvc exp run --temp -S` that changes one param. The unit tests at the top need none of that."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lm.config import TrackingConfig, parse_params
from lm.provenance import dvc_md5
from lm.tracking import NullTracker, TrackingError, flatten, numeric_leaves, open_run, probe
from stages.mlflow_run import project_root, run_name, tracking_uri

from helpers import copy_project, mlflow_server, sh
from tiny import tiny_params

EXPERIMENT = "lm-ladder-tiny"
# The tiny preset trimmed to what the checks need (a char and a BPE corpus, a bigram and a GPT):
# nine stages instead of twenty-four, so the module costs one short pipeline run.
KEEP = {"tokenizers": ["names-char", "oz-bpe512"], "runs": ["names-bigram_nn", "oz-gpt-bpe512"]}


# ----------------------------------------------------------------------------------------------
# units: no server, no pipeline


def test_only_lm_tracking_imports_mlflow(repo_root: Path):
    importers = sorted(
        str(p.relative_to(repo_root))
        for d in ("lm", "stages")
        for p in (repo_root / d).rglob("*.py")
        if re.search(r"^\s*(import|from)\s+mlflow\b", p.read_text(), re.M)
    )
    assert importers == ["lm/tracking.py"]


def test_untracked_code_never_imports_mlflow():
    code = (
        "import sys, lm.tracking, lm.train_run, lm.evaluate, stages.train, stages.evaluate, stages.report, "
        "stages.fetch, stages.tokenize; from lm.tracking import open_run; from lm.config import TrackingConfig; "
        "t = open_run(TrackingConfig(enabled=False), 'http://127.0.0.1:9', 'x', params={}, tags={}); "
        "t.log_metrics({'a': 1.0}, 1); assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_flatten_and_numeric_leaves():
    assert flatten({"model": {"family": "gpt", "n_embd": 64}, "train": {"lr": 0.1, "step_at": [0.75]}, "x": None}) == {
        "model.family": "gpt",
        "model.n_embd": "64",
        "train.lr": "0.1",
        "train.step_at": "[0.75]",
        "x": "None",
    }
    assert numeric_leaves({"val/loss": 2.5, "params_by_component": {"head": 3}, "run": "a", "ok": True}) == {
        "val/loss": 2.5,
        "params_by_component/head": 3.0,
    }


def test_tracking_section_is_validated():
    base = {"corpora": {}, "tokenizers": {}}
    assert parse_params(base).tracking == TrackingConfig()
    with pytest.raises(ValueError) as e:
        parse_params({**base, "tracking": {"enabeld": False, "log_checkpoints": ["gtp"], "experiment": ""}})
    problems = e.value.problems  # type: ignore[attr-defined]
    assert any(p.startswith("tracking.enabeld: unknown key 'enabeld'") for p in problems)
    assert any("tracking.log_checkpoints: unknown families ['gtp']" in p for p in problems)
    assert any(p.startswith("tracking.experiment:") for p in problems)


def test_tracking_uri_and_project_root(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert project_root({}) == tmp_path.resolve()
    # dvc exp run --temp runs the stage in a copy but points DVC_ROOT at the original project.
    assert project_root({"DVC_ROOT": "/work/proj"}) == Path("/work/proj")
    assert tracking_uri(Path("/work/proj"), {}) == "sqlite:////work/proj/mlflow.db"
    assert tracking_uri(Path("/work/proj"), {"MLFLOW_TRACKING_URI": "http://h:5000"}) == "http://h:5000"


def test_dvc_md5_is_dvcs_directory_hash(tmp_path: Path):
    # The directory scheme of dvc_data (Tree.digest): independent of the order files were written in.
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(tmp_path / "d"), fs, "md5")
    assert dvc_md5(tmp_path / "d") == obj.hash_info.value
    assert dvc_md5(tmp_path / "d" / "b.txt") == "92eb5ffee6ae2fec3ad71c777531578f"


def test_unreachable_server_fails_fast_or_warns(unused_port: int):
    uri = f"http://127.0.0.1:{unused_port}"
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=re.escape(uri)):
        probe(uri)
    with pytest.raises(TrackingError, match="tracking.required: false"):
        open_run(TrackingConfig(), uri, "train@x", params={}, tags={})
    warnings: list[str] = []
    t = open_run(TrackingConfig(required=False), uri, "train@x", params={}, tags={}, warn=warnings.append)
    assert type(t) is NullTracker and uri in warnings[0]
    assert time.perf_counter() - t0 < 5


def test_a_parent_run_whose_dvc_process_is_gone_is_ended_by_the_next_stage_run(tmp_path):
    """kill -9 of a trainer (or of dvc) left the parent `repro ...` run RUNNING (11 after six kills): the next
    stage run marks KILLED each RUNNING parent of this machine whose dvc process is gone, and no other."""
    import psutil
    from mlflow.tracking import MlflowClient

    from lm.tracking import Group

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_start = psutil.Process(gone.pid).create_time()
    gone.wait()
    me = psutil.Process()
    cfg = TrackingConfig(experiment="orphans")
    dead = Group(f"dvc:{gone.pid}:{gone_start:.3f}", "repro (killed)")
    alive = Group(f"dvc:{me.pid}:{me.create_time():.3f}", "repro (still running)")
    user = Group("env:mine", "a group of the user's (LM_STUDY_RUN): no process to check")
    for group in (alive, user, dead):  # each open_run sweeps first: the dead parent is made last
        open_run(cfg, uri, f"x (train) {group.name}", params={}, tags={}, group=group, artifact_root=tmp_path, echo=str)
    # No stage ended: the three parents are RUNNING, as a kill -9 leaves them.
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("orphans").experiment_id

    def parents():
        found = client.search_runs([exp], "tags.`lm.role` = 'study'")
        return {r.info.run_name: (r.info.status, r.data.tags.get("lm.ended_by")) for r in found}

    assert {s for s, _ in parents().values()} == {"RUNNING"}
    open_run(cfg, uri, "y (train)", params={}, tags={}, group=alive, artifact_root=tmp_path, echo=str)
    assert parents() == {
        "repro (killed)": ("KILLED", "the next stage run (its dvc process was gone)"),
        "repro (still running)": ("RUNNING", None),
        "a group of the user's (LM_STUDY_RUN): no process to check": ("RUNNING", None),
    }


@pytest.mark.parametrize("how", ["deleted", "garbled"])  # (read-only: root writes it anyway)
def test_a_store_that_fails_mid_run_is_one_warning_not_pages_of_tracebacks(tmp_path, how):
    """mlflow.db deleted or made unwritable mid-run printed ~190 lines of SQLAlchemy tracebacks (MLflow's store
    logger, then its system-metrics thread, every sample) around the project's one-line warning."""
    script = f"""
import os, sys, time
from pathlib import Path
from lm.config import TrackingConfig
from lm.tracking import open_run
db = Path.cwd() / "mlflow.db"
t = open_run(TrackingConfig(experiment="e"), f"sqlite:///{{db}}", "x (train)", params={{}}, tags={{}},
             artifact_root=Path.cwd(), echo=str, warn=lambda s: print("WARN:", s, file=sys.stderr))
with t, t.system_metrics(sampling_interval=0.3):
    t.log_metrics({{"a": 1.0}}, step=1); t.flush()
    os.remove(db) if {how!r} == "deleted" else db.write_bytes(b"not a database" * 1000)
    for i in range(3):
        t.log_metrics({{"a": 1.0}}, step=i + 2); t.flush(); time.sleep(0.5)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MLFLOW_DISABLE_TELEMETRY": "true"}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "Creating initial MLflow database" not in x and "Updating" not in x]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("WARN: MLflow tracking at sqlite:") and "failed to" in lines[0]


def test_git_state_names_every_changed_input(tmp_path):
    """Unstaged (' M'), staged ('M '), new and untracked inputs all count, each named whole; outputs do not."""
    from lm.provenance import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    for f in ("params.yaml", "dvc.yaml", "metrics.json"):
        (tmp_path / f).write_text("a\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    assert git_state(tmp_path, ["params.yaml", "dvc.yaml", "lm"])["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("b\n")  # ' M params.yaml': the line starts with a space
    assert git_state(tmp_path, ["params.yaml", "dvc.yaml", "lm"])["git.dirty_files"] == "params.yaml"
    (tmp_path / "dvc.yaml").write_text("b\n")
    git("add", "dvc.yaml")  # 'M  dvc.yaml'
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "new.py").write_text("")  # '?? lm/'
    (tmp_path / "metrics.json").write_text("b\n")  # not an input
    state = git_state(tmp_path, ["params.yaml", "dvc.yaml", "lm"])
    assert state["git.dirty"] == "true"
    assert sorted(state["git.dirty_files"].split()) == ["dvc.yaml", "lm/", "params.yaml"]


# ----------------------------------------------------------------------------------------------
# deferred tracking (LM_TRACKING=deferred, what `make repro` sets): journal now, replay later


def open_both(tmp_path: Path, uri: str, journal: Path | None, fail: bool = False):
    """One run with every kind of call a stage makes, live (journal None) or deferred; `fail`: its block raises."""
    from lm.tracking import DatasetRef, Group

    (tmp_path / "split.bin").write_bytes(b"\x01\x02")
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    cfg = TrackingConfig(experiment="deferred")
    t = open_run(cfg, uri, "n-gpt (train)", params={"train.lr": "0.1"}, tags={"family": "gpt"}, echo=str,
                 group=Group("k", "repro (abc)"), artifact_root=tmp_path / "art", journal=journal,
                 description="d")  # fmt: skip
    with contextlib.suppress(RuntimeError), t:
        t.log_datasets([DatasetRef("n/train", tmp_path / "split.bin", "training", {"tokens": 2})])
        t.log_metrics({"train_loss": 3.0, "tokens_seen": 0}, 0)
        time.sleep(0.05)
        t.log_metrics({"train_loss": 2.5, "tokens_seen": 64}, 10)
        t.set_tags({"dtype": "float32"})
        t.log_artifact(tmp_path / "split.bin", name="curve.csv")
        t.log_artifact(tmp_path / "ckpt", "checkpoint")
        t.log_model("n-gpt", tmp_path / "ckpt", step=10)
        if fail:
            raise RuntimeError("diverged")
    return t


def stored(uri: str) -> dict[str, dict]:
    """Each run of the 'deferred' experiment by (name, id order) as what a reader compares."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("deferred").experiment_id
    out = []
    for r in c.search_runs([exp], "tags.`lm.role` = 'stage'", order_by=["attributes.start_time"]):
        i, t0 = r.info, r.info.start_time
        files = {f.path for f in c.list_artifacts(i.run_id)} | {
            f.path for f in c.list_artifacts(i.run_id, "checkpoint")
        }
        history = {
            k: [(m.step, m.value, m.timestamp - t0) for m in c.get_metric_history(i.run_id, k)] for k in r.data.metrics
        }
        datasets = [(d.dataset.name, d.dataset.digest, d.dataset.profile) for d in r.inputs.dataset_inputs]
        parent = (
            c.get_run(r.data.tags["mlflow.parentRunId"]).info.run_name if "mlflow.parentRunId" in r.data.tags else None
        )
        out.append({"name": i.run_name, "status": i.status, "ms": (i.end_time or t0) - t0, "params": r.data.params,
                    "tags": {k: v for k, v in r.data.tags.items() if k != "mlflow.parentRunId"}, "history": history,
                    "files": files, "datasets": datasets, "parent": parent})  # fmt: skip
    models = c.search_logged_models([exp])
    return {"runs": out, "models": sorted(m.name for m in models)}


def test_a_deferred_run_imports_no_mlflow_and_writes_a_journal(tmp_path: Path):
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from test_tracking import open_both; "
        f"open_both(Path({str(tmp_path)!r}), 'sqlite:///{tmp_path}/m.db', Path({str(tmp_path / 'journal')!r})); "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    (folder,) = (tmp_path / "journal").iterdir()
    assert folder.name.endswith("-n-gpt-train") and not (tmp_path / "m.db").exists()
    kinds = [json.loads(line)["kind"] for line in (folder / "events.jsonl").read_text().splitlines()]
    assert kinds == ["open", "datasets", "metrics", "metrics", "tags", "artifact", "artifact", "model", "end"]
    assert (folder / "files" / "1" / "curve.csv").read_bytes() == b"\x01\x02"  # kept under the name it is logged as


def test_a_replayed_journal_is_the_live_run(tmp_path: Path):
    """The same calls, live into one store and deferred then replayed into another, give the same run: name, parent,
    params, tags, metrics at their steps and their own times, artifacts, datasets, the logged model, duration."""
    from lm.journal import replay_all

    live, later = f"sqlite:///{tmp_path}/live.db", f"sqlite:///{tmp_path}/later.db"
    for fail in (False, True):
        open_both(tmp_path, live, None, fail)
        open_both(tmp_path, later, tmp_path / "journal", fail)
    assert len(list((tmp_path / "journal").iterdir())) == 2
    logged, failed = replay_all(tmp_path / "journal")
    assert (logged, failed) == (["n-gpt (train)", "n-gpt (train)"], []) and not list((tmp_path / "journal").iterdir())
    a, b = stored(live), stored(later)
    assert [r["status"] for r in b["runs"]] == ["FINISHED", "FAILED"] and b["models"] == a["models"] == ["n-gpt"] * 2
    for x, y in zip(a["runs"], b["runs"], strict=True):
        for key in ("name", "status", "params", "files", "datasets", "parent"):
            assert x[key] == y[key], key
        assert {k: v for k, v in x["tags"].items() if k != "mlflow.log-model.history"} == {
            k: v for k, v in y["tags"].items() if k != "mlflow.log-model.history"
        }
        assert x["history"].keys() == y["history"].keys() == {"train_loss", "tokens_seen"}
        for key, points in x["history"].items():
            assert [p[:2] for p in points] == [p[:2] for p in y["history"][key]]
            # The replayed times are the stage's own: the 50 ms between two evaluations shows in both (the offsets
            # from the start differ by the live run's own store calls before its first metric).
            gap = lambda pts: pts[1][2] - pts[0][2]  # noqa: E731
            assert gap(y["history"][key]) >= 50 and gap(y["history"][key]) == pytest.approx(gap(points), abs=30)
        # The run's duration is the stage's, not the replay's (which takes a few ms); the live one adds its logging.
        assert 50 <= y["ms"] <= x["ms"] + 30, (x["ms"], y["ms"])
    assert replay_all(tmp_path / "journal") == ([], [])  # nothing twice


def test_a_killed_stage_replays_as_killed_and_a_running_one_waits(tmp_path: Path):
    """A journal without its end line is a killed stage (its process is gone): KILLED, ending at its last call. One
    whose process still runs is left alone; a store that is down keeps the journal for the next try."""
    from mlflow.tracking import MlflowClient

    from lm.journal import replay_all

    uri = f"sqlite:///{tmp_path}/m.db"
    code = (
        "import os; from pathlib import Path; from lm.tracking import open_run; from lm.config import TrackingConfig; "
        f"t = open_run(TrackingConfig(experiment='deferred'), {uri!r}, 'killed (train)', params={{}}, tags={{}}, "
        f"echo=str, journal=Path({str(tmp_path / 'journal')!r})); t.log_metrics({{'loss': 1.0}}, 5); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    # This process's own run is still open: its journal waits.
    running = open_run(TrackingConfig(experiment="deferred"), uri, "running (train)", params={}, tags={}, echo=str,
                       journal=tmp_path / "journal")  # fmt: skip
    dead = "http://127.0.0.1:9"
    record = json.loads(
        (next((tmp_path / "journal").glob("*-killed-train")) / "events.jsonl").read_text().split("\n")[0]
    )
    for folder in (tmp_path / "journal").glob("*-killed-train"):  # point it at a dead server first
        lines = (folder / "events.jsonl").read_text().splitlines()
        (folder / "events.jsonl").write_text(
            "\n".join([json.dumps({**record, "record": {**record["record"], "uri": dead}}), *lines[1:]]) + "\n"
        )
    logged, failed = replay_all(tmp_path / "journal")
    assert logged == [] and len(failed) == 1 and f"MLflow tracking server {dead} is unreachable" in failed[0]
    assert sorted(p.name.split("-", 4)[-1] for p in (tmp_path / "journal").iterdir()) == [
        "killed-train",
        "running-train",
    ]
    for folder in (tmp_path / "journal").glob("*-killed-train"):
        (folder / "events.jsonl").write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    assert replay_all(tmp_path / "journal") == (["killed (train)"], [])
    c = MlflowClient(uri)
    (r,) = c.search_runs([c.get_experiment_by_name("deferred").experiment_id])
    (point,) = c.get_metric_history(r.info.run_id, "loss")
    assert (r.info.run_name, r.info.status, point.step, r.info.end_time) == (
        "killed (train)",
        "KILLED",
        5,
        point.timestamp,
    )
    with running:
        pass
    assert replay_all(tmp_path / "journal") == (["running (train)"], [])


def test_every_run_of_a_corpus_has_its_own_colour_in_the_ui(repo_root: Path):
    """MLflow's UI gives runs near-identical blues by default; the tag mlflow.runColor sets each: all the runs of
    one corpus differ (they are charted together), a run's train and evaluate share one, other stages have none."""
    from stages.mlflow_run import run_color

    cfg = parse_params(yaml.safe_load((repo_root / "params.yaml").read_text()))
    by_corpus: dict[str, list[str]] = {}
    for run, r in cfg.runs.items():
        by_corpus.setdefault(cfg.tokenizers[r.tokenizer].corpus, []).append(run_color(cfg, run))
    assert all(len(set(colours)) == len(colours) for colours in by_corpus.values()), by_corpus
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for colours in by_corpus.values() for c in colours)
    assert run_color(cfg, "") is None and run_color(cfg, "names") is None


def test_the_ui_links_fall_back_to_plain_urls_on_a_store_that_takes_no_writes(tmp_path: Path, monkeypatch):
    """lm ui writes its shared views to the experiment; a store that refuses (read-only, a server without write
    access) still gets links: the filter, sort and chart view in the URL (the columns are then picked by hand)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lm.tracking import SHARED_VIEW
    from lm.ui import views

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = MlflowClient(uri).create_experiment("shared")
    urls = views(uri, "shared", "http://ui", "oz", None)
    assert urls["best.png"].endswith("viewStateShareKey=lm-best")
    tags = MlflowClient(uri).get_experiment(exp).tags
    assert json.loads(tags[f"{SHARED_VIEW}lm-curves-oz"])["chartsSearchFilter"] == "bpc_est"

    def refuse(*args, **kwargs):
        raise MlflowException("attempt to write a readonly database")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    urls = views(uri, "shared", "http://ui", "oz", None)
    assert not any("viewStateShareKey" in u for u in urls.values())
    assert (
        "searchFilter=tags.corpus%20%3D%20%27oz%27" in urls["curves.png"]
        and "compareRunsMode=CHART" in urls["curves.png"]
    )
    assert "orderByKey=metrics.%60val/bpc%60&orderByAsc=true" in urls["best.png"]


def test_lm_tracking_must_be_a_known_mode(monkeypatch, capsys):
    from stages.mlflow_run import tracking_mode

    assert tracking_mode({}) == "live" and tracking_mode({"LM_TRACKING": "deferred"}) == "deferred"
    with pytest.raises(SystemExit):
        tracking_mode({"LM_TRACKING": "later"})
    assert "LM_TRACKING='later' is not a tracking mode: set it to live or deferred" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a real server, a real pipeline


class Rest:
    """The few MLflow REST calls the checks need, with urllib (no mlflow client on the reading side)."""

    def __init__(self, url: str):
        self.url = url

    def get(self, endpoint: str, **query: str) -> dict:
        with urllib.request.urlopen(
            f"{self.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}", timeout=30
        ) as r:
            return json.load(r)

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def runs(self) -> list[dict]:
        """Every run of the study's experiment, oldest first, as {name, id, status, params, tags, metrics}."""
        exp = self.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
        raw = self.post(
            "runs/search", {"experiment_ids": [exp], "max_results": 1000, "order_by": ["attributes.start_time ASC"]}
        )
        return [
            {
                "name": r["info"]["run_name"],
                "id": r["info"]["run_id"],
                "status": r["info"]["status"],
                "params": {p["key"]: p["value"] for p in r["data"].get("params", [])},
                "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])},
                "metrics": {m["key"]: m["value"] for m in r["data"].get("metrics", [])},
                "datasets": {
                    d["dataset"]["name"]: (d["dataset"]["digest"], {t["key"]: t["value"] for t in d.get("tags", [])})
                    for d in r.get("inputs", {}).get("dataset_inputs", [])
                },
            }
            for r in raw.get("runs", [])
        ]

    def runs_or_none(self) -> list[dict] | None:
        """The study's runs, or None while its experiment does not exist."""
        try:
            return self.runs()
        except urllib.error.HTTPError:
            return None

    def logged_models(self) -> list[dict]:
        """The experiment's MLflow 3 logged models, as their REST `info`."""
        exp = self.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]["experiment_id"]
        return [m["info"] for m in self.post("logged-models/search", {"experiment_ids": [exp]}).get("models", [])]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [
            (int(m["step"]), m["value"])
            for m in self.get("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        ]

    def artifacts(self, run_id: str, path: str = "") -> set[str]:
        """Every artifact file of a run, recursively."""
        out: set[str] = set()
        for f in self.get("artifacts/list", run_id=run_id, **({"path": path} if path else {})).get("files", []):
            out |= self.artifacts(run_id, f["path"]) if f["is_dir"] else {f["path"]}
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, unused_port_module: int) -> Iterator[Rest]:
    """`mlflow server` on a free loopback port: sqlite backend and proxied artifacts in a tmp dir."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), unused_port_module) as url:
        yield Rest(url)


@pytest.fixture(scope="module")
def unused_port_module() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_root: Path, mirror: Path, server: Rest) -> Path:
    """A copy of the repository with the trimmed tiny preset, after one `dvc repro` logging to `server`."""
    full = tiny_params()
    params = tiny_params({r: full["runs"][r] for r in KEEP["runs"]}, tokenizers=KEEP["tokenizers"])
    params["tracking"].update(enabled=True, experiment=EXPERIMENT)  # whatever the preset says
    os.environ["LM_DATA_MIRROR"] = str(mirror)
    dst = copy_project(repo_root, tmp_path_factory.mktemp("tracked"), params)
    sh(dst, "dvc", "repro", env={"MLFLOW_TRACKING_URI": server.url})
    # Committed as a user would, so experiments start from this baseline (and the tree is clean again).
    sh(dst, "git", "add", "-A")
    sh(dst, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro")
    return dst


def lock_md5(project: Path, stage: str, kind: str, path: str) -> str:
    entry = yaml.safe_load((project / "dvc.lock").read_text())["stages"][stage]
    return next(d["md5"] for d in entry[kind] if d["path"] == path)


def by_name(runs: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in runs}


@pytest.mark.slow
def test_every_stage_is_a_finished_run_under_one_parent(project: Path, server: Rest):
    runs = server.runs()
    stages = [r for r in runs if r["tags"].get("lm.role") == "stage"]
    parents = [r for r in runs if r["tags"].get("lm.role") == "study"]
    assert sorted(r["name"] for r in stages) == sorted(
        [
            "names (fetch)",
            "oz (fetch)",
            "names-char (tokenize)",
            "oz-bpe512 (tokenize)",
            "names-bigram_nn (train)",
            "oz-gpt-bpe512 (train)",
            "names-bigram_nn (evaluate)",
            "oz-gpt-bpe512 (evaluate)",
            "report",
            "finetune-report",  # no fine-tunes in the trimmed preset: an empty report, still a stage
            "gguf-report",  # nor GGUF exports: the same
        ]
    )
    assert len(parents) == 1 and parents[0]["name"].startswith("repro ") and parents[0]["status"] == "FINISHED"
    for r in stages:
        assert r["status"] == "FINISHED", r["name"]
        assert r["tags"]["mlflow.parentRunId"] == parents[0]["id"], r["name"]
        assert r["tags"]["lm.study_run"] == parents[0]["tags"]["lm.study_run"]
        assert run_name(r["tags"]["dvc.stage"]) == r["name"]  # names lead with what differs; the tag keeps the stage
        assert r["tags"]["mlflow.note.content"], r["name"]  # a description a person reads
    colour = {r["name"]: r["tags"].get("mlflow.runColor") for r in stages}
    assert colour["names-bigram_nn (train)"] == colour["names-bigram_nn (evaluate)"] is not None
    assert colour["names (fetch)"] is None and colour["report"] is None


@pytest.mark.slow
def test_train_run_logs_params_curve_tags_and_artifacts(project: Path, server: Rest):
    runs = by_name(server.runs())
    r = runs["names-bigram_nn (train)"]
    assert r["tags"]["mlflow.note.content"] == (
        "bigram_nn on names (names-char: char); no settings; 20 steps × batch 32, lr 0.1"
    )
    # Every resolved param, flattened, defaults included; exactly as params.yaml says.
    entry = yaml.safe_load((project / "params.yaml").read_text())["runs"]["names-bigram_nn"]
    assert r["params"]["tokenizer"] == "names-char" and r["params"]["corpus"] == "names"
    assert r["params"]["model.family"] == "bigram_nn"
    for key, value in entry["train"].items():
        assert r["params"][f"train.{key}"] == str(value), key
    assert r["params"]["train.optimizer"] == "adamw" and r["params"]["train.beta2"] == "0.99"  # defaults
    # One point per evaluation, the same numbers as the curve CSV DVC plots.
    with open(project / "curves" / "names-bigram_nn.csv") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == entry["train"]["max_steps"] // entry["train"]["eval_interval"] == 2
    # MLflow's names: tokens_seen (an x-axis across batch sizes) and val_loss_est (a fixed-subset estimate;
    # the whole-split number is the evaluate run's val/loss); both start with a step-0 evaluation.
    for key, column in (("tokens_seen", "tokens"), ("train_loss", "train_loss"), ("val_loss_est", "val_loss"),
                        ("lr", "lr")):  # fmt: skip
        history = [(s, v) for s, v in server.history(r["id"], key) if s > 0]
        assert [s for s, _ in history] == [int(row["step"]) for row in curve], key
        assert [v for _, v in history] == pytest.approx([float(row[column]) for row in curve], rel=1e-6), key
    start = dict(server.history(r["id"], "val_loss_est"))[0]
    assert abs(start - math.log(27)) < 0.1 and dict(server.history(r["id"], "tokens_seen"))[0] == 0
    stats = json.loads((project / "tokenizers" / "names-char" / "stats.json").read_text())
    bpc = [v for s, v in server.history(r["id"], "val_bpc_est") if s > 0]
    per_char = math.log(2) * stats["splits"]["val"]["chars_per_token"]
    assert bpc == pytest.approx([float(row["val_loss"]) / per_char for row in curve], rel=1e-6)
    # Wall-clock figures go to MLflow only, never into the tracked curve.
    assert all(v > 0 for _, v in server.history(r["id"], "tokens_per_s")) and "tokens_per_s" not in curve[0]
    m = r["metrics"]
    assert m["summary/params"] == 729 and m["summary/train_seconds"] > 0 and m["summary/steps"] == 20
    # Lineage: the commit, a clean tree, and the md5 of every dep and out exactly as dvc.lock has them.
    head = sh(project, "git", "rev-parse", "HEAD~1").stdout.strip()  # the fixture committed the outputs since
    t = r["tags"]
    assert t["git.commit"] == t["mlflow.source.git.commit"] == head and t["git.dirty"] == "false"
    # Fixed keys by role (the same in every train run, so the compare view lines runs up), with the path beside.
    for kind, role, path in [("dep", "tokenizer", "tokenizers/names-char"), ("out", "model", "models/names-bigram_nn"),
                             ("out", "curve", "curves/names-bigram_nn.csv")]:  # fmt: skip
        assert t[f"dvc.{kind}.{role}"] == lock_md5(project, "train@names-bigram_nn", f"{kind}s", path)
        assert t[f"dvc.{kind}.{role}.path"] == path
    assert re.fullmatch(r"[0-9a-f]{32}\.dir", t["code.md5"])
    assert (t["corpus"], t["tokenizer"], t["family"], t["device"]) == ("names", "names-char", "bigram_nn", "cpu")
    import torch

    assert t["torch"] == torch.__version__
    assert server.artifacts(r["id"]) == {
        "checkpoint/config.json",
        "checkpoint/train.json",
        "tokenizer/tokenizer.json",
        "curve.csv",
    }
    # The splits it read, as MLflow datasets: the DVC md5 of each file as digest, the role as context.
    for split, context in (("train", "training"), ("val", "validation")):
        digest, tags = r["datasets"][f"names-char/{split}"]
        assert digest == dvc_md5(project / "tokenizers" / "names-char" / f"{split}.bin")[:36]
        assert tags["mlflow.data.context"] == context
    # GPT checkpoints (tracking.log_checkpoints: [gpt]) are MLflow 3 logged models, outputs of their train run.
    gpt = runs["oz-gpt-bpe512 (train)"]
    (model,) = [m for m in server.logged_models() if m.get("source_run_id") == gpt["id"]]
    assert model["name"] == "oz-gpt-bpe512" and model["status"] == "LOGGED_MODEL_READY"


@pytest.mark.slow
def test_evaluate_and_report_runs_log_the_metrics_and_files(project: Path, server: Rest):
    runs = by_name(server.runs())
    r = runs["oz-gpt-bpe512 (evaluate)"]
    metrics = json.loads((project / "metrics" / "oz-gpt-bpe512.json").read_text())
    for key in ("val/loss", "val/ppl", "val/bpc", "params", "train/steps"):
        assert r["metrics"][key] == pytest.approx(metrics[key], rel=1e-9), key
    assert r["metrics"]["params/token_embedding"] == metrics["params_by_component"]["token_embedding"]
    assert r["params"]["model.n_embd"] == "16" and r["params"]["evaluate.batch_size"] == "256"
    # The evaluate run consumed exactly what the train run produced (dep md5 == out md5 == dvc.lock).
    produced = runs["oz-gpt-bpe512 (train)"]["tags"]["dvc.out.model"]
    assert (
        r["tags"]["dvc.dep.model"]
        == produced
        == lock_md5(project, "evaluate@oz-gpt-bpe512", "deps", "models/oz-gpt-bpe512")
    )
    assert server.artifacts(r["id"]) == {"metrics.json", "samples.txt"}
    report = server.artifacts(runs["report"]["id"])
    assert {"README.md", "runs.csv", "figures/loss_curves.png", "figures/bpc_vs_params.png"} <= report
    assert runs["report"]["metrics"]["runs"] == 2
    for role in ("metrics", "models"):  # models/ holds each trainer's lock file, which DVC ignores (.dvcignore)
        assert runs["report"]["tags"][f"dvc.dep.{role}"] == lock_md5(project, "report", "deps", role), role


@pytest.mark.slow
def test_second_repro_logs_nothing(project: Path, server: Rest):
    before = len(server.runs())
    out = sh(project, "dvc", "repro", env={"MLFLOW_TRACKING_URI": server.url}).stdout
    assert "Data and pipelines are up to date" in out
    assert len(server.runs()) == before


@pytest.mark.slow
def test_a_fresh_clone_gets_every_run_into_mlflow(
    project: Path, tmp_path: Path, unused_port: int, another_unused_port: int
):
    """A fresh clone against an empty store: `dvc repro` retrains the models and re-runs every evaluate stage (the
    models and the `inside/` arrays are not in git), so every run reaches MLflow live and `stages.track` has
    nothing to do. Against a store that lost them (a new server, mlflow.db deleted), `stages.track` logs every
    train and evaluate run again from the outputs, marked relogged, without computing anything."""
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(project), str(clone))
    (tmp_path / "first").mkdir()
    with mlflow_server(tmp_path / "first", unused_port) as url:
        rest, env = Rest(url), {"MLFLOW_TRACKING_URI": url}
        out = sh(clone, "dvc", "repro", env=env).stdout
        for run in KEEP["runs"]:
            assert f"Running stage 'train@{run}'" in out and f"Running stage 'evaluate@{run}'" in out, out
        runs = by_name(rest.runs())
        for run in KEEP["runs"]:
            for verb in ("train", "evaluate"):
                assert runs[f"{run} ({verb})"]["status"] == "FINISHED"
                assert "lm.relogged" not in runs[f"{run} ({verb})"]["tags"]
        out = sh(clone, sys.executable, "-m", "stages.track", env=env).stdout
        assert out.rstrip().endswith("track: 0 stage runs logged from their outputs"), out
    (tmp_path / "second").mkdir()
    with mlflow_server(tmp_path / "second", another_unused_port) as url:
        rest, env = Rest(url), {"MLFLOW_TRACKING_URI": url}
        out = sh(clone, sys.executable, "-m", "stages.track", env=env).stdout
        assert out.rstrip().endswith(f"track: {2 * len(KEEP['runs'])} stage runs logged from their outputs"), out
        runs = by_name(rest.runs())
        for run in KEEP["runs"]:
            assert runs[f"{run} (train)"]["tags"]["lm.relogged"] == "true"
            evaluated = runs[f"{run} (evaluate)"]
            metrics = json.loads((clone / "metrics" / f"{run}.json").read_text())
            assert evaluated["tags"]["lm.relogged"] == "true" and evaluated["status"] == "FINISHED"
            for key in ("val/loss", "val/bpc"):
                assert evaluated["metrics"][key] == metrics[key], (run, key)
        again = sh(clone, sys.executable, "-m", "stages.track", env=env).stdout
        assert again.rstrip().endswith("track: 0 stage runs logged from their outputs")


@pytest.mark.slow
def test_dead_server_fails_the_stage_before_training(project: Path, tmp_path: Path, unused_port: int):
    uri = f"http://127.0.0.1:{unused_port}"
    args = [
        "-m",
        "stages.train",
        "names-bigram_nn",
        "--tokenizer",
        "tokenizers/names-char",
        "--out",
        str(tmp_path / "model"),
        "--curve",
        str(tmp_path / "curve.csv"),
        "--no-progress",
    ]
    t0 = time.perf_counter()
    r = sh(project, sys.executable, *args, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert r.returncode == 1, r.stderr
    assert f"error: train@names-bigram_nn: MLflow tracking server {uri} is unreachable" in r.stderr
    assert "tracking.required: false" in r.stderr
    assert not (tmp_path / "model").exists() and time.perf_counter() - t0 < 30
    # tracking.required: false → a warning naming the URI, then the stage does its work untracked.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"]["required"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = sh(project, sys.executable, *args, "--params", str(tmp_path / "params.yaml"), env={"MLFLOW_TRACKING_URI": uri})
    assert f"warning: MLflow tracking server {uri} is unreachable" in r.stderr
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_exp_run_in_a_temp_dir_logs_exactly_the_changed_param(project: Path, server: Rest):
    """`dvc exp run --temp` runs the stages in a copy under .dvc/tmp; without MLFLOW_TRACKING_URI they
    must still log into the project's own mlflow.db (DVC_ROOT), where only the named param differs."""
    out = sh(
        project,
        "dvc",
        "exp",
        "run",
        "--temp",
        "-S",
        "runs.names-bigram_nn.train.lr=0.05",
        env={"MLFLOW_TRACKING_URI": None},
    ).stdout  # type: ignore[dict-item]
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    # check: untracked; finetune-report reads the baselines' metrics/ folder (a few seconds, same bytes)
    assert ran == ["check", "evaluate@names-bigram_nn", "finetune-report", "report", "train@names-bigram_nn"], out
    exp_name = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)  # type: ignore[union-attr]

    from mlflow.tracking import MlflowClient

    assert (project / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    local = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert (
        sorted(local)
        == sorted(
            [  # the experiment's name in each stage run's: two experiments' runs of a stage tell apart
                f"names-bigram_nn [{exp_name}] (train)",
                f"names-bigram_nn [{exp_name}] (evaluate)",
                f"report [{exp_name}]",
                f"finetune-report [{exp_name}]",
                f"exp {exp_name} (from {sh(project, 'git', 'rev-parse', 'HEAD').stdout[:7]})",
            ]
        )
    )
    new = local[f"names-bigram_nn [{exp_name}] (train)"]
    assert new.data.tags["dvc.exp_name"] == exp_name and new.data.tags["git.dirty"] == "true"
    assert new.data.tags["git.dirty_files"] == "params.yaml"
    baseline = by_name(server.runs())["names-bigram_nn (train)"]["params"]
    changed = {
        k: (baseline.get(k), new.data.params.get(k))
        for k in baseline.keys() | new.data.params.keys()
        if baseline.get(k) != new.data.params.get(k)
    }
    assert changed == {"train.lr": ("0.1", "0.05")}
    # Artifacts went to the project too, not into the deleted temp copy.
    artifacts = Path(urllib.parse.urlparse(new.info.artifact_uri).path)
    assert artifacts.is_relative_to(project / "mlartifacts") and (artifacts / "checkpoint" / "config.json").is_file()


@pytest.mark.slow
def test_make_repros_deferred_tracking_logs_the_same_runs(
    project: Path, server: Rest, tmp_path: Path, another_unused_port: int
):
    """What `make repro` does (LM_TRACKING=deferred, then stages.track), into a second server: no stage imports
    MLflow, and stages.track logs runs a reader cannot tell from the live ones (`server`), except for MLflow's
    system metrics, which are live-only, and the process that ran them."""
    forced = [
        "fetch@names",
        "train@names-bigram_nn",
        "evaluate@names-bigram_nn",
        "train@oz-gpt-bpe512",
        "evaluate@oz-gpt-bpe512",
        "report",
    ]  # every train and evaluate stage: stages.track relogs none
    with mlflow_server(tmp_path, another_unused_port) as url:
        rest, env = Rest(url), {"MLFLOW_TRACKING_URI": url, "LM_TRACKING": "deferred"}
        out = sh(project, "dvc", "repro", "--force", "--single-item", *forced, env=env).stdout
        assert out.count("→ deferred to ") == len(forced), out
        assert len(list((project / "mlflow-journal").iterdir())) == len(forced) and rest.runs_or_none() is None
        out = sh(project, sys.executable, "-m", "stages.track", env={"MLFLOW_TRACKING_URI": url}).stdout
        assert f"track: {len(forced)} deferred stage runs logged from {project / 'mlflow-journal'}" in out, out
        assert not list((project / "mlflow-journal").iterdir()) and "0 stage runs logged from their outputs" in out
        live, later = by_name(server.runs()), by_name(rest.runs())
        stages = {run_name(s) for s in forced}
        assert later.keys() == stages | {next(n for n in later if n.startswith("repro "))}
        # The process and invocation differ; so does the commit (the fixture committed the live repro's outputs).
        volatile = {"lm.pid", "lm.pid_start", "lm.study_run", "mlflow.parentRunId", "mlflow.log-model.history",
                    "git.commit", "mlflow.source.git.commit"}  # fmt: skip
        head = sh(project, "git", "rev-parse", "HEAD").stdout.strip()
        for name in stages:
            x, y = live[name], later[name]
            assert x["params"] == y["params"] and x["datasets"] == y["datasets"], name
            assert y["tags"]["git.commit"] == head, name
            assert {k: v for k, v in x["tags"].items() if k not in volatile} == {
                k: v for k, v in y["tags"].items() if k not in volatile
            }, name
            assert {k for k in x["metrics"] if not k.startswith("system/")} == y["metrics"].keys(), name
            assert server.artifacts(x["id"]) == rest.artifacts(y["id"]), name
            assert y["status"] == "FINISHED" and y["tags"]["mlflow.parentRunId"] == later[
                next(n for n in later if n.startswith("repro "))]["id"]  # fmt: skip
        exact = {k: v for k, v in live["oz-gpt-bpe512 (evaluate)"]["metrics"].items() if k.startswith("val/")}
        assert exact == {k: later["oz-gpt-bpe512 (evaluate)"]["metrics"][k] for k in exact}
        y = later["oz-gpt-bpe512 (train)"]
        assert rest.history(y["id"], "train_loss") == server.history(live["oz-gpt-bpe512 (train)"]["id"], "train_loss")
        assert [m["name"] for m in rest.logged_models()] == ["oz-gpt-bpe512"]


# ----------------------------------------------------------------------------------------------
# docs/mlflow.md's examples, run as written: they cannot go stale


def doc_blocks(repo_root: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (repo_root / "docs" / "mlflow.md").read_text(), re.S)


@pytest.mark.slow
def test_the_mlflow_docs_python_example_answers_from_the_real_store(project: Path, server: Rest, repo_root: Path):
    """The Python block, as written but for its store and experiment (this module's), lists evaluate runs only,
    with their family, best val/bpc first, and the val/bpc of each is its metrics file's."""
    (code,) = doc_blocks(repo_root, "python")
    store, experiment = 'mlflow.set_tracking_uri("sqlite:///mlflow.db")', 'experiment_names=["lm-ladder"]'
    assert store in code and experiment in code, "the docs' example changed: update the swaps below"
    code = code.replace(store, f"mlflow.set_tracking_uri({server.url!r})")
    code = code.replace(experiment, f"experiment_names=[{EXPERIMENT!r}]")
    out = sh(project, sys.executable, "-c", code).stdout.splitlines()
    assert out[0].split() == ["tags.mlflow.runName", "tags.family", "metrics.val/bpc"], out
    rows = [line.split() for line in out[1:]]
    assert rows and all(r[2] == "(evaluate)" for r in rows), out
    bpc = [float(r[-1]) for r in rows]
    assert bpc == sorted(bpc)
    for run, family in (("names-bigram_nn", "bigram_nn"), ("oz-gpt-bpe512", "gpt")):
        metrics = json.loads((project / "metrics" / f"{run}.json").read_text())
        assert any(r[1] == run and r[3] == family and float(r[-1]) == pytest.approx(metrics["val/bpc"], abs=1e-6)
                   for r in rows), (run, out)  # fmt: skip


@pytest.mark.slow
def test_the_mlflow_docs_fail_fast_example_prints_what_it_shows(project: Path, repo_root: Path, unused_port: int):
    """The console block's command, run in this module's project (a free port for 5999, a run of it for
    names-mlp), prints every line the docs show."""
    (block,) = doc_blocks(repo_root, "console")
    command, *shown = block.strip().splitlines()
    swap = {"5999": str(unused_port), "names-mlp": "names-bigram_nn"}
    for old, new in swap.items():
        command, shown = command.replace(old, new), [line.replace(old, new) for line in shown]
    words = command.removeprefix("$ ").split()
    env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    argv = [w for w in words if w.split("=", 1)[0] not in env]
    assert argv[:2] == ["dvc", "repro"], command
    try:
        r = sh(project, *argv, env=env, check=False)
        assert r.returncode != 0
        printed = (r.stdout + r.stderr).splitlines()
        assert [line for line in shown if line not in printed] == [], printed
    finally:
        # DVC removed the stage's outputs before running it: the model from its cache, the curve from git.
        sh(project, "dvc", "checkout", "train@names-bigram_nn")
        sh(project, "git", "checkout", "--", "curves")
        assert "Data and pipelines are up to date" in sh(project, "dvc", "status").stdout


@pytest.mark.slow
def test_the_ui_links_open_on_the_answers_in_a_real_browser(project: Path, server: Rest):
    """Each link `lm ui` prints (lm.ui.views), opened in headless Chromium with no click but the compare page's
    "Show diff only", read from the page: the evaluate runs best val/bpc first, with the columns that answer it; the
    corpus's train runs, each drawn in the bits-per-character charts only, against tokens_seen; the two runs'
    parameters, the differing rows only."""
    import shutil

    from lm.ui import read_views

    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it where it can)")
    pages = read_views(server.url, EXPERIMENT, corpus="oz", pair=("names-bigram_nn", "oz-gpt-bpe512"))
    bpc = {r: json.loads((project / "metrics" / f"{r}.json").read_text())["val/bpc"] for r in KEEP["runs"]}
    best = pages["best"].rows
    assert best and all(name.endswith(" (evaluate)") for name in best), best
    assert "Sort: val/bpc" in pages["best"].lines
    # The shared view's columns, in place of the runs table's default Source, Models and Dataset.
    assert {"val/bpc", "test/bpc", "val/loss", "params", "family"} <= set(pages["best"].lines), pages["best"].lines
    assert "Source" not in pages["best"].lines and "Dataset" not in pages["best"].lines, pages["best"].lines
    first_seen = list(dict.fromkeys(name.removesuffix(" (evaluate)") for name in best))
    assert [r for r in first_seen if r in bpc] == sorted(bpc, key=bpc.get), (best, bpc)
    curves = pages["curves"]
    assert curves.rows and set(curves.rows) == {"oz-gpt-bpe512 (train)"}, curves.rows  # oz's train runs only
    assert set(curves.legends.get("val_bpc_est", [])) == set(curves.rows), curves.legends
    assert set(curves.legends) == {"train_bpc_est", "val_bpc_est"}, curves.legends  # the chart search: no other chart
    assert "tokens_seen" in curves.lines  # the x-axis
    cells = {line.split("\t")[0]: line.split("\t")[1:] for line in pages["diff"].lines if "\t" in line}
    assert cells.get("model.family") == ["bigram_nn", "gpt"], cells
    assert "train.seed" not in cells  # the same in both: hidden by "Show diff only"
    assert cells.get("tokenizer") == ["names-char", "oz-bpe512"], cells  # the two runs asked for, in that order


@pytest.mark.slow
def test_lm_ui_prints_a_link_per_question(project: Path, server: Rest, capsys):
    """The three links of read_views above, labelled with their question; without the pair's runs, two links and a
    note naming --pair."""
    from lm.cli import _question_links

    links = _question_links(server.url, EXPERIMENT, "http://ui", "oz", ("names-bigram_nn", "oz-gpt-bpe512"))
    out = capsys.readouterr().out
    assert list(links) == ["best", "curves", "diff"] and all(u.startswith("http://ui/#/") for u in links.values())
    assert "1. Which family is best?" in out and "2. How did the losses evolve? oz's" in out
    assert "3. What differs between names-bigram_nn and oz-gpt-bpe512?" in out and links["diff"] in out
    links = _question_links(server.url, EXPERIMENT, "http://ui", "oz", ("names-mlp", "names-mlp-bn"))
    assert list(links) == ["best", "curves"] and "pass --pair RUN RUN" in capsys.readouterr().out
