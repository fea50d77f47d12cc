"""policy.documents: files, directories, multi-document YAML, kind: List, JSON, and hostile input."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import documents
from policy.documents import ListItemWhere, load_documents, load_text
from policy.errors import ConfigError, ConfigErrors

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def messages(err: ConfigError) -> list[str]:
    return err.message.splitlines()


def test_whole_fixture_file_loads_every_document_in_order():
    docs = load_documents([os.path.join(FIXTURES, "bookinfo", "reviews-routing.yaml")])
    assert [(w.document, d["kind"], d["metadata"]["name"]) for w, d in docs] == [
        (1, "VirtualService", "reviews"),
        (2, "DestinationRule", "reviews"),
        (3, "VirtualService", "bookinfo-productpage"),
    ]
    assert all(w.file.endswith("reviews-routing.yaml") for w, _ in docs)


def test_directory_reads_config_files_sorted_and_not_recursive(tmp_path):
    (tmp_path / "b.yaml").write_text("kind: B\n")
    (tmp_path / "a.yml").write_text("kind: A\n")
    (tmp_path / "c.json").write_text('{"kind": "C"}')
    (tmp_path / "notes.txt").write_text("not: config\n")
    (tmp_path / ".hidden.yaml").write_text("kind: Hidden\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.yaml").write_text("kind: D\n")
    docs = load_documents([str(tmp_path)])
    assert [d["kind"] for _, d in docs] == ["A", "B", "C"]
    assert [os.path.basename(w.file) for w, _ in docs] == ["a.yml", "b.yaml", "c.json"]


def test_multi_document_numbering_counts_empty_documents():
    # Document numbers are the `---` sections a user counts, empty ones included.
    text = "kind: A\n---\n# only a comment\n---\n---\nkind: D\n...\n---\nkind: E\n"
    docs = load_text(text, "f.yaml")
    assert [(w.document, d["kind"]) for w, d in docs] == [(1, "A"), (4, "D"), (5, "E")]


def test_kind_list_is_expanded_and_items_are_numbered():
    text = (
        "kind: Z\n---\n"
        "apiVersion: v1\nkind: List\nitems:\n- {kind: X, metadata: {name: a}}\n- null\n- {kind: Y}\n"
    )
    docs = load_text(text, "f.yaml")
    assert [(w.document, getattr(w, "item", None), d["kind"]) for w, d in docs] == [
        (1, None, "Z"), (2, 0, "X"), (2, 2, "Y")]
    where = docs[1][0]
    assert isinstance(where, ListItemWhere)
    assert where.with_resource("X", "default/a").describe() == "f.yaml: document 2 (List item 0: X default/a)"


def test_list_item_that_is_not_a_mapping_names_document_and_item():
    with pytest.raises(ConfigErrors) as e:
        load_text("kind: List\nitems:\n- {kind: X}\n- 42\n", "f.yaml")
    assert messages(e.value) == ["f.yaml: document 1 (List item 1): expected a mapping (a resource), got a number (42)"]


def test_list_items_not_a_list():
    with pytest.raises(ConfigError) as e:
        load_text("kind: List\nitems: {a: 1}\n", "f.yaml")
    assert messages(e.value) == ["f.yaml: document 1 (List): items: expected a list, got a mapping"]


def test_yaml_syntax_error_names_file_document_line_and_column():
    with pytest.raises(ConfigError) as e:
        load_text("kind: A\n---\nkind: B\nspec:\n  hosts: [a, b\n  x: 1\n", "bad.yaml")
    msg = e.value.message
    assert msg.startswith("bad.yaml: document 2: YAML syntax error at line 6, column")
    assert "line 6" in msg


def test_trailing_garbage_document_is_an_error_after_good_documents():
    with pytest.raises(ConfigError) as e:
        load_text("kind: A\n---\nkind: B\n---\n}}}{{{\n", "t.yaml")
    assert e.value.message.startswith("t.yaml: document 3: YAML syntax error at line 5")


@pytest.mark.parametrize("text, problem", [
    ("- a\n- b\n", "expected a mapping (an inventory or a resource), got a list"),
    ("just a string\n", "expected a mapping (an inventory or a resource), got a string ('just a string')"),
    ("42\n", "expected a mapping (an inventory or a resource), got a number (42)"),
    ("true\n", "expected a mapping (an inventory or a resource), got a boolean"),
])
def test_document_that_is_not_a_mapping(text, problem):
    with pytest.raises(ConfigError) as e:
        load_text(text, "f.yaml")
    assert messages(e.value) == [f"f.yaml: document 1: {problem}"]


def test_python_tags_are_refused_safe_loader_only():
    with pytest.raises(ConfigError) as e:
        load_text("x: !!python/object/apply:os.system ['true']\n", "evil.yaml")
    assert "could not determine a constructor" in e.value.message
    assert e.value.message.startswith("evil.yaml: document 1: YAML syntax error at line 1")


def test_binary_garbage_is_a_clear_error(tmp_path):
    f = tmp_path / "garbage.yaml"
    f.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as e:
        load_documents([str(f)])
    assert messages(e.value) == [f"{f}: document 1: not a text file: control characters are not allowed (character 0)"]


def test_invalid_utf8_is_a_clear_error():
    with pytest.raises(ConfigError) as e:
        load_text(b"kind: \xff\xfe\xfa\n", "f.yaml")
    assert e.value.message.startswith("f.yaml: document 1: ")


def test_missing_and_unreadable_paths_are_named_and_all_reported(tmp_path):
    missing = tmp_path / "nope.yaml"
    good = tmp_path / "good.yaml"
    good.write_text("kind: A\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("[unclosed\n")
    with pytest.raises(ConfigErrors) as e:
        load_documents([str(missing), str(good), str(bad)])
    lines = messages(e.value)
    assert lines[0] == f"{missing}: cannot read: No such file or directory"
    assert lines[1].startswith(f"{bad}: document 1: YAML syntax error")
    assert len(lines) == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of mode")
def test_unreadable_file(tmp_path):
    f = tmp_path / "secret.yaml"
    f.write_text("kind: A\n")
    f.chmod(0)
    with pytest.raises(ConfigError) as e:
        load_documents([str(f)])
    assert e.value.message == f"{f}: cannot read: Permission denied"


def test_special_file_is_refused():
    with pytest.raises(ConfigError) as e:
        load_documents(["/dev/null"])
    assert e.value.message == "/dev/null: not a regular file or directory"


def test_json_file(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"workloads": [], "services": []}')
    assert load_documents([str(f)])[0][1] == {"workloads": [], "services": []}
    f.write_text('{"workloads": [,]}')
    with pytest.raises(ConfigError) as e:
        load_documents([str(f)])
    assert e.value.message.startswith(f"{f}: document 1: invalid JSON at line 1, column 16: Expecting value")


def test_json_nesting_is_bounded(tmp_path):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100 + "]" * 100)
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_documents([str(f)])


def test_file_size_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 1000)
    f = tmp_path / "big.yaml"
    f.write_text("a: " + "x" * 2000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_documents([str(f)])
    assert e.value.message == f"{f}: file is larger than 1000 bytes"


def test_document_count_is_bounded(monkeypatch):
    monkeypatch.setattr(documents, "MAX_DOCUMENTS_PER_FILE", 10)
    with pytest.raises(ConfigError, match="more than 10 documents in one file"):
        load_text("kind: A\n---\n" * 20)


def test_nesting_depth_is_bounded():
    with pytest.raises(ConfigError) as e:
        load_text("a: " + "[" * 80 + "]" * 80 + "\n", "deep.yaml")
    assert e.value.message == "deep.yaml: document 1: nested deeper than 64 levels"
    # 60 levels is fine
    assert load_text("a: " + "[" * 60 + "]" * 60 + "\n")


def test_alias_bomb_is_refused_before_it_is_built():
    # "billion laughs": 9 levels of 10 aliases each = 10^9 nodes from a few hundred bytes
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    with pytest.raises(ConfigError) as e:
        load_text("\n".join(lines) + "\n", "bomb.yaml")
    assert e.value.message == (
        "bomb.yaml: document 1: document expands to more than 1000000 nodes (YAML alias bomb?)")


def test_modest_aliases_are_fine():
    docs = load_text("base: &b {app: reviews}\nothers: [*b, *b]\n")
    assert docs[0][1]["others"] == [{"app": "reviews"}, {"app": "reviews"}]


def test_recursive_alias_is_refused():
    with pytest.raises(ConfigError) as e:
        load_text("a: &a [1, *a]\n", "r.yaml")
    assert e.value.message == "r.yaml: document 1: recursive YAML alias (a node that contains itself)"


def test_bad_scalar_value_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        load_text("created: 2024-02-30\n", "d.yaml")
    assert e.value.message == "d.yaml: document 1: invalid value: day is out of range for month"


def test_parsing_a_real_file_byte_by_byte_prefixes_never_escapes_config_error():
    # YAML is not incremental, but every truncation of a real file must either load or be a ConfigError.
    with open(os.path.join(FIXTURES, "bookinfo", "reviews-routing.yaml"), "rb") as f:
        data = f.read()
    loaded = 0
    for n in range(0, len(data), 7):
        try:
            load_text(data[:n])
            loaded += 1
        except ConfigError:
            pass
    assert loaded > 0


YAMLISH = st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#,?%@` \n\t.01\x00\xff")), max_size=120)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_random_yaml_text_only_raises_config_error(text):
    try:
        docs = load_text(text)
    except ConfigError as e:
        assert e.message  # a message, never empty
        return
    assert all(isinstance(d, dict) for _, d in docs)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_config_error(data):
    try:
        load_text(data)
    except ConfigError:
        pass
