"""YAML with line numbers: every key and list item of a recipe file keeps the line it came from, so that errors
can point at it (``recipe.yaml:12: stages[1].sparsity: ...``)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from ...core.errors import ConfigError

Loc = tuple  # a location in the recipe: ("stages", 1, "sparsity")

# A recipe is a few dozen values a few levels deep; these bounds stop hostile or broken files (aliases of
# aliases that expand exponentially, thousands of nested brackets) before anything walks them.
MAX_DEPTH = 32
MAX_VALUES = 100_000
_OPEN = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
         yaml.FlowSequenceStartToken)
_CLOSE = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


class RecipeError(ConfigError):
    """A recipe is malformed; ``problems`` holds ``(line, path, message)`` for every error found."""

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = []
        for line, path, message in self.problems:
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        super().__init__("\n".join(lines))


class _Loader(yaml.SafeLoader):
    """SafeLoader reading ``1e-3`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


class Problems:
    """Collects ``(line, path, message)`` for every problem found, so that one error reports them all."""

    def __init__(self, source: str, lines: Mapping[Loc, int]):
        self.source = source
        self.lines = lines
        self.problems: list[tuple[int | None, str, str]] = []

    def add(self, path: Loc, message: str) -> None:
        self.problems.append((line(self.lines, path), fmt_path(path), message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise RecipeError(self.source, sorted(self.problems, key=lambda p: (p[0] or 0)))


def load_yaml(text: str, source: str) -> tuple[Any, dict[Loc, int]]:
    """``(data, lines)`` of YAML ``text``: ``lines`` maps each key's and item's location to its line. Invalid
    YAML and duplicate keys raise :class:`RecipeError` with their lines."""
    try:
        _check_depth(text, source)
        node = yaml.compose(text, Loader=_Loader)
        if node is not None:
            _check_expansion(node, source)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:
            msg += f" ({context}" + (f" that starts at line {cmark.line + 1})" if cmark is not None else ")")
        raise RecipeError(source, [(line, "", msg)]) from None
    lines: dict[Loc, int] = {}
    problems: list = []
    if node is not None:
        _walk_nodes(node, (), lines, problems)
    if problems:
        raise RecipeError(source, problems)
    return data, lines


def decode(raw: bytes, source: str) -> str:
    """The text of a recipe file, which must be UTF-8; RecipeError naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[:exc.start].count(b"\n") + 1
        raise RecipeError(source, [(line_no, "", f"byte 0x{raw[exc.start]:02x} is not UTF-8; a recipe file must be "
                                                 "UTF-8: re-save it with that encoding")]) from None


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH, from the token stream (the parser itself would recurse)."""
    depth = 0
    for token in yaml.scan(text, Loader=_Loader):
        if isinstance(token, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise RecipeError(source, [(token.start_mark.line + 1, "",
                                            f"nesting deeper than {MAX_DEPTH} levels; a recipe needs a few: "
                                            "flatten the structure")])
        elif isinstance(token, _CLOSE):
            depth -= 1


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse aliases that expand to more than MAX_VALUES values (an "alias bomb") or nest deeper than
    MAX_DEPTH once expanded; each node is counted once, so this is linear in the file."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # children before parents, without recursion
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = 0
        order.append(node)
        stack.extend(_children(node))
    for node in reversed(order):  # the first node over a bound is the smallest: its line is the one to fix
        children = _children(node)
        sizes[id(node)] = min(MAX_VALUES + 1, 1 + sum(sizes[id(c)] for c in children))
        depths[id(node)] = 1 + max((depths.get(id(c), 0) for c in children), default=0)
        where = node.start_mark.line + 1
        if depths[id(node)] > MAX_DEPTH + 1:
            raise RecipeError(source, [(where, "", f"aliases (*name) nest deeper than {MAX_DEPTH} levels here; "
                                                   "write the repeated parts out")])
        if sizes[id(node)] > MAX_VALUES:
            raise RecipeError(source, [(where, "", f"aliases (*name) here expand to more than {MAX_VALUES} values; "
                                                   "write the repeated parts out or use fewer nested aliases")])


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _walk_nodes(node: yaml.Node, path: Loc, lines: dict, problems: list) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key == "<<":  # merge keys: the merged entries keep their anchor's lines
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append((line, fmt_path(path + (key,)), f"duplicate key {key!r} (first at line {seen[key]})"))
            seen[key] = line
            lines[path + (key,)] = line
            _walk_nodes(value_node, path + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_nodes(item, path + (i,), lines, problems)


def line(lines: Mapping[Loc, int], path: Loc) -> int | None:
    """Line of ``path`` (or of its nearest enclosing key) in ``lines``, if known."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


class Key(str):
    """A mapping key that names a layer: shown as ``['layers.0']`` rather than as a field."""


def fmt_path(path: Loc) -> str:
    """``("stages", 0, "sparsity", Key("fc1"))`` -> ``stages[0].sparsity['fc1']``."""
    out = ""
    for p in path:
        if isinstance(p, Key):
            out += f"[{str(p)!r}]"
        elif isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]"
    return out
