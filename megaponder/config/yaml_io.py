"""Reading config YAML strictly: syntax errors as ``file:line:col: message`` and duplicated keys
refused.

PyYAML's ``safe_load`` keeps the *last* of two equal keys, so a second ``train:`` section
silently replaces the first one; here that is a :class:`ConfigError` naming the key and both
lines. Its syntax errors carry a 55-line traceback; here they become one line pointing at the
place (1-based line and column, as editors count).
"""
from __future__ import annotations

from typing import Any

import yaml

from .base import ConfigError


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
                                      f"duplicated key '{key}' (first at line {first}, again at "
                                      f"line {line}); keep one and merge their contents.")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text``; ``source`` names it in errors (a file path or ``--set key``)."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader already rejects control characters
        loader.source = source
        return loader.get_single_data()
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
        raise ConfigError(f"{source}: YAML error: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8.") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; --config needs a YAML file.") from None
    return parse_yaml(text, path)
