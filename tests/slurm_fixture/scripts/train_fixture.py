"""Emulates morphomol's resumable trainer for the SLURM fault tests.

* one checkpoint per finished epoch (atomic write: temp file + rename)
* on SIGTERM (scancel, SLURM time limit, preemption): write the checkpoint with
  the epochs finished so far, mark it `"reason": "SIGTERM"` and exit 143
* on start: resume from the checkpoint when it belongs to the same inputs
  (fingerprint of input contents + number of epochs), else start at epoch 0
* every finished epoch appends `epoch=<i> job=<SLURM_JOB_ID>` to
  <state-dir>/epochs.log, so a test can prove no epoch was computed twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--epoch-seconds", type=float, required=True)
    a = ap.parse_args()

    state_dir = Path(a.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt = state_dir / "checkpoint.json"
    ledger = state_dir / "epochs.log"
    job = os.environ.get("SLURM_JOB_ID", f"local-{os.getpid()}")

    h = hashlib.sha256(str(a.epochs).encode())
    for p in a.input:
        h.update(Path(p).read_bytes())
    fingerprint = h.hexdigest()

    start = 0
    if ckpt.exists():
        saved = json.loads(ckpt.read_text())
        if saved.get("fingerprint") == fingerprint:
            start = int(saved["epoch"])
            print(f"resuming from checkpoint: {start}/{a.epochs} epochs done "
                  f"(saved by job {saved.get('job')} on {saved.get('reason')})", flush=True)
        else:
            print("checkpoint belongs to other inputs: starting from epoch 0", flush=True)

    def save(epoch: int, reason: str) -> None:
        atomic_write(ckpt, json.dumps({"epoch": epoch, "fingerprint": fingerprint,
                                       "job": job, "reason": reason}))

    done = start
    stop = {"flag": False}

    def on_sigterm(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_sigterm)

    for epoch in range(start, a.epochs):
        t_end = time.monotonic() + a.epoch_seconds
        while time.monotonic() < t_end and not stop["flag"]:
            time.sleep(min(0.05, max(0.0, t_end - time.monotonic())))
        if stop["flag"]:
            break
        with ledger.open("a") as f:
            f.write(f"epoch={epoch} job={job}\n")
        done = epoch + 1
        save(done, "epoch_end")
        print(f"epoch {epoch + 1}/{a.epochs} done (job {job})", flush=True)

    if stop["flag"]:
        save(done, "SIGTERM")
        print(f"SIGTERM: checkpoint written at {done}/{a.epochs} epochs, exiting", flush=True)
        return 143

    out = Path(a.out)
    atomic_write(out, f"model trained for {a.epochs} epochs\n")
    print(f"training finished: {a.epochs} epochs ({a.epochs - start} in this job)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
