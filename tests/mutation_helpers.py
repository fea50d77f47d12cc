"""Junk for the parsers' "only our own error type escapes" tests: the paths of a parsed YAML document's
leaves, setting one, a hypothesis-drawn mutation of a valid document (a few leaves replaced by drawn
values), shared by the routing, Gateway API route, ServiceEntry and AuthorizationPolicy parser tests; and the
JSON-like values the Gateway API route tests draw."""

from __future__ import annotations

from hypothesis import strategies as st


def leaves(node, path=()):
    """Every path (a tuple of keys and indexes) below ``node``, parents before their children; never ``()``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield path + (i,)
            yield from leaves(v, path + (i,))


def set_at(node, path, value) -> None:
    """``node[path[0]]...[path[-1]] = value``, in place."""
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def mutate(doc, data: st.DataObject, values: st.SearchStrategy, *, min_times: int = 1, max_times: int = 3):
    """Replace ``min_times``..``max_times`` (drawn) leaves of ``doc``, in place, each by a value drawn from
    ``values``; the paths are ``doc``'s before the first change. Returns ``doc``."""
    paths = list(leaves(doc))
    for _ in range(data.draw(st.integers(min_times, max_times))):
        path = data.draw(st.sampled_from(paths))
        try:
            set_at(doc, path, data.draw(values))
        except (KeyError, IndexError, TypeError):
            continue   # an earlier mutation removed this path
    return doc


def junk_json(words: list[str], keys: list[str]) -> st.SearchStrategy:
    """JSON-like values: null, booleans, integers -5..70000, text of up to 6 characters or one of ``words``;
    lists of up to 4 and mappings of up to 5 (keys from ``keys`` or text of up to 4); at most 25 leaves."""
    return st.recursive(
        st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=6) | st.sampled_from(words),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(
            st.sampled_from(keys) | st.text(max_size=4), children, max_size=5),
        max_leaves=25,
    )
