"""One writer per OUT, for real (issue 22, class 3): many processes call ``hold`` at the same
moment, over many trials, on a fresh OUT, on one a killed run left locked, and on ones whose
lock file holds a malformed record; never are two inside at once. A malformed record is a
message or is taken over, never a traceback and never refused forever. No Ray."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dermray.io.lock import NAME, LockedError, hold

PROCESSES = 8
TRIALS = 400
# what a trial's OUT starts with: nothing, or a lock file a killed or broken run left
START = [None, '{"pid": 999999999, "host": "HOST", "command": "dermray run", "started": "x"}',
         "", '{"pid": "abc"}', '{"pid": 0}', "not json", '{"pid": -1}', "[]"]
REPO = Path(__file__).resolve().parents[2]


def contender(root: str, barrier, trials: int, results) -> None:
    """Each trial: wait for every contender, then try OUT's lock once; inside, claim a marker
    file with O_EXCL (a second holder finds it there) and hold it for a moment. Reports how
    many times it held and was refused, and the trials where it met another holder or an
    error (a traceback, where a message was due)."""
    held = refused = 0
    overlaps, errors = [], []
    for trial in range(trials):
        out = Path(root, f"t{trial}")
        barrier.wait()
        try:
            with hold(str(out), "race"):
                try:
                    fd = os.open(out / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    overlaps.append(trial)
                    continue
                time.sleep(0.002)
                os.close(fd)
                os.unlink(out / "inside")
                held += 1
        except LockedError:
            refused += 1
        except Exception:  # noqa: BLE001 - counted: a traceback is a failure of this test
            errors.append(trial)
    results.put((held, refused, overlaps, errors))


def test_many_processes_at_once_never_two_holders(tmp_path):
    """8 processes x 400 trials, a fresh OUT each (one in eight fresh; the others start with a
    dead holder's record or a broken one): about 3 s. The lock before this one (O_EXCL, then
    the record written), in the same harness, three runs: two holders in 5 to 19 of 400 trials
    on fresh OUTs; with these starting records, 54 to 114 trials with two holders and 50 with a
    traceback."""
    import socket

    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}"
        out.mkdir()
        start = START[trial % len(START)]
        if start is not None:
            (out / NAME).write_text(start.replace("HOST", socket.gethostname()))
    # a server process that imported the lock module once, forking the contenders: no
    # thread of this process in them, and no import each
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dermray.io.lock"])
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=contender, args=(str(tmp_path), barrier, TRIALS, results))
             for _ in range(PROCESSES)]
    begin = time.monotonic()
    for proc in procs:
        proc.start()
    counts = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    seconds = time.monotonic() - begin
    held, refused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    overlaps = sorted({t for c in counts for t in c[2]})
    errors = sorted({t for c in counts for t in c[3]})
    print(f"\n{PROCESSES} processes x {TRIALS} trials in {seconds:.1f} s: held {held}, "
          f"refused {refused}, trials with two holders {len(overlaps)}, with errors "
          f"{len(errors)}")
    assert overlaps == [] and errors == []
    assert held + refused == PROCESSES * TRIALS
    assert held >= TRIALS  # every trial, a killed run's or a broken record included, was taken
    # every holder left: no lock file and no marker behind
    assert not list(tmp_path.glob(f"t*/{NAME}")) and not list(tmp_path.glob("t*/inside"))


HOLDER = """
import sys, time
from dermray.io.lock import hold
with hold(sys.argv[1], "dermray run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_holder_is_named_and_a_broken_record_is_a_message(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"pid {holder.pid} on .*`dermray run`"), \
                hold(str(out)):
            pass
        # the record damaged under a live holder: still refused, with a message, at once
        for record in ("", '{"pid": "abc"}', '{"pid": 0}', "\x00\x01"):
            (out / NAME).write_text(record)
            begin = time.monotonic()
            with pytest.raises(LockedError, match="in use by another process"), hold(str(out)):
                pass
            assert time.monotonic() - begin < 5
    finally:
        holder.kill()
        holder.wait()
    # its holder killed: the lock is free (the kernel let it go), whatever the record says
    with hold(str(out), "next"):
        assert json.loads((out / NAME).read_text())["command"] == "next"
    assert not (out / NAME).exists()


def test_a_stage_inside_a_run_shares_the_runs_lock(tmp_path):
    with hold(str(tmp_path), "dermray run"):
        with hold(str(tmp_path), "dermray data split"):
            assert json.loads((tmp_path / NAME).read_text())["command"] == "dermray run"
        assert (tmp_path / NAME).exists()  # the inner block leaves the run's lock in place
    assert not (tmp_path / NAME).exists()
