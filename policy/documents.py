"""Reading configuration files into documents: ``load_documents(paths) -> [(Where, dict)]``.

Each path is a YAML file (``---``-separated documents), a JSON file, or a directory of such files.
Nothing here knows what a document means; ``policy.loader`` does. What this layer guarantees:

- every document handed on is a mapping, tagged with a ``Where`` (file, 1-based document number,
  and for ``kind: List`` items the item number) so every later error can point at it;
- syntax errors name the file, the document and the line/column;
- a huge or hostile file cannot exhaust memory or recursion: file size, file count, documents per
  file, nesting depth and alias expansion ("billion laughs") are all bounded by the constants below;
- YAML is read with the *safe* loader only (plain data: no Python objects, no arbitrary tags).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from policy.errors import ConfigError, ConfigErrors, Where

MiB = 1024 * 1024

# A mesh inventory for a few thousand workloads plus its policies is a few MiB of YAML; 64 MiB is
# an order of magnitude above anything real and still small enough to read whole.
MAX_FILE_BYTES = 64 * MiB
# Every file in a --config directory is read; a directory with more than this is almost surely the
# wrong directory (e.g. a repository root), and we say so rather than reading it all.
MAX_FILES_PER_DIRECTORY = 10_000
# Documents in one file (and items in one `kind: List`): bounds the work a file of `---\n` repeated
# can cause. 100 000 resources is far beyond a real mesh's configuration.
MAX_DOCUMENTS_PER_FILE = 100_000
# Kubernetes objects nest about 10 deep (AuthorizationPolicy spec.rules[].from[].source.x[]);
# ztunnel policies about 8. 64 leaves room and keeps every later recursive walk far from Python's
# recursion limit. (libyaml itself stops at 1000.)
MAX_NESTING_DEPTH = 64
# YAML aliases let a 1 KiB file describe 2^60 nodes ("billion laughs"). We count nodes as if every
# alias were expanded, per document, and refuse beyond this. 1 000 000 nodes ≈ tens of MiB of dicts.
MAX_EXPANDED_NODES_PER_DOCUMENT = 1_000_000

YAML_SUFFIXES = (".yaml", ".yml")
JSON_SUFFIXES = (".json",)
CONFIG_SUFFIXES = YAML_SUFFIXES + JSON_SUFFIXES

# libyaml is ~20x faster than the pure-Python scanner; both are the *safe* loader (plain data only).
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class FileWhere(Where):
    """A problem with a whole file or directory (unreadable, too big): ``FILE: problem``."""

    def describe(self) -> str:
        return self.file


@dataclass(frozen=True)
class ListItemWhere(Where):
    """Where an item of a ``kind: List`` document came from: ``document 2 (List item 3: Kind ns/name)``."""

    item: int = 0  # 0-based, as the `items[3]` a user would index it by

    def describe(self) -> str:
        what = " ".join(p for p in (self.kind, self.name) if p)
        inner = f"List item {self.item}" + (f": {what}" if what else "")
        return f"{self.file}: document {self.document} ({inner})"

    def with_resource(self, kind: str, name: str) -> "ListItemWhere":
        return ListItemWhere(self.file, self.document, kind, name, self.item)


def load_documents(paths: Sequence[str]) -> list[tuple[Where, dict]]:
    """Read every path (file or directory) into ``(where, mapping)`` pairs, in order.

    Raises ``ConfigErrors`` listing every file/document problem found (all files are read, so one
    run shows all syntax errors).
    """
    out: list[tuple[Where, dict]] = []
    errors: list[ConfigError] = []
    for path in paths:
        try:
            files = _expand(path)
        except ConfigError as err:
            errors.append(err)
            continue
        for file in files:
            try:
                out.extend(_load_file(file))
            except ConfigErrors as errs:
                errors.extend(errs.errors)
            except ConfigError as err:
                errors.append(err)
    if errors:
        raise ConfigErrors(errors)
    return out


def source_files(paths: Sequence[str]) -> list[str]:
    """The files ``load_documents`` would read for these paths (unreadable paths skipped)."""
    files: list[str] = []
    for path in paths:
        try:
            files.extend(_expand(path))
        except ConfigError:
            pass
    return files


def _expand(path: str) -> list[str]:
    """A file stays itself; a directory becomes its config files, sorted, not recursive.

    Not recursive, like ``kubectl apply -f DIR`` without ``-R``: a subdirectory is often something
    else (a kustomize base, backups) and reading it silently would surprise.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        raise ConfigError(FileWhere(path, 0), "", f"cannot read: {err.strerror or err}") from None
    except ValueError as err:  # e.g. "embedded null byte"
        raise ConfigError(FileWhere(repr(path), 0), "", f"not a usable path: {err}") from None
    if stat.S_ISDIR(st.st_mode):
        try:
            names = sorted(os.listdir(path))
        except OSError as err:
            raise ConfigError(FileWhere(path, 0), "", f"cannot list directory: {err.strerror or err}") from None
        files = [os.path.join(path, n) for n in names if n.lower().endswith(CONFIG_SUFFIXES) and not n.startswith(".")]
        files = [f for f in files if os.path.isfile(f)]
        if len(files) > MAX_FILES_PER_DIRECTORY:
            raise ConfigError(
                FileWhere(path, 0), "", f"directory holds {len(files)} config files, more than {MAX_FILES_PER_DIRECTORY}"
            )
        return files
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(FileWhere(path, 0), "", "not a regular file or directory")
    return [path]


def _read(file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(FileWhere(file, 0), "", f"cannot read: {err.strerror or err}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(FileWhere(file, 0), "", f"file is larger than {_size(MAX_FILE_BYTES)}")
    return data


def _load_file(file: str) -> list[tuple[Where, dict]]:
    data = _read(file)
    if file.lower().endswith(JSON_SUFFIXES):
        docs = [(1, _parse_json(file, data))]
    else:
        docs = parse_yaml_stream(file, data)
    return _expand_documents(file, docs)


def load_text(text: str | bytes, file: str = "<memory>") -> list[tuple[Where, dict]]:
    """Parse YAML text as if it were a file (for tests and for inline configuration)."""
    data = text.encode() if isinstance(text, str) else text
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(FileWhere(file, 0), "", f"text is larger than {_size(MAX_FILE_BYTES)}")
    return _expand_documents(file, parse_yaml_stream(file, data))


def _parse_json(file: str, data: bytes) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(Where(file, 1), "", f"not UTF-8 text (byte {err.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_json_object)
    except _DuplicateKey as err:
        raise ConfigError(Where(file, 1), "", f"duplicate key {json.dumps(err.args[0][:80])} in a JSON object") from None
    except json.JSONDecodeError as err:
        raise ConfigError(Where(file, 1), "", f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except RecursionError:
        raise ConfigError(Where(file, 1), "", f"nested deeper than {MAX_NESTING_DEPTH} levels") from None
    _check_data_depth(value, Where(file, 1))
    return value


class _DuplicateKey(Exception):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object with a key twice is refused (Kubernetes' strict decoding: "duplicate field"), as in YAML."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


def parse_yaml_stream(file: str, data: bytes) -> list[tuple[int, Any]]:
    """``[(document number, value)]`` for every document in a YAML stream, empty ones included as None.

    Documents are numbered from 1 in stream order, counting empty ones, so "document 3" is the
    third ``---`` section a user sees.
    """
    docs: list[tuple[int, Any]] = []
    number = 0
    try:
        loader = _SafeLoader(data)
    except yaml.YAMLError as err:
        raise ConfigError(Where(file, 1), "", _yaml_problem(err)) from None
    try:
        while True:
            number += 1
            where = Where(file, number)
            try:
                if not loader.check_node():
                    break
                if number > MAX_DOCUMENTS_PER_FILE:
                    raise ConfigError(where, "", f"more than {MAX_DOCUMENTS_PER_FILE} documents in one file")
                node = loader.get_node()
                if node is None:
                    docs.append((number, None))
                    continue
                _check_node_graph(node, where)
                try:
                    value = loader.construct_document(node)
                except (AttributeError, KeyError, IndexError):
                    # PyYAML's safe constructors fail this way when an explicit tag does not fit its
                    # scalar: `!!timestamp x` (AttributeError), `!!bool x` (KeyError), `!!int ''`
                    # (IndexError); they escaped load_text (found by fuzzing).
                    raise ConfigError(where, "", "invalid value: a scalar does not fit its explicit tag "
                                                 "(!!timestamp, !!bool, !!int, !!float)") from None
                docs.append((number, value))
            except ConfigError:
                raise
            except yaml.YAMLError as err:
                raise ConfigError(where, "", _yaml_problem(err)) from None
            except RecursionError:
                raise ConfigError(where, "", f"nested deeper than {MAX_NESTING_DEPTH} levels") from None
            except (ValueError, OverflowError, TypeError) as err:
                # The safe constructor turns scalars into ints, floats, dates: a date like
                # 2024-02-30 or a huge timestamp fails with ValueError/OverflowError.
                raise ConfigError(where, "", f"invalid value: {err}") from None
    finally:
        dispose = getattr(loader, "dispose", None)
        if dispose is not None:
            dispose()
    return docs


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'YAML syntax error at line L, column C: problem', from PyYAML's marks (0-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None)
    if isinstance(err, yaml.reader.ReaderError):
        return f"not a text file: {err.reason} (character {err.position})"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    lines = str(err).splitlines()
    text = problem or (lines[0] if lines else "unknown error")
    context = getattr(err, "context", None)
    if context and problem and context != problem:
        text = f"{context}: {problem}"
    return f"YAML syntax error{where}: {text}"


def _check_node_graph(root: yaml.Node, where: Where) -> None:
    """Refuse recursive aliases, depth above MAX_NESTING_DEPTH, and alias bombs.

    Works on the composed node graph (before any Python object is built), iteratively, with each
    node's expanded size memoised so shared (aliased) subtrees are measured once.
    """
    size: dict[int, int] = {}
    depth_of: dict[int, int] = {}
    on_path: set[int] = set()
    # Explicit stack of (node, depth, children iterator-started flag).
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, expanded = stack.pop()
        key = id(node)
        if not expanded:
            if key in size:
                if depth + depth_of[key] - 1 > MAX_NESTING_DEPTH:
                    raise ConfigError(where, "", f"nested deeper than {MAX_NESTING_DEPTH} levels")
                continue
            if key in on_path:
                raise ConfigError(where, "", "recursive YAML alias (a node that contains itself)")
            if depth > MAX_NESTING_DEPTH:
                raise ConfigError(where, "", f"nested deeper than {MAX_NESTING_DEPTH} levels")
            if isinstance(node, yaml.MappingNode):
                _check_duplicate_keys(node, where)
            on_path.add(key)
            stack.append((node, depth, True))
            for child in _children(node):
                stack.append((child, depth + 1, False))
            continue
        on_path.discard(key)
        children = _children(node)
        total = 1 + sum(size[id(c)] for c in children)
        size[key] = total
        depth_of[key] = 1 + max((depth_of[id(c)] for c in children), default=0)
        if total > MAX_EXPANDED_NODES_PER_DOCUMENT:
            raise ConfigError(
                where, "", f"document expands to more than {MAX_EXPANDED_NODES_PER_DOCUMENT} nodes (YAML alias bomb?)"
            )


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicate_keys(node: yaml.MappingNode, where: Where) -> None:
    """A key twice in one mapping is refused, as kubectl and istioctl refuse it (go-yaml: "mapping key "action"
    already defined at line 4"; Kubernetes' strict field validation: duplicate field) — PyYAML keeps the last one
    silently, so ``action: DENY`` ... ``action: ALLOW`` would load as an ALLOW. Keys compare as YAML resolves
    them (``1`` and ``"1"`` differ); the keys a ``<<`` merge brings in may be overridden, as YAML says."""
    seen: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        k = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if k in seen:
            raise ConfigError(where, "", f"mapping key {json.dumps(key_node.value[:80])} already defined at line "
                                         f"{seen[k]} (again at line {line})")
        seen[k] = line


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_data_depth(value: Any, where: Where) -> None:
    """Depth bound for JSON documents (JSON has no aliases, so only depth matters)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > MAX_NESTING_DEPTH:
            raise ConfigError(where, "", f"nested deeper than {MAX_NESTING_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)


def _expand_documents(file: str, docs: list[tuple[int, Any]]) -> list[tuple[Where, dict]]:
    """Skip empty documents, expand ``kind: List``, and insist every document is a mapping."""
    out: list[tuple[Where, dict]] = []
    errors: list[ConfigError] = []
    for number, value in docs:
        where = Where(file, number)
        if value is None:
            continue  # an empty document (`---` with nothing, or only comments): nothing to load
        if not isinstance(value, dict):
            errors.append(ConfigError(where, "", f"expected a mapping (an inventory or a resource), got {_type_name(value)}"))
            continue
        if value.get("kind") == "List" and "workloads" not in value and "services" not in value:
            # Kubernetes' `kind: List` (apiVersion v1): `kubectl get -o yaml` output.
            items = value.get("items")
            if items is None:
                items = []
            if not isinstance(items, list):
                errors.append(ConfigError(where.with_resource("List", ""), "items", f"expected a list, got {_type_name(items)}"))
                continue
            if len(items) > MAX_DOCUMENTS_PER_FILE:
                errors.append(ConfigError(where.with_resource("List", ""), "items", f"more than {MAX_DOCUMENTS_PER_FILE} items"))
                continue
            for i, item in enumerate(items):
                iw = ListItemWhere(file, number, item=i)
                if item is None:
                    continue
                if not isinstance(item, dict):
                    errors.append(ConfigError(iw, "", f"expected a mapping (a resource), got {_type_name(item)}"))
                    continue
                out.append((iw, item))
            continue
        out.append((where, value))
    if errors:
        raise ConfigErrors(errors)
    return out


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n} bytes"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
