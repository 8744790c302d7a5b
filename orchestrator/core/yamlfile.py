"""YAML that people write (the image map, the forge config, repositories' jobs files),
parsed once, at bounded cost, with line numbers for every key.

The text is size-capped before parsing, composed once into a node graph (libyaml's C
parser where installed), checked, and only then turned into Python objects:

- duplicate keys are refused (YAML says they are an error; PyYAML silently keeps the last);
- aliases are expanded only within a node budget, so a "billion laughs" document is a
  clear error instead of gigabytes of memory, and an anchor that contains itself is
  refused instead of recursing without end;
- nesting is bounded by libyaml itself (about 1000 levels) or, without it, by Python's
  recursion limit; either way it is an error with a line, never a traceback;
- an integer of more than `MAX_INT_DIGITS` digits is refused with its line;
- an unquoted mapping key is never a boolean: YAML 1.1 reads `on:`, `yes:`, `off:` as
  true/false, which would turn the jobs file's `on:` filter into a `True` key.

Every error is `YamlError` with the file and line: `map.yaml:7: duplicate key 'images'`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DEFAULT_MAX_NODES = 100_000
MERGE_KEY = "<<"
INT_TAG = "tag:yaml.org,2002:int"
BOOL_TAG = "tag:yaml.org,2002:bool"
STR_TAG = "tag:yaml.org,2002:str"
MAX_INT_DIGITS = 1000  # Python refuses to convert more than 4300 digits, with a traceback
KeyPath = tuple[Any, ...]


class YamlError(Exception):
    """The file is not usable YAML; the message starts with `file:line:`."""


@dataclass(frozen=True)
class YamlDocument:
    data: Any
    lines: dict[KeyPath, int]  # key path -> line of that key (1-based)
    filename: str

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest ancestor that has one."""
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return 1

    def where(self, path: KeyPath) -> str:
        return f"{self.filename}:{self.line_of(path)}"


def parse_yaml(text: str | bytes, *, filename: str, max_bytes: int, max_nodes: int = DEFAULT_MAX_NODES) -> YamlDocument:
    """Parse one YAML document; `YamlError` for anything unusable. `text` longer than
    `max_bytes` (UTF-8) is refused before the parser sees it."""
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise YamlError(f"{filename}:1: the file is {size} bytes, above the limit of {max_bytes}")
    try:
        node = yaml.compose(text, Loader=Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlError(f"{filename}:{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YamlError(f"{filename}:1: not valid YAML: {exc}") from None
    except RecursionError:
        raise YamlError(f"{filename}:1: nested too deeply") from None
    if node is None:
        return YamlDocument(None, {}, filename)
    _check_graph(node, filename=filename, max_nodes=max_nodes)
    _plain_keys_as_strings(node)
    lines: dict[KeyPath, int] = {}
    _index_lines(node, (), lines)
    try:
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(f"{filename}:{mark.line + 1 if mark else 1}: {exc.problem or exc.context}") from None
    except RecursionError:
        raise YamlError(f"{filename}:1: nested too deeply") from None
    return YamlDocument(data, lines, filename)


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value


def _check_graph(root: yaml.Node, *, filename: str, max_nodes: int) -> None:
    """Refuse duplicate keys, an anchor inside itself, and alias expansion beyond
    `max_nodes` (counted as if every alias were written out). Iterative: a deep
    document cannot exhaust the stack here."""
    expanded: dict[int, int] = {}  # node id -> nodes in its subtree, aliases expanded
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size = 1 + sum(expanded[id(child)] for child in _children(node))
            if size > max_nodes:
                raise YamlError(
                    f"{filename}:{node.start_mark.line + 1}: aliases expand to more than {max_nodes} nodes; "
                    "write the values out or use fewer nested aliases"
                )
            expanded[key] = size
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise YamlError(f"{filename}:{node.start_mark.line + 1}: an anchor contains an alias to itself")
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node, filename)
        elif isinstance(node, yaml.ScalarNode) and node.tag == INT_TAG and len(node.value) > MAX_INT_DIGITS:
            raise YamlError(
                f"{filename}:{node.start_mark.line + 1}: number too long ({len(node.value)} digits); quote it if it is text"
            )
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YamlError(f"{filename}:{child.start_mark.line + 1}: an anchor contains an alias to itself")
            if id(child) not in expanded:
                stack.append((child, False))


def _plain_keys_as_strings(root: yaml.Node) -> None:
    """Retag every unquoted key that YAML 1.1 resolved as a boolean (`on`, `off`, `yes`,
    `no`, `true`, ...) as the string it was written as. Every file parsed here is keyed by
    names, never by booleans, and `on:` is the jobs file's filter key: without this the
    README's own example would be refused as an unknown key `True`. Values are left
    alone (`enabled: yes` is still true). Runs after `_check_graph`, so the graph is
    acyclic and bounded; the visited set keeps shared (aliased) nodes to one visit."""
    visited: set[int] = set()
    stack: list[yaml.Node] = [root]
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                # A plain scalar has no style (None from the Python loader, '' from libyaml's).
                if isinstance(key, yaml.ScalarNode) and not key.style and key.tag == BOOL_TAG:
                    key.tag = STR_TAG
        stack.extend(_children(node))


def _refuse_duplicate_keys(node: yaml.MappingNode, filename: str) -> None:
    seen: dict[str, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value == MERGE_KEY:
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in seen:
            raise YamlError(
                f"{filename}:{line}: duplicate key {key_node.value!r} (first on line {seen[key_node.value]}); "
                "YAML keeps only one of them: remove or rename the other"
            )
        seen[key_node.value] = line


def _index_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    """Line of each key path. Aliases are not followed (their lines are the anchor's)."""
    lines.setdefault(path, node.start_mark.line + 1)
    stack: list[tuple[yaml.Node, KeyPath]] = [(node, path)]
    seen: set[tuple[int, KeyPath]] = set()
    while stack:
        current, where = stack.pop()
        if (id(current), where) in seen or len(lines) > DEFAULT_MAX_NODES:
            continue
        seen.add((id(current), where))
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode):
                    child = where + (key_node.value,)
                    lines[child] = key_node.start_mark.line + 1
                    stack.append((value_node, child))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                child = where + (index,)
                lines.setdefault(child, item.start_mark.line + 1)
                stack.append((item, child))
