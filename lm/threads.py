"""How torch's OpenMP threads wait, set before torch loads (``import lm`` does it; docs/performance.md).

torch's CPU kernels run on OpenMP threads (GNU libgomp in the pip wheels), one per core by default. At each of the
hundreds of barriers of a training step, libgomp's threads spin for a while (300,000 spins by default) before they
sleep. On a quiet machine that saves a wake-up; when anything else runs, the other process takes a core, one thread
of the team is descheduled and its twin spins away its time slice waiting for it, barrier after barrier, so a step
becomes many times slower (bench/threads.py measures it). Spinning only briefly keeps most of the quiet-machine speed
and lets a descheduled thread's core go to whoever needs it.

libgomp reads its settings once, when torch loads it, so :func:`configure` runs from ``lm/__init__.py`` (the stages'
package imports ``lm`` first as well). A user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept, and nothing is
changed once torch is loaded (too late to matter; the caller chose). Waiting changes no number: the same threads
split the same work, whatever the wait.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "1000"
"""libgomp's spins at a barrier before its thread sleeps (its default: 300,000), chosen with bench/threads.py
(docs/performance.md, "When the machine is not idle")."""
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def configure() -> bool:
    """Set GOMP_SPINCOUNT for the torch this process will load; False when left as it was (the user set how OpenMP
    waits, or torch is already loaded)."""
    if "torch" in sys.modules or any(v in os.environ for v in WAIT_VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True
