"""A bounded YAML loader for config files: safe types only, a size cap, aliases expanded only
up to a small budget, and no key given twice.

``yaml.safe_load`` accepts an alias bomb (a few hundred bytes whose anchors expand to billions
of nodes: measured, 444 bytes cost 49 s and 1.3 GB once dermray walked the result) and keeps the
last of two equal keys silently. Here the document's node graph is composed first (aliases are
shared references, so composing costs what the text costs), its size with every alias expanded
is counted without expanding anything, and only a document within the budget is constructed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dermray.errors import ConfigError

MAX_BYTES = 1 << 20  # a config file is a few kB
MAX_NODES = 10_000  # nodes with every alias expanded: a config has a few hundred

MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (merge keys excepted: ``<<``
    copies keys that a mapping may override, as YAML defines)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise ConfigError(
                        f"{key_node.start_mark.name}, line {line}: the key {key!r} is given "
                        f"twice (first on line {first}); YAML would keep the last one "
                        "silently. Remove one of them.")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node, budget: int = MAX_NODES) -> int:
    """How many nodes the document has with every alias expanded, counted once per shared node
    (never expanded); ConfigError when over ``budget``, or when an alias refers to a node
    that contains it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:
        current, children_done = stack.pop()
        key = id(current)
        children = _children(current)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > budget:
                raise ConfigError(_too_big(current, budget))
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"{current.start_mark.name}, line {current.start_mark.line + 1}: "
                              "an alias refers to a node that contains it (a recursive "
                              "structure); a config cannot hold one.")
        open_nodes.add(key)
        stack.append((current, True))
        for child in children:
            if id(child) in open_nodes:
                raise ConfigError(f"{child.start_mark.name}, line {child.start_mark.line + 1}: "
                                  "an alias refers to a node that contains it (a recursive "
                                  "structure); a config cannot hold one.")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(node)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _too_big(node: yaml.Node, budget: int) -> str:
    return (f"{node.start_mark.name}, line {node.start_mark.line + 1}: this part of the file "
            f"expands (through its aliases, *name) to more than {budget} values; a config holds "
            "a few hundred. Write the values out, or use fewer nested aliases.")


def load(path: str | Path) -> Any:
    """The YAML document in ``path``, within the bounds above; ConfigError naming the file and
    line otherwise. Syntax errors are yaml.YAMLError (with their own line), as before."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"Config file {path} is {size} bytes; a config file is at most "
                          f"{MAX_BYTES} bytes.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file {path} is not UTF-8 text (byte {exc.start}).") from None
    loader = _Loader(text)
    loader.name = str(path)  # the marks (and so every message) name the file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
