"""`hbone-proxy certs init|issue|inspect` through the installed console script, as a user runs it."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from certs.bundle import CertBundle
from certs.cli import format_duration, format_serial, parse_duration
from certs.errors import CertError
from certs.spiffe import SpiffeId

HBONE_PROXY = Path(sys.executable).with_name("hbone-proxy")  # .venv/bin/hbone-proxy
CLI_TIMEOUT_S = 30  # a cold start imports cryptography; generous for a loaded 2-core box


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HBONE_PROXY), "certs", *args], cwd=cwd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_init_issue_inspect_round_trip(tmp_path):
    p = run("init", "--dir", "ca", "--trust-domain", "example.org", "--now", "2030-01-01T00:00:00Z", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "trust domain example.org" in p.stdout and "root-cert.pem" in p.stdout
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "root-key.pem").st_mode) == 0o600

    p = run("issue", "--dir", "ca", "--namespace", "bookinfo", "--service-account", "reviews", "--ttl", "36h",
            "--out", "reviews", "--now", "2030-01-02T00:00:00Z", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "spiffe://example.org/ns/bookinfo/sa/reviews" in p.stdout
    cert, key = tmp_path / "reviews-cert.pem", tmp_path / "reviews-key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    b = CertBundle.from_files(cert, key, tmp_path / "ca" / "root-cert.pem")  # the files work together
    assert b.identity == SpiffeId("example.org", "bookinfo", "reviews")
    assert b.not_before == datetime(2030, 1, 2, tzinfo=timezone.utc)
    assert b.not_after - b.not_before == timedelta(hours=36)

    p = run("inspect", "reviews-cert.pem", "--now", "2030-01-02T12:00:00Z", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "reviews-cert.pem"
    rows = dict(re.fullmatch(r"  (\S+(?: \S+)*)\s{2,}(.*)", line).groups() for line in lines[1:])  # "  key  value"
    assert rows["identity"] == "spiffe://example.org/ns/bookinfo/sa/reviews"
    assert rows["issuer"] == "CN=example.org root CA,O=hbone-proxy"
    assert rows["not before"] == "2030-01-02 00:00:00 UTC"
    assert rows["not after"] == "2030-01-03 12:00:00 UTC"
    assert rows["status"].startswith("valid (expires in 1d")
    assert rows["usage"] == "digitalSignature, serverAuth, clientAuth"
    assert rows["CA"] == "no"
    assert len(rows["serial"].split(":")) >= 8

    p = run("inspect", "reviews-cert.pem", "--now", "2030-01-04T13:30:00Z", cwd=tmp_path)
    assert "EXPIRED (1d1h ago)" in p.stdout and p.returncode == 0

    p = run("inspect", "ca/root-cert.pem", "--now", "2029-12-31T23:00:00Z", cwd=tmp_path)
    assert "- (CA certificate)" in p.stdout and "NOT YET VALID (starts in 1h)" in p.stdout and "keyCertSign" in p.stdout


def test_inspect_chain_file_shows_every_certificate(tmp_path):
    assert run("init", "--dir", "ca", cwd=tmp_path).returncode == 0
    assert run("issue", "--dir", "ca", "--namespace", "ns", "--service-account", "sa", "--out", "w", cwd=tmp_path).returncode == 0
    (tmp_path / "chain.pem").write_bytes((tmp_path / "w-cert.pem").read_bytes() + (tmp_path / "ca" / "root-cert.pem").read_bytes())
    p = run("inspect", "chain.pem", cwd=tmp_path)
    assert p.returncode == 0
    assert "certificate 1 of 2" in p.stdout and "certificate 2 of 2" in p.stdout
    assert "spiffe://cluster.local/ns/ns/sa/sa" in p.stdout and "status      valid" in p.stdout


def test_errors_are_one_line_exit_2(tmp_path):
    assert run("init", "--dir", "ca", cwd=tmp_path).returncode == 0
    assert_clean_error(run("init", "--dir", "ca", cwd=tmp_path), "already exists")
    assert_clean_error(run("init", "--dir", "x", "--trust-domain", "Not Valid", cwd=tmp_path), "invalid trust domain")
    assert_clean_error(run("issue", "--dir", "nowhere", "--namespace", "a", "--service-account", "b", "--out", "o", cwd=tmp_path),
                       "nowhere/ca.json: not found")
    assert_clean_error(run("issue", "--dir", "ca", "--namespace", "a/b", "--service-account", "b", "--out", "o", cwd=tmp_path),
                       "invalid identity", "namespace")
    assert_clean_error(run("issue", "--dir", "ca", "--namespace", "a", "--service-account", "b", "--out", "o", "--ttl", "24x", cwd=tmp_path),
                       "invalid duration '24x'")
    assert_clean_error(run("issue", "--dir", "ca", "--namespace", "a", "--service-account", "b", "--out", "missing/o", cwd=tmp_path),
                       "no such directory")
    assert_clean_error(run("issue", "--dir", "ca", "--namespace", "a", "--service-account", "b", cwd=tmp_path), "--out")
    assert_clean_error(run("inspect", "nope.pem", cwd=tmp_path), "nope.pem: not found")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert_clean_error(run("inspect", "junk.pem", cwd=tmp_path), "junk.pem: no PEM certificate")
    assert_clean_error(run("inspect", "ca/root-key.pem", cwd=tmp_path), "no PEM certificate")
    assert_clean_error(run("bogus", cwd=tmp_path), "invalid choice")
    assert not list(tmp_path.glob("o-*")) and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "text,expected",
    [("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("24h", timedelta(hours=24)),
     ("7d", timedelta(days=7)), ("1h30m", timedelta(minutes=90)), ("1d12h", timedelta(hours=36))],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "-1h", "1.5h", "1 h", "0s", "0h0m", "1w", "1H", "24h ", "1h-"])
def test_parse_duration_rejects(text):
    with pytest.raises(CertError, match="invalid duration"):
        parse_duration(text)


def test_format_duration():
    assert format_duration(timedelta(days=3, hours=4, minutes=5)) == "3d4h"
    assert format_duration(timedelta(hours=23, minutes=59, seconds=59)) == "23h59m"
    assert format_duration(timedelta(seconds=45)) == "45s"
    assert format_duration(timedelta(0)) == "0s"


def test_format_serial():
    assert format_serial(0x0102FF) == "01:02:ff"
    assert format_serial(0) == "00"
    assert format_serial(-0x10) == "-10"  # RFC 5280 forbids it; a broken certificate must still print
