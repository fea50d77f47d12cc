"""``/config_dump`` ``config.reloads_ok`` / ``reloads_failed`` and ``hbone_config_reloads_total{result}`` count
the same thing: reloads (SIGHUP, a changed file). The initial load is a load, not a reload: right after start
both say 0; after one good and one bad reload both say 1 and 1. A real ``hbone-proxy run`` node proxy."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.mesh import BAD_POLICY, Mesh

WAIT_S = 10.0   # a reload on a loaded 2-core box takes well under a second


def _metric(proc, result: str) -> float:
    status, body = proc.get("metrics", "/metrics")
    assert status == 200
    line = f'hbone_config_reloads_total{{result="{result}"}} '
    [value] = [ln[len(line):] for ln in body.decode().splitlines() if ln.startswith(line)]
    return float(value)


def _counts(proc) -> tuple[int, int, float, float]:
    config = proc.config_dump()["config"]
    return config["reloads_ok"], config["reloads_failed"], _metric(proc, "success"), _metric(proc, "failure")


def _wait(proc, want: tuple) -> None:
    deadline = time.monotonic() + WAIT_S
    while _counts(proc) != want:
        assert time.monotonic() < deadline, (_counts(proc), want)
        time.sleep(0.05)


@pytest.fixture
def mesh(tmp_path):
    m = Mesh(tmp_path)
    yield m
    m.close()


def test_dump_and_metric_agree_from_the_start(mesh):
    node = mesh.start_node("node-a", 1, extra=("--config-poll-interval", "0"))
    assert node.config_dump()["config"]["version"] == 1
    assert _counts(node) == (0, 0, 0.0, 0.0)        # started: one load, no reload
    node.popen.send_signal(signal.SIGHUP)
    _wait(node, (1, 0, 1.0, 0.0))
    mesh.write("bad.yaml", BAD_POLICY)
    node.popen.send_signal(signal.SIGHUP)
    _wait(node, (1, 1, 1.0, 1.0))
    assert node.config_dump()["config"]["version"] == 2   # the bad file kept the last good config
