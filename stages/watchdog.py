"""A stage stops when the `dvc` that runs it dies: DVC does not pass SIGTERM or SIGKILL on to its stage, and an
orphaned stage would keep training and writing outputs that no dvc.lock will record."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path


def stop_with_dvc(poll_s: float = 0.5) -> None:
    """When this stage runs under `dvc` and that process dies (SIGTERM, SIGKILL), send ourselves SIGTERM: DVC
    does not pass the signal on, and an orphaned stage would keep training and writing outputs that no
    dvc.lock will record. The trainer saves its state and stops; other stages stop (their outputs are atomic)."""
    proc = dvc_process()
    if proc is None:
        return

    def watch() -> None:
        import psutil

        while True:
            time.sleep(poll_s)
            try:
                dvc = psutil.Process(proc[0])
                if dvc.create_time() == proc[1] and dvc.status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped
                    continue
            except psutil.Error:
                pass
            print(f"warning: dvc (pid {proc[0]}) is gone: stopping this stage", file=sys.stderr)
            os.kill(os.getpid(), signal.SIGTERM)
            return

    threading.Thread(target=watch, name="stop-with-dvc", daemon=True).start()


def dvc_process() -> tuple[int, float] | None:
    """(pid, start time) of the `dvc` process this stage runs under (nearest ancestor), if any."""
    try:
        import psutil  # pinned in requirements.lock (an mlflow dependency); without it: no dvc group
    except ImportError:
        return None
    try:
        parents = psutil.Process().parents()
    except psutil.Error:
        return None
    for proc in parents:
        try:
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in proc.cmdline()[:3]):
                return proc.pid, proc.create_time()
        except psutil.Error:  # e.g. AccessDenied on another user's process: look further up
            continue
    return None
