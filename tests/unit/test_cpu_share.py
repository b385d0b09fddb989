"""benchmarks/cpu_share.py: the CPU seconds of a command's process are counted as its own, and
the other processes are grouped by what they are (the tool behind docs/performance.md's table of
who used the cores during the real extraction)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_cpu_share():
    spec = importlib.util.spec_from_file_location("cpu_share", REPO / "benchmarks" / "cpu_share.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc (Linux)")
def test_a_busy_command_is_counted_as_the_driver():
    cpu_share = load_cpu_share()
    burn = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass"
    result = cpu_share.measure([sys.executable, "-c", burn], every=0.2)
    assert result["exit_code"] == 0
    driver = result["groups_cpu_s"]["the command (driver)"]
    # the command burned 1 s of CPU; the first sample may miss its first fraction of a second
    assert 0.5 <= driver <= 1.6
    assert result["cpu_seconds_available"] >= result["wall_s"]  # at least one CPU's worth
    shares = result["share_of_available"]
    assert 0.0 < shares["the command (driver)"] < 1.0
    assert shares["idle"] >= 0.0 and shares["steal"] >= 0.0


def test_processes_are_grouped_by_what_they_are():
    cpu_share = load_cpu_share()
    actor = "ray::MapWorker(MapBatches(decode_batch)->MapBatches(Embedder))"
    assert cpu_share.group_of(7, actor, driver=1).startswith("embedding actor")
    assert cpu_share.group_of(7, "/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp",
                              driver=1).startswith("Ray services")
    assert cpu_share.group_of(7, "ray::_StatsActor", driver=1).startswith("Ray's own actors")
    assert cpu_share.group_of(1, actor, driver=1) == "the command (driver)"
    assert cpu_share.group_of(7, "/usr/bin/vim notes.md", driver=1) == \
        "everything else on the machine"
