"""Who uses the machine's CPUs while a command runs: every process's CPU seconds (from /proc,
sampled every few seconds), grouped, beside the machine's idle and steal time, in one run.

Made for the extraction (issue 21): the job runs at a share of the direct call's rate, and this
says whether the rest of the cores went to the embedding actor's own work, to Ray's processes, to
the driver, to the hypervisor (steal) or to nothing (idle).

    python benchmarks/cpu_share.py --json out/bench_cpu_share.json -- \
        dermray run --config ray_jobs/configs/ham10000_local.yaml --out out/ham_extract

Linux only (/proc). A process that starts and ends between two samples is not counted; the
groups' sum against the machine's busy time says how much that missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# group -> parts of a process's command line that put it there; the first group that matches wins
GROUPS = {"embedding actor (Ray Data's map worker)": ("ray::MapWorker",),
          "Ray workers, idle or in a task": ("ray::IDLE",),
          "Ray's own actors (Ray Data's stats, autoscaling, dashboard agent)": ("ray::",),
          "Ray services (GCS, raylet, dashboard, log monitor)": (
              "gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py")}


def process_cpu() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and its command line."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            out[int(pid)] = ((int(fields[11]) + int(fields[12])) / TICK, cmd)
        except (OSError, ValueError, IndexError):  # gone between listing and reading
            pass
    return out


def machine_cpu() -> dict[str, float]:
    """The machine's CPU seconds so far, by state (/proc/stat's first line)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:1 + len(names)]
    return {n: int(v) / TICK for n, v in zip(names, values)}


def group_of(pid: int, cmd: str, driver: int) -> str:
    if pid == driver:
        return "the command (driver)"
    for group, parts in GROUPS.items():
        if any(part in cmd for part in parts):
            return group
    return "everything else on the machine"


def measure(command: list[str], every: float = 3.0) -> dict:
    seen: dict[int, dict] = {}
    start_machine, start = machine_cpu(), time.perf_counter()
    proc = subprocess.Popen(command)
    while True:
        for pid, (cpu, cmd) in process_cpu().items():
            entry = seen.setdefault(pid, {"first": cpu, "cmd": cmd})
            entry["last"], entry["cmd"] = cpu, cmd or entry["cmd"]
        if proc.poll() is not None:
            break
        time.sleep(every)
    wall = time.perf_counter() - start
    end_machine = machine_cpu()
    machine = {k: end_machine[k] - start_machine[k] for k in end_machine}
    total = sum(machine.values())
    groups: dict[str, float] = {}
    for pid, entry in seen.items():
        used = entry["last"] - entry["first"]
        if used > 0:
            name = group_of(pid, entry["cmd"], proc.pid)
            groups[name] = groups.get(name, 0.0) + used
    busy = total - machine["idle"] - machine["iowait"] - machine["steal"]
    seconds = {**groups, "idle": machine["idle"] + machine["iowait"], "steal": machine["steal"]}
    return {"command": command, "exit_code": proc.returncode, "wall_s": wall,
            "cpu_seconds_available": total, "machine": machine,
            "groups_cpu_s": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "share_of_available": {k: v / total for k, v in seconds.items()},
            "not_attributed_s": busy - sum(groups.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default="out/bench_cpu_share.json")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between samples")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    result = measure(command, args.every)
    print(f"wall {result['wall_s']:.1f} s, {result['cpu_seconds_available']:.0f} CPU seconds "
          f"available on {os.cpu_count()} CPUs; exit code {result['exit_code']}")
    for name, share in sorted(result["share_of_available"].items(), key=lambda kv: -kv[1]):
        print(f"  {share:6.1%}  {share * result['cpu_seconds_available']:8.1f} s  {name}")
    print(f"  busy but not attributed (processes between samples): "
          f"{result['not_attributed_s']:.1f} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
