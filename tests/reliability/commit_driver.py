"""One write transaction on a bundle, killed with SIGKILL at a chosen step (run as a subprocess).

    python commit_driver.py TARGET STEP [--two-renames]

The transaction is mmopt's own (``mmopt.store.transaction``): it copies the bundle, writes a new file
and a manifest whose ``generation`` is one higher, and commits. STEP names the instant the process
dies: ``staged`` (copy made), ``written`` (new manifest written in the stage), ``swapped`` (after the
atomic exchange, before the old copy is removed), ``old-renamed`` / ``new-renamed`` (the two-rename
fallback, after its first / second rename), ``pause-between`` (sleep 2 s between the fallback's renames),
``slow`` (sleep 1 s before committing) or ``none`` (commit normally). ``--two-renames`` makes
the exchange unavailable, as on a kernel or filesystem without renameat2(RENAME_EXCHANGE).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from mmopt import store


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    target, step = Path(sys.argv[1]), sys.argv[2]
    if "--two-renames" in sys.argv:
        store._exchange = lambda a, b: False
    real_exchange, real_rename = store._exchange, os.rename
    renames = []

    def exchange(a, b):
        done = real_exchange(a, b)
        if done and step == "swapped":
            die()
        return done

    def rename(a, b):
        real_rename(a, b)
        renames.append((a, b))
        if step == "old-renamed" and len(renames) == 1 and Path(a) == target:
            die()
        if step == "pause-between" and len(renames) == 1:
            print("between", flush=True)
            time.sleep(2)
        if step == "new-renamed" and len(renames) == 2:
            die()

    store._exchange = exchange
    os.rename = rename  # for the whole process: in this driver only the store renames anything
    with store.transaction(target, keep_existing=True) as stage:
        if step == "staged":
            die()
        m = json.loads((stage / "manifest.json").read_text())
        m["generation"] = m.get("generation", 0) + 1
        (stage / f"gen{m['generation']}.txt").write_text("new\n")
        (stage / "manifest.json").unlink()
        (stage / "manifest.json").write_text(json.dumps(m))
        if step == "written":
            die()
        if step == "slow":
            print("staged", flush=True)
            time.sleep(1)
    print("committed", m["generation"])


if __name__ == "__main__":
    main()
