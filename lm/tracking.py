"""MLflow tracking: the only module that imports mlflow (lazily: an untracked stage never pays for it).

Every stage instance (``fetch@names``, ``train@names-mlp``, ``report``, ...) opens one MLflow run
with :func:`open_run`, named after its DVC stage, in one experiment per study. The returned
:class:`Tracker` is also the :class:`lm.trainer.Logger` the training loop reports to: it buffers the
per-evaluation metrics and sends them with ``MlflowClient.log_batch`` (one call per flush, not one
per metric and step). The stage runs of one ``dvc repro`` / ``dvc exp run`` are children of one
parent run (a :class:`Group`), so the UI shows the pipeline as one progression.

Tracking can also be deferred (``journal=``): the stage then writes its run to a journal folder
(:mod:`lm.journal`, no mlflow import) and :func:`replay` logs it later, with its own times, in one process for
all stages.

The library reads no environment variables: the stage resolves the tracking URI, the project root
and the group (``stages/mlflow_run.py``) and passes them in. An unreachable store fails the stage before
it does any work, with a message naming the URI (``tracking.required: false``: warn, run untracked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from lm.config import TrackingConfig
from lm.provenance import dvc_md5

FLUSH_SECONDS = 15.0
"""Buffered step metrics are sent at most this often (and at the end): few calls, yet a live curve."""
PROBE_TIMEOUT_S = 5.0
"""How long the reachability probe of an http(s) server waits (MLflow's own client retries for minutes)."""
MAX_PARAM_CHARS = 6000
"""MLflow's limit on a param value."""
SERVER_FIX = (
    "start it, or point MLFLOW_TRACKING_URI at a running server (unset, runs go to the project's "
    "sqlite:///<project>/mlflow.db)"
)
STUDY_ROLE, STAGE_ROLE = "study", "stage"
"""Values of the ``lm.role`` tag: the parent run of one pipeline invocation, or one stage instance."""


def _one_line(e: BaseException, limit: int = 500) -> str:
    """An exception's message on one line, cut at `limit` characters (store errors can be pages long)."""
    return " ".join(str(e).split())[:limit]


class TrackingError(RuntimeError):
    """The tracking store is unreachable or refused a write; the message names the URI and the fixes."""


@dataclass(frozen=True)
class Group:
    """The pipeline invocation a stage run belongs to: one parent run per ``key`` (tag ``lm.study_run``)."""

    key: str
    """Identical for every stage of one ``dvc repro`` / ``dvc exp run``, different across invocations."""
    name: str
    """Run name of the parent in the UI, e.g. 'repro 2025-01-31 12:00:00 (abc1234)'."""
    tags: Mapping[str, str] = field(default_factory=dict)
    """Extra tags of the parent (git commit, DVC experiment name, ...)."""


# ----------------------------------------------------------------------------------------------
# what a run records: flattened params, numeric leaves, DVC-compatible md5s, git state


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping → {'model.n_embd': '64', ...}: the params of a run as MLflow shows them."""
    out: dict[str, str] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def numeric_leaves(obj: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The int and float leaves of a nested mapping (bools and strings skipped), keys joined by '/'."""
    out: dict[str, float] = {}
    for key, value in obj.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(numeric_leaves(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


# ----------------------------------------------------------------------------------------------
# the logger objects


@dataclass(frozen=True)
class DatasetRef:
    """A split a run reads, as MLflow's dataset input: `digest` is the md5 DVC records for `source`."""

    name: str
    """e.g. 'shakespeare-char/train'."""
    source: Path
    """The file read (tokenizers/<name>/<split>.bin)."""
    context: str
    """'training', 'validation' or 'evaluation' (the mlflow.data.context tag)."""
    profile: Mapping[str, Any] = field(default_factory=dict)
    """Sizes shown with the dataset (tokens, characters)."""

    def record(self) -> dict[str, Any]:
        """What MLflow's dataset input holds, computed now (the digest is of the file as it is now)."""
        return {"name": self.name, "digest": dvc_md5(self.source)[:36], "source": str(self.source),
                "profile": json.dumps(dict(self.profile)), "context": self.context}  # fmt: skip


def split_datasets(tok_dir: Path, stats: Mapping[str, Any], contexts: Mapping[str, str]) -> list[DatasetRef]:
    """A tokenizer's splits a run reads (split → its mlflow.data.context), with `stats` (its stats.json) sizes."""
    return [
        DatasetRef(f"{Path(tok_dir).name}/{split}", Path(tok_dir) / f"{split}.bin", context,
                   {k: stats["splits"][split][k] for k in ("tokens", "characters")})
        for split, context in contexts.items()
        if split in stats["splits"]
    ]  # fmt: skip


class NullTracker:
    """Tracking off (or unreachable and not required): every call is a no-op; also a `lm.trainer.Logger`."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None, name: str | None = None) -> None:
        pass

    def log_datasets(self, datasets: Sequence[DatasetRef]) -> None:
        pass

    def log_model(self, name: str, folder: Path, step: int = 0) -> None:
        pass

    def system_metrics(self, sampling_interval: float = 10.0) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def flush(self) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Tracker(NullTracker):
    """One MLflow run (a stage instance); use as a context manager: it ends the run FINISHED, FAILED
    (an exception, incl. a stage's SystemExit) or KILLED (Ctrl-C), and its parent with it.

    Once the run is open, tracking never fails the stage: the first failed call (a store that died mid-run)
    is one warning, with `relog` (the command that logs the run again from the stage's outputs), and the rest
    of the run is not logged. Work that is done is never thrown away over a log line."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        parent_id: str | None,
        uri: str,
        required: bool,
        warn: Callable[[str], None],
        relog: str | None = None,
        experiment_id: str = "",
    ):
        self.client, self.run_id, self.parent_id, self.uri = client, run_id, parent_id, uri
        self.experiment_id = experiment_id
        self.required, self.warn, self.relog = required, warn, relog
        from mlflow.entities import Metric, RunTag

        self._metric, self._tag = Metric, RunTag
        self._buffer: list[Any] = []
        self._last_flush = time.monotonic()
        self.failed: str | None = None
        self._monitor: Any = None
        """The first failure's message, once a call has failed (nothing is logged after it)."""
        self.end_time: int | None = None
        """The run's end in ms since the epoch (a replayed run's own); None: now."""

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, fatal: bool = False, **kwargs: Any) -> None:
        """Run a client call; a failure raises TrackingError if `fatal` (while opening a required run), else
        warns once and stops tracking."""
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (MlflowException, OSError, database errors, ...)
            message = f"MLflow tracking at {self.uri} failed to {what}: {_one_line(e)}"
            if fatal:
                raise TrackingError(f"{message}; fix the store or set tracking.required: false to run untracked") from e
            self.failed = message
            again = f"; log it again later with: {self.relog}" if self.relog else ""
            self.warn(f"{message}; the rest of this run is not logged (the stage's outputs are not affected){again}")
            # Said once: MLflow's own threads (system metrics) would repeat it with a traceback per sample.
            for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "mlflow"] + ["mlflow"]:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            if self._monitor is not None:
                with contextlib.suppress(Exception):
                    self._monitor.finish()
                self._monitor = None

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, timestamp: int | None = None) -> None:
        """Buffer `metrics` at `step`, stamped `timestamp` (ms since the epoch; None: now, a replayed run's own)."""
        now = int(time.time() * 1000) if timestamp is None else timestamp
        self._buffer.extend(self._metric(k, float(v), now, step) for k, v in metrics.items())
        if time.monotonic() - self._last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Send the buffered metrics in one log_batch (the client splits batches past MLflow's limits)."""
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._call("log metrics", self.client.log_batch, self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def log_params(self, params: Mapping[str, str], fatal: bool = False) -> None:
        from mlflow.entities import Param

        batch = [Param(k, v) for k, v in params.items()]
        self._call("log params", self.client.log_batch, self.run_id, params=batch, fatal=fatal)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set tags", self.client.log_batch, self.run_id, tags=[self._tag(k, str(v)) for k, v in tags.items()])

    def log_datasets(self, datasets: Sequence[DatasetRef]) -> None:
        """The splits the run reads, as MLflow dataset inputs (the Datasets column of the runs table)."""
        self.log_dataset_records([d.record() for d in datasets])

    def log_dataset_records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Dataset inputs from :meth:`DatasetRef.record` dicts."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(r["name"], r["digest"], "local", r["source"], profile=r["profile"]),
                tags=[InputTag("mlflow.data.context", r["context"])],
            )
            for r in records
        ]
        self._call("log dataset inputs", self.client.log_inputs, self.run_id, datasets=inputs)

    def log_model(self, name: str, folder: Path, step: int = 0) -> None:
        """`folder` (a checkpoint: safetensors + config.json) as an MLflow 3 logged model, output of this run."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        def log() -> None:
            model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                                    model_type="lm-checkpoint")  # fmt: skip
            self.client.log_model_artifacts(model.model_id, str(folder))
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])

        self._call(f"log model {folder}", log)

    @contextlib.contextmanager
    def system_metrics(self, sampling_interval: float = 10.0) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU) every `sampling_interval` s while the block runs (system/*)."""
        monitor = None
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per stage

            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=sampling_interval, tracking_uri=self.uri)
            monitor.start()
            self._monitor = monitor
        except Exception as e:  # noqa: BLE001 (an optional view: never a reason to stop the stage)
            self.warn(f"MLflow system metrics are off for this run: {_one_line(e, 200)}")
            monitor = None
        try:
            yield
        finally:
            if self._monitor is not None:  # not stopped already by a failure
                with contextlib.suppress(Exception):
                    self._monitor.finish()
                self._monitor = None

    def log_artifact(self, path: Path, artifact_path: str | None = None, name: str | None = None) -> None:
        """Log a file (as `name`, default its own name) or a directory's files under `artifact_path`. Fixed names
        (curve/curve.csv, not curve/<run>.csv) let MLflow's compare view line runs up."""
        path = Path(path)
        if path.is_dir():
            self._call(f"log artifacts {path}", self.client.log_artifacts, self.run_id, str(path), artifact_path)
        elif name and name != path.name:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(path, Path(tmp) / name)
                self._call(f"log artifact {path}", self.client.log_artifact, self.run_id, str(Path(tmp) / name),
                           artifact_path)  # fmt: skip
        else:
            self._call(f"log artifact {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish(exit_status(kind, exc))

    def finish(self, status: str) -> None:
        """Send what is buffered and end the run (and its parent) with `status` at :attr:`end_time`."""
        self.flush()
        self._call("end the run", self.client.set_terminated, self.run_id, status, self.end_time)
        if self.parent_id:
            # The parent ends with each stage: after the last one it spans the whole invocation.
            self._call("end the parent run", self.client.set_terminated, self.parent_id, status, self.end_time)


def exit_status(kind: type[BaseException] | None, exc: BaseException | None) -> str:
    """A run's end status from how its `with` block ended: FINISHED, KILLED (Ctrl-C) or FAILED (an exception, a
    stage's non-zero SystemExit)."""
    if kind is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
        return "FINISHED"
    return "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"


# ----------------------------------------------------------------------------------------------
# opening a run


class CurveLogger:
    """The training curve as MLflow shows it: `tokens_seen` (an x-axis that compares runs of different batch
    sizes), the fixed-subset val loss named as the estimate it is (`val_loss_est`: the whole-split number is the
    evaluate run's `val/loss`), and both losses in bits per character too (`*_bpc_est`, from the split's mean
    characters per token), so char and BPE runs compare on one chart."""

    RENAME = {"tokens": "tokens_seen", "val_loss": "val_loss_est"}

    def __init__(self, logger: NullTracker, tokenizer_stats: dict):
        self.logger = logger
        splits = tokenizer_stats["splits"]
        self.bits = {s: 1 / (math.log(2) * splits[s]["chars_per_token"]) for s in ("train", "val") if s in splits}

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        out = {self.RENAME.get(k, k): v for k, v in metrics.items()}
        for split in ("train", "val"):
            if f"{split}_loss" in metrics and split in self.bits:
                out[f"{split}_bpc_est"] = metrics[f"{split}_loss"] * self.bits[split]
        self.logger.log_metrics(out, step)

    def __getattr__(self, name: str):  # set_tags, log_artifact, ... go straight to the tracker
        return getattr(self.logger, name)


def probe_able(uri: str) -> bool:
    """An http(s) tracking server (as opposed to a local sqlite/file store)."""
    return uri.startswith(("http://", "https://"))


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast on an http(s) tracking server that does not answer GET /health (MLflow's client would
    retry for minutes); other stores (sqlite, file) are checked by the first real call."""
    if not probe_able(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (the URI is the user's server)
            r.read(64)
    except urllib.error.HTTPError as e:
        raise TrackingError(f"MLflow tracking server {uri} answered {e.code} to GET /health: {SERVER_FIX}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}): {SERVER_FIX}") from None


def _experiment_id(client: Any, name: str, artifact_root: Path | None, description: str | None = None) -> str:
    from mlflow.exceptions import MlflowException

    # The study's runs are model development: MLflow 3's UI then opens on the runs table, not the GenAI overview.
    note = {"mlflow.experimentKind": "custom_model_development"}
    if description:
        note["mlflow.note.content"] = description
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = artifact_root.resolve().as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=note)
        except MlflowException:  # created meanwhile by a concurrent stage (dvc exp run --queue -j 2)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted: restore it (`mlflow experiments restore --experiment-id "
            f"{exp.experiment_id}`) or choose another tracking.experiment"
        )
    for key, value in note.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _parent_run(client: Any, experiment_id: str, group: Group, start_time: int | None = None) -> str:
    """The group's parent run, created by its first stage (at `start_time`, ms; None: now); later stages mark it
    RUNNING again."""
    key = group.key.replace("\\", "\\\\").replace("'", "\\'")
    found = client.search_runs(
        [experiment_id], f"tags.`lm.study_run` = '{key}' and tags.`lm.role` = '{STUDY_ROLE}'", max_results=1
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {**group.tags, "lm.study_run": group.key, "lm.role": STUDY_ROLE, "lm.host": socket.gethostname()}
    return client.create_run(experiment_id, start_time=start_time, run_name=group.name, tags=tags).info.run_id


INVOCATION = re.compile(r":(\d+):(\d+\.\d{3})$")
"""The end of a parent's ``lm.study_run`` key for a `dvc repro` / `dvc exp run`: the dvc process's pid and start."""


def _end_orphan_parents(client: Any, experiment_id: str, own: Group | None) -> None:
    """Mark KILLED the RUNNING parent runs of this machine whose `dvc` process is gone (kill -9 of a stage or of
    dvc leaves them RUNNING: each stage ends the parent as it ends, and the killed one never did)."""
    found = client.search_runs(
        [experiment_id], f"tags.`lm.role` = '{STUDY_ROLE}' and attributes.status = 'RUNNING'", max_results=50
    )
    for run in found:
        t = run.data.tags
        key = t.get("lm.study_run", "")
        m = INVOCATION.search(key)
        if m and t.get("lm.host") == socket.gethostname() and (own is None or key != own.key):
            if not _alive(m[1], m[2]):
                client.set_tag(run.info.run_id, "lm.ended_by", "the next stage run (its dvc process was gone)")
                client.set_terminated(run.info.run_id, "KILLED")


def process_tags() -> dict[str, str]:
    """Which process a run belongs to: host, pid and the pid's start time (pids are reused)."""
    import psutil

    return {
        "lm.host": socket.gethostname(),
        "lm.pid": str(os.getpid()),
        "lm.pid_start": f"{psutil.Process().create_time():.3f}",
    }


def _alive(pid: str, start: str) -> bool:
    import psutil

    try:
        return f"{psutil.Process(int(pid)).create_time():.3f}" == start
    except (psutil.Error, ValueError):
        return False


def _end_orphans(client: Any, experiment_id: str, name: str) -> None:
    """Mark KILLED the RUNNING runs named `name` whose process (on this host) is gone."""
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    running = client.search_runs(
        [experiment_id], f"attributes.run_name = '{quoted}' and attributes.status = 'RUNNING'", max_results=50
    )
    for run in running:
        t = run.data.tags
        if (
            t.get("lm.host") == socket.gethostname()
            and "lm.pid" in t
            and not _alive(t["lm.pid"], t.get("lm.pid_start", ""))
        ):
            client.set_tag(run.info.run_id, "lm.ended_by", "the next start of the same stage (its process was gone)")
            client.set_terminated(run.info.run_id, "KILLED")


def open_run(
    cfg: TrackingConfig,
    uri: str,
    name: str,
    *,
    params: Mapping[str, str],
    tags: Mapping[str, str],
    group: Group | None = None,
    artifact_root: Path | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    relog: str | None = None,
    description: str | None = None,
    experiment_description: str | None = None,
    journal: Path | None = None,
) -> NullTracker:
    """Start the MLflow run `name` (e.g. 'names-mlp (train)') with its params and tags, first marking KILLED the
    runs of that name left RUNNING by a process of this machine that is gone. `relog`: the command that logs the run
    again from the stage's outputs, quoted if tracking fails later; `description`, `experiment_description`: the
    UI's texts; `artifact_root`: where a *new* experiment of a local (sqlite) store keeps its artifacts (absolute,
    so runs from DVC's temp copies land in the project; None: the server chooses); `echo` gets one line saying
    where the run is; `journal`: defer the run to a new folder there (:mod:`lm.journal`, no mlflow import; an http
    server is still probed) for :func:`replay`. Returns a :class:`NullTracker` if tracking is off, or unreachable and
    not required; raises :class:`TrackingError` otherwise."""
    if not cfg.enabled:
        return NullTracker()
    try:
        probe(uri)
        if journal is not None:
            record = {"uri": uri, "experiment": cfg.experiment, "name": name, "params": dict(params),
                      "tags": dict(tags), "group": group, "artifact_root": artifact_root, "description": description,
                      "experiment_description": experiment_description}  # fmt: skip
            return _deferred(journal, record, echo)
        client, experiment_id, parent_id = _start(uri, cfg.experiment, artifact_root, experiment_description, group)
        run_id = _create_run(client, experiment_id, name, tags, group, parent_id, description)
    except TrackingError as e:
        error: Exception = e
    except Exception as e:  # noqa: BLE001 (MlflowException, OSError, sqlalchemy errors, ...)
        error = TrackingError(
            f"MLflow tracking at {uri} failed ({_one_line(e)}): check that the store is reachable and writable"
        )
    else:
        # A store error reaches the stage as an exception, which it reports in one line: MLflow's logging of the
        # same error (a ~90-line SQLAlchemy traceback each time) would bury that line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        tracker = Tracker(client, run_id, parent_id, uri, cfg.required, warn, relog, experiment_id)
        tracker.log_params(params, fatal=cfg.required)
        web = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        echo(f"mlflow: {name} → {web if probe_able(uri) else f'run {run_id} in {uri}'}")
        return tracker
    if cfg.required:
        raise TrackingError(f"{error}; or set tracking.required: false to run untracked") from None
    warn(f"{error}; tracking.required is false: {name} runs untracked")
    return NullTracker()


def _start(
    uri: str,
    experiment: str,
    artifact_root: Path | None,
    description: str | None,
    group: Group | None,
    start_time: int | None = None,
) -> tuple[Any, str, str | None]:
    """A client of the store at `uri`, the experiment's id (created if new) and the group's parent run id (None
    without a group; created at `start_time` if new), after ending the parent runs whose dvc process is gone."""
    # Imported only now: mlflow is slow to import, and only runs logged to the store pay for it.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, artifact_root, description)
    _end_orphan_parents(client, experiment_id, group)
    return client, experiment_id, _parent_run(client, experiment_id, group, start_time) if group else None


def _deferred(journal: Path, record: dict[str, Any], echo: Callable[[str], None]) -> NullTracker:
    """open_run's arguments (`record`) as the opening of a new journal below `journal`, in JSON."""
    from lm.journal import JournalTracker

    group, root = record["group"], record["artifact_root"]
    record |= {
        "group": group and dataclasses.asdict(group),
        "artifact_root": root and str(root),
        "process": process_tags(),
    }
    try:
        tracker = JournalTracker.start(journal, record)
    except OSError as e:
        raise TrackingError(f"cannot write the tracking journal below {journal} ({e}): make it writable") from None
    echo(f"mlflow: {record['name']} → deferred to {tracker.folder} (`make track` logs it)")
    return tracker


def _create_run(
    client: Any,
    experiment_id: str,
    name: str,
    tags: Mapping[str, str],
    group: Group | None,
    parent_id: str | None,
    description: str | None,
    start_time: int | None = None,
    process: Mapping[str, str] | None = None,
) -> str:
    """End this machine's orphaned runs of `name`, then create the run with its tags (`process`: the host/pid tags of
    the process the run is of; None: this one) at `start_time` (ms; None: now); return its id."""
    _end_orphans(client, experiment_id, name)
    run_tags = {**tags, "lm.role": STAGE_ROLE, **(process or process_tags())}
    if description:
        run_tags["mlflow.note.content"] = description
    if group:
        run_tags.update({"lm.study_run": group.key, "mlflow.parentRunId": parent_id})
    return client.create_run(experiment_id, start_time=start_time, run_name=name, tags=run_tags).info.run_id


def logged(cfg: TrackingConfig, uri: str, stage: str, md5: str) -> bool:
    """Whether the study's experiment holds a finished run of DVC stage `stage` (tag dvc.stage) that recorded an
    output with this md5 (any dvc.out.* tag): then that output is in MLflow already."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return False
    quoted = stage.replace("\\", "\\\\").replace("'", "\\'")
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`dvc.stage` = '{quoted}' and attributes.status = 'FINISHED'", max_results=200
    )
    return any(md5 in (v for k, v in r.data.tags.items() if k.startswith("dvc.out.")) for r in runs)


def runs_table_url(uri: str, experiment: str, ui: str) -> str:
    """The URL of the experiment's runs table in the MLflow UI at `ui` (the ML view, not MLflow 3's GenAI
    overview); the experiment list if the experiment does not exist yet."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    if exp is None:
        return f"{ui.rstrip('/')}/#/experiments"
    return f"{ui.rstrip('/')}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"


def find_runs(uri: str, experiment: str, filter_string: str) -> list[tuple[str, str]]:
    """(run id, run name) of the experiment's runs matching an MLflow search filter, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string, max_results=1000, order_by=["attributes.start_time"])
    return [(r.info.run_id, r.info.run_name) for r in runs]


SHARED_VIEW = "mlflow.sharedViewState."
"""The experiment tag prefix under which MLflow's UI keeps a shared view (its Share button): a URL with
``viewStateShareKey=<key>`` opens the runs page with that view's filter, sort, columns, chart search and x-axis."""


def share_view(uri: str, experiment: str, key: str, state: Mapping[str, Any]) -> None:
    """Store `state` (the UI's view state: searchFilter, orderByKey, selectedColumns, chartsSearchFilter, ...) as the
    experiment's shared view `key`, replacing one of that key; raises TrackingError if the store refuses it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} in {uri}: run `make repro` first")
    try:
        client.set_experiment_tag(exp.experiment_id, f"{SHARED_VIEW}{key}", json.dumps(state, sort_keys=True))
    except Exception as e:  # noqa: BLE001 (a read-only store, a server that refuses writes, ...)
        raise TrackingError(f"{uri} did not keep the shared view {key}: {_one_line(e, 300)}") from None


def experiment_id(uri: str, experiment: str) -> str | None:
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    return None if exp is None else exp.experiment_id


def replay(record: Mapping[str, Any], events: Sequence[Mapping[str, Any]], files: Path) -> str:
    """Log a deferred run (:mod:`lm.journal`: what :func:`open_run` was given, then the tracker's calls in order, each
    with its time in ms) to the store it was meant for, as the live :class:`Tracker` would have logged it: the same
    name, params, tags, parent, metrics at their own steps and times, artifacts (from `files`), datasets and models,
    the run's own start and end time, and its end status (KILLED if the journal has no end: its process died).
    Returns the run id; raises :class:`TrackingError` if any of it fails (the half-logged run is deleted)."""
    uri = record["uri"]
    start = int(record["start_ms"])
    group = Group(**record["group"]) if record.get("group") else None
    root = Path(record["artifact_root"]) if record.get("artifact_root") else None
    try:
        probe(uri)
        client, experiment_id, parent_id = _start(uri, record["experiment"], root, record.get("experiment_description"),
                                                  group, start)  # fmt: skip
        run_id = _create_run(client, experiment_id, record["name"], record["tags"], group, parent_id,
                             record.get("description"), start_time=start, process=record["process"])  # fmt: skip
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 (MlflowException, OSError, sqlalchemy errors, ...)
        raise TrackingError(f"MLflow tracking at {uri} failed ({_one_line(e)})") from None
    # Silent: a failure is raised below, with the first failed call's message (t.failed).
    t = Tracker(client, run_id, parent_id, uri, True, lambda _: None, None, experiment_id)
    t.log_params(record["params"])
    status, t.end_time = "KILLED", start
    for e in events:
        t.end_time = int(e["time"])
        if e["kind"] == "metrics":
            t.log_metrics(e["values"], int(e["step"]), timestamp=t.end_time)
        elif e["kind"] == "tags":
            t.set_tags(e["tags"])
        elif e["kind"] == "artifact":
            t.log_artifact(files / e["file"], e.get("artifact_path"))
        elif e["kind"] == "datasets":
            t.log_dataset_records(e["records"])
        elif e["kind"] == "model":
            t.log_model(e["name"], files / e["folder"], int(e["step"]))
        elif e["kind"] == "end":
            status = e["status"]
    t.finish(status)
    if t.failed:
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise TrackingError(t.failed)
    return run_id
