"""A key twice in one mapping fails the load, as kubectl and istioctl refuse such a file (go-yaml: "mapping key
... already defined"; Kubernetes' strict decoding: "duplicate field"), instead of PyYAML's silent last-wins —
which would turn ``action: DENY`` ... ``action: ALLOW`` into an ALLOW policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policy.documents import load_text
from policy.errors import ConfigError, ConfigErrors
from policy.mesh import load_mesh_config

REPO = Path(__file__).resolve().parent.parent

DENY_THEN_ALLOW = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: x
  namespace: default
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin"]
  action: ALLOW
"""


def _error(text: str) -> str:
    with pytest.raises((ConfigError, ConfigErrors)) as err:
        load_text(text, "f.yaml")
    return str(err.value)


def test_a_policy_with_its_action_twice_does_not_load():
    assert _error(DENY_THEN_ALLOW) == 'f.yaml: document 1: mapping key "action" already defined at line 7 (again at line 12)'


@pytest.mark.parametrize("text,key", [
    ("a: 1\na: 2\n", "a"),
    ("spec:\n  rules:\n  - from: []\n    from: []\n", "from"),
    ("---\nok: 1\n---\nx: {k: 1, k: 2}\n", "k"),
    ("'q': 1\nq: 2\n", "q"),                       # quoting does not make another key
])
def test_duplicates_at_any_depth_are_named(text, key):
    assert f'mapping key "{key}" already defined' in _error(text)


def test_keys_yaml_tells_apart_and_merge_overrides_still_load():
    # 1 (an int) and "1" (a string) are two keys; an explicit key may override one a << merge brought in.
    assert load_text('1: a\n"1": b\n')[0][1] == {1: "a", "1": "b"}
    assert load_text("base: &b {k: 1, j: 2}\nuse:\n  <<: *b\n  k: 3\n")[0][1]["use"] == {"k": 3, "j": 2}


def test_json_objects_with_a_key_twice_do_not_load(tmp_path):
    (tmp_path / "p.json").write_text('{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", '
                                     '"metadata": {"name": "x", "namespace": "default"}, '
                                     '"spec": {"action": "DENY", "action": "ALLOW"}}')
    with pytest.raises((ConfigError, ConfigErrors)) as err:
        load_mesh_config([str(tmp_path)])
    assert 'duplicate key "action" in a JSON object' in str(err.value)


def test_config_check_refuses_the_file(tmp_path):
    (tmp_path / "p.yaml").write_text(DENY_THEN_ALLOW)
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "config", "check", str(tmp_path / "p.yaml")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert 'p.yaml: document 1: mapping key "action" already defined at line 7 (again at line 12)' in r.stderr + r.stdout
