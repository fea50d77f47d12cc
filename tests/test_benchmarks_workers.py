"""The workers scenario (benchmarks/workers.py) and its new-connection client (benchmarks/conn_client.py).

Untimed: the pure parts (the client's hand-made HTTP/2 bytes, listener counting, the spread figure)
and one tiny end-to-end run of ``hbone-proxy run --mode node --workers 1`` and ``--workers 2`` where
every connection is a real TCP + mTLS handshake with a certificate from our CA, a CONNECT and an
echo through the sink — and where both workers of the 2-worker proxy must have served some of them."""

from __future__ import annotations

import os
import socket

import hpack
import pytest
from hyperframe.frame import Frame

from benchmarks import conn_client, procstat
from benchmarks.report import Row, ScenarioResult, render
from benchmarks.tools import Toolbox
from benchmarks.workers import (COLUMNS, Options, WorkersLab, busiest_share, cpu_bound_ratio, listening_sockets,
                                projected_scale, run_workers, verdict_notes)

# ------------------------------------------------------------------------------ the client's bytes


def test_request_bytes_are_a_valid_preface_settings_headers_and_data():
    first, data = conn_client.request_bytes("127.9.9.9:4242")
    assert first.startswith(conn_client.PREFACE)
    rest = first[len(conn_client.PREFACE):]
    frames = []
    while rest:
        f, length = Frame.parse_frame_header(memoryview(rest[:9]))
        f.parse_body(memoryview(rest[9:9 + length]))
        frames.append(f)
        rest = rest[9 + length:]
    settings, headers = frames
    assert settings.type == 0x4 and settings.stream_id == 0 and not settings.flags
    assert headers.type == 0x1 and headers.stream_id == 1 and "END_HEADERS" in headers.flags
    assert hpack.Decoder().decode(headers.data, raw=True) == [(b":method", b"CONNECT"),
                                                             (b":authority", b"127.9.9.9:4242")]
    f, length = Frame.parse_frame_header(memoryview(data[:9]))
    f.parse_body(memoryview(data[9:]))
    assert f.type == 0x0 and f.stream_id == 1 and "END_STREAM" in f.flags
    assert len(f.data) == 9 + conn_client.PAYLOAD_BYTES and f.data[:1] == b"E"  # wire: echo 1 KiB


def test_response_status_fast_form_and_hpack_fallback():
    assert conn_client.response_status(bytes([0x88])) == 200
    assert conn_client.response_status(hpack.Encoder().encode([(":status", "503")])) == 503
    # A huffman-coded literal 200 (not the one-byte form) still decodes.
    assert conn_client.response_status(hpack.Encoder().encode([(":status", "200"), ("x", "y")], huffman=True)) == 200


def test_unpad_strips_padding_and_priority():
    assert conn_client._unpad(b"\x02abc\x00\x00", conn_client.PADDED) == b"abc"
    assert conn_client._unpad(b"\x00\x00\x00\x01\x10blk", conn_client.PRIORITY) == b"blk"
    assert conn_client._unpad(b"plain", 0) == b"plain"


def test_split_shares_out_the_remainder():
    assert conn_client.split(10, 3) == [4, 3, 3]
    assert sum(conn_client.split(1001, 2)) == 1001


# --------------------------------------------------------------------------- what is measured


def test_listening_sockets_counts_each_so_reuseport_listener(loopback_ip):
    ip = loopback_ip()
    socks = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((ip, 0 if not socks else socks[0].getsockname()[1]))
            socks.append(s)
        port = socks[0].getsockname()[1]
        assert listening_sockets((ip, port)) == 0   # bound is not listening
        socks[0].listen()
        assert listening_sockets((ip, port)) == 1
        socks[1].listen()
        assert listening_sockets((ip, port)) == 2
    finally:
        for s in socks:
            s.close()


def test_busiest_share_is_over_the_n_busiest_and_none_when_idle():
    before = {1: 1.0, 2: 5.0, 3: 0.0}
    after = {1: 1.0, 2: 8.0, 3: 1.0, 4: 1.0}      # pid 1 is an idle supervisor
    assert busiest_share(before, after, 2) == pytest.approx(3 / 4)
    assert busiest_share(before, after, 1) == 1.0
    assert busiest_share(before, before, 2) is None


def test_machine_busy_is_monotonic_and_cpu_count_matches():
    b0, a0 = conn_client.machine_busy_s()
    b1, a1 = conn_client.machine_busy_s()
    assert 0 <= b0 <= a0 and b1 >= b0 and a1 >= a0
    assert conn_client.cpu_count() == os.cpu_count()


def test_cpu_bound_ratio_and_projection():
    # Nothing but the proxy on many cores, even spread, same cost per connection: ×2 is 2×.
    assert cpu_bound_ratio(1000, 1000, 0, 0, 2, 0.5, 64) == pytest.approx(2.0)
    # An uneven spread: the busiest worker (75 %) at a full core sets the rate.
    assert cpu_bound_ratio(1000, 1000, 0, 0, 2, 0.75, 64) == pytest.approx(1 / 0.75)
    # 2 cores shared with a client as costly as the proxy: ×1 is held to 1 core, ×2 to all the box.
    assert cpu_bound_ratio(1000, 1000, 1000, 0, 2, 0.5, 2) == pytest.approx(1.0)
    assert projected_scale(0.9, 0.5) == pytest.approx(1.8)


def _row(name, **metrics):
    row = Row(name, "c-conn")
    for k, v in metrics.items():
        row.add(k, v)
    return row


def test_verdict_says_when_the_machine_was_the_limit_and_never_passes_then():
    base = dict(proxy_us_per_conn=2000, client_us_per_conn=800, sink_us_per_conn=80, busiest_pct=50)
    res = ScenarioResult("workers", "t", COLUMNS, rows=[
        _row("ours-node ×1", conn_s=500, bench_cores=1.9, machine_cores=1.95, **base),
        _row("ours-node ×2", conn_s=650, scale_wall=1.3, scale_per_cpu=1.0, bench_cores=1.95, machine_cores=1.98,
             **base)])
    (note, legend) = verdict_notes(res, (1, 2), cores=2)
    assert note.startswith("ours-node ×2: 1.30× the ×1 wall rate, 1.00× its connections per proxy CPU-s")
    assert "MACHINE WAS THE LIMIT" in note and "cannot be shown on this machine" in note
    assert "project ~2.00× (a projection, not a measurement)" in note and "meets" not in note
    assert "busiest worker %" in legend
    # Not saturated: the wall ratio is judged against the target.
    res.rows[1].samples["machine_cores"] = [1.2]
    assert "misses the ≥ 1.7× target" in verdict_notes(res, (1, 2), cores=2)[0]
    res.rows[1].samples["scale_wall"] = [1.8]
    assert "meets the ≥ 1.7× target" in verdict_notes(res, (1, 2), cores=2)[0]


# ------------------------------------------------------------------------------------ end to end


def _c_client_buildable() -> bool:
    import shutil
    return bool(shutil.which("cc") or shutil.which("gcc")) and os.path.exists("/usr/include/openssl/ssl.h")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("client", [
    "python", pytest.param("c", marks=pytest.mark.skipif(not _c_client_buildable(), reason="no cc / OpenSSL headers"))])
def test_tiny_workers_run_spreads_connections_over_both_workers(client):
    """120 connections per row, 1 repetition, our node proxy with 1 and with 2 workers (no nghttpx:
    the tunnel tests cover it), with each client: every connection completes (a short count fails
    the row), both workers of ×2 served some (worker 0's /metrics count is neither 0 nor all), the
    ratios and the verdict note are there, and stopping the lab leaves no worker behind. No
    performance assertion."""
    with WorkersLab(Toolbox(allow_install=False), nghttpx=False, client=client) as lab:
        assert lab.client == f"{client}-conn"
        assert [t.name for t in lab.targets] == ["ours-node ×1", "ours-node ×2"], lab.unavailable
        two = lab.targets[1]
        assert listening_sockets(two.address) == 2
        workers = [p for p in procstat.descendants(two.party.pid) if p != two.party.pid]
        assert len(workers) == 2
        res = run_workers(lab, Options(count=120, repeat=1, warmup=10, concurrency=16, procs=2))
    for pid in [two.party.pid, *workers]:
        assert not os.path.exists(f"/proc/{pid}/stat") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
    rows = {r.target: r for r in res.rows}
    assert set(rows) == {"ours-node ×1", "ours-node ×2"}
    for row in rows.values():
        assert row.note is None, row.note
        assert row.samples["conn_s"][0] > 0 and row.samples["proxy_us_per_conn"][0] > 0
        assert row.samples["client_us_per_conn"][0] > 0
    assert rows["ours-node ×1"].samples["w0_conn_pct"] == [100.0]
    w0 = rows["ours-node ×2"].samples["w0_conn_pct"][0]
    assert 0 < w0 < 100, f"worker 0 served {w0:.0f} % of the connections: one worker idle"
    assert rows["ours-node ×2"].samples["busiest_pct"][0] < 100
    assert rows["ours-node ×2"].samples["scale_wall"] and rows["ours-node ×2"].samples["scale_per_cpu"]
    assert any(n.startswith("ours-node ×2: ") for n in res.notes)
    table = render(res)
    assert "ours-node ×2" in table and "busiest worker %" in table


# ------------------------------------------------------------- proxy/run.py's --workers supervisor

_SUPERVISOR_SCRIPT = """
import sys, time
import proxy.run as run
spawns = sys.argv[1]

def fake_worker(settings, worker=0):
    with open(spawns, "a") as f:
        f.write(f"{worker}\\n")
    with open(spawns) as f:
        if len(f.read().splitlines()) <= 2:
            return 1          # a crash: the supervisor restarts it (the 2nd time after a back-off)
    time.sleep(60)            # a worker nobody will signal sits here
    return 0

run._run_one = fake_worker
settings = run.parse_settings(["--mode", "node", "--node", "n", "--config", spawns, "--workers", "1"])
sys.exit(run._supervise(settings))
"""


@pytest.mark.timeout(60)
def test_supervisor_does_not_restart_a_worker_after_sigterm_during_the_back_off(tmp_path):
    """A worker that crashes twice in a row is restarted after WORKER_RESTART_BACKOFF_S; a SIGTERM
    arriving during that back-off must stop the supervisor, not start a worker that no one will
    signal (which kept the supervisor waiting for it)."""
    import signal
    import subprocess
    import sys
    import time
    spawns = tmp_path / "spawns"
    proc = subprocess.Popen([sys.executable, "-c", _SUPERVISOR_SCRIPT, str(spawns)], start_new_session=True,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (spawns.exists() and len(spawns.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.02)
        time.sleep(0.3)   # the 2nd crash is seen at once; the supervisor is now in its 1 s back-off
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert len(spawns.read_text().splitlines()) == 2, "a worker was started after SIGTERM"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
