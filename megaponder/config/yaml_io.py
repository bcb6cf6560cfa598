"""Reading config YAML strictly: syntax errors as ``file:line:col: message`` and duplicated keys
refused.

PyYAML's ``safe_load`` keeps the *last* of two equal keys, so a second ``train:`` section
silently replaces the first one; here that is a :class:`ConfigError` naming the key and both
lines. Its syntax errors carry a 55-line traceback; here they become one line pointing at the
place (1-based line and column, as editors count).

Anchors and aliases (``&a`` / ``*a``, ``<<: *a``) are allowed, but the document is measured
before any Python value is built: a tree that expands to more than :data:`MAX_EXPANDED_NODES`
nodes (the "billion laughs" alias bomb: 1 KB of nested aliases that expand to 9^9 list items)
or that refers to itself is refused in one line, in milliseconds and without memory growth. A
real megaponder config has a few hundred nodes. Errors quote at most a short prefix of a value
(:func:`short`), never a whole value.
"""
from __future__ import annotations

from typing import Any

import yaml

from .base import ConfigError, short

#: nodes (scalars, lists, mappings, aliases counted as what they expand to) a config document
#: may expand to; a resolved megaponder config has a few hundred
MAX_EXPANDED_NODES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicated mapping keys at any depth."""

    source = "<config>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with `<<: *anchor` may be overridden: YAML allows it
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: SafeLoader raises its own error below
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise ConfigError(f"{self.source}:{line}:{key_node.start_mark.column + 1}: "
                                      f"duplicated key {short(key)} (first at line {first}, again at "
                                      f"line {line}); keep one and merge their contents.")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node, source: str, budget: int = MAX_EXPANDED_NODES) -> None:
    """Refuse a node graph that expands (aliases followed) to more than ``budget`` nodes or
    contains itself. Linear in the number of *distinct* nodes: each one's expanded size is
    computed once, so 1 KB of nested aliases costs microseconds, not 9^9 steps."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def too_big(node, size):
        mark = node.start_mark
        raise ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: the YAML expands to more than "
                          f"{budget} values through anchors and aliases (&name / *name; "
                          f"{'at least ' if size > budget else ''}{size} here); a config is a few "
                          f"hundred. Write the values out or use fewer nested aliases.")

    def walk(node) -> int:  # iterative: a deeply nested document must not hit the recursion limit
        stack = [(node, False)]
        while stack:
            current, children_done = stack.pop()
            key = id(current)
            if key in sizes:
                continue
            children = (current.value if isinstance(current, yaml.SequenceNode) else
                        [n for pair in current.value for n in pair] if isinstance(current, yaml.MappingNode)
                        else [])
            if children_done:
                on_path.discard(key)
                size = 1 + sum(sizes[id(c)] for c in children)
                if size > budget:
                    too_big(current, size)
                sizes[key] = size
                continue
            if key in on_path:
                continue
            on_path.add(key)
            stack.append((current, True))
            for child in children:
                if id(child) in on_path:
                    mark = child.start_mark
                    raise ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: a YAML alias refers "
                                      f"to a value that contains it (a recursive anchor); a config "
                                      f"cannot hold one. Remove the alias.")
                if id(child) not in sizes:
                    stack.append((child, False))
        return sizes[id(node)]

    walk(root)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text``; ``source`` names it in errors (a file path or ``--set key``)."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader already rejects control characters
        loader.source = source
        node = loader.get_single_node()  # the node graph: aliases are shared, not yet copied
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = str(e.problem or "invalid YAML") + (f" ({e.context})" if e.context else "")
        raise ConfigError(f"{where}: YAML syntax error: {what}.") from None
    except yaml.reader.ReaderError as e:  # a control character: it has a position, no mark
        before = text[:e.position]
        line, col = before.count("\n") + 1, e.position - (before.rfind("\n") + 1) + 1
        raise ConfigError(f"{source}:{line}:{col}: YAML syntax error: character #x{e.character:04x} "
                          f"is not allowed in YAML; remove it.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: YAML error: {' '.join(str(e).split())[:300]}") from None
    except ConfigError:
        raise
    except (ValueError, OverflowError, TypeError, AttributeError, KeyError, IndexError) as e:
        # PyYAML's constructors fail like this on odd values (a 5000-digit int, `!!timestamp 1`)
        raise ConfigError(f"{source}: YAML value error: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}; check the tagged or unusual values.") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read; a config has a few "
                          f"levels of sections.") from None
    finally:
        if loader is not None:
            loader.dispose()


#: bytes of a config file read at most (a config is a few KB; a huge file is a mistake)
MAX_FILE_BYTES = 16 << 20


def load_yaml_file(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES >> 20} MB; a config YAML is a "
                              f"few KB. Pass the right file.")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; --config needs a YAML file.") from None
    return parse_yaml(text, path)
