"""``hbone-proxy run`` flag parsing: every flag has an HBONE_PROXY_* twin; flags win over the environment."""

from __future__ import annotations

import pytest

from proxy.run import UsageError, parse_settings


def test_flags_and_defaults():
    s = parse_settings(["--mode", "node", "--node", "node-a", "--config", "a.yaml", "--config", "dir",
                        "--socks5-addr", "127.0.0.5:1080", "--admin-addr", "127.0.0.5:15000",
                        "--metrics-addr", "off", "--drain-deadline", "1.5", "--workers", "3"], environ={})
    assert s.mode == "node" and s.node == "node-a" and s.config_paths == ("a.yaml", "dir")
    assert s.socks5_addr == ("127.0.0.5", 1080) and s.metrics_addr is None
    assert s.drain_deadline_s == 1.5 and s.workers == 3
    assert s.hbone_addr == ("0.0.0.0", 15008) and s.inbound_plaintext_addr is None
    assert s.access_log == "-"


def test_environment_equivalents_and_precedence():
    env = {"HBONE_PROXY_MODE": "waypoint", "HBONE_PROXY_CONFIG": "x.yaml:y.yaml",
           "HBONE_PROXY_HBONE_ADDR": "127.0.0.9:15008", "HBONE_PROXY_DRAIN_DEADLINE": "7",
           "HBONE_PROXY_ACCESS_LOG": "off", "HBONE_PROXY_GATEWAY": "default/wp"}
    s = parse_settings([], environ=env)
    assert (s.mode, s.config_paths, s.hbone_addr, s.drain_deadline_s, s.access_log, s.gateway) == (
        "waypoint", ("x.yaml", "y.yaml"), ("127.0.0.9", 15008), 7.0, None, "default/wp")
    s = parse_settings(["--drain-deadline", "2"], environ=env)
    assert s.drain_deadline_s == 2.0


@pytest.mark.parametrize("argv, needle", [
    (["--mode", "node", "--config", "c"], "--node NAME"),
    (["--node", "a", "--config", "c"], "--mode"),
    (["--mode", "node", "--node", "a"], "--config"),
    (["--mode", "node", "--node", "a", "--config", "c", "--hbone-addr", "host:1"], "not an IP address"),
    (["--mode", "node", "--node", "a", "--config", "c", "--workers", "0"], "1..256"),
    (["--mode", "bogus", "--config", "c"], "invalid choice"),
])
def test_usage_errors(argv, needle):
    with pytest.raises(UsageError) as err:
        parse_settings(argv, environ={})
    assert needle in str(err.value)


def test_bad_environment_value_names_the_variable():
    with pytest.raises(UsageError) as err:
        parse_settings(["--mode", "node", "--node", "a", "--config", "c"], environ={"HBONE_PROXY_SOCKS5_ADDR": "x"})
    assert "HBONE_PROXY_SOCKS5_ADDR" in str(err.value)
