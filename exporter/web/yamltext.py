"""YAML for the web config, read the way exporter-toolkit's Go YAML reads it into string fields.

Go's yaml takes a scalar written into a string field as its source text: `X-XSS-Protection: 1` is the
header value "1", `yes` is "yes". PyYAML resolves those to int and bool first, and str() of the result
is not always what was written (`0x10` -> 16, `yes` -> True). So every mapping loaded here remembers
each scalar value's source text, and `text()` gives it back.
"""
from __future__ import annotations

from typing import Any

import yaml


class SourceMapping(dict):
    """A YAML mapping that also keeps the source text of its scalar values."""

    source: dict[Any, str]


class _Loader(yaml.SafeLoader):
    pass


def _mapping(loader: _Loader, node: yaml.MappingNode) -> SourceMapping:
    result = SourceMapping(loader.construct_mapping(node, deep=True))  # also resolves `<<` merge keys
    result.source = {loader.construct_object(k, deep=True): v.value
                     for k, v in node.value if isinstance(v, yaml.ScalarNode)}
    return result


_Loader.add_constructor("tag:yaml.org,2002:map", _mapping)


def load(text: str) -> Any:
    """Like yaml.safe_load (raises yaml.YAMLError), with SourceMapping for mappings."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def text(mapping: dict, key: Any) -> str | None:
    """The value at key as written in the YAML when it is a scalar (None for null or a collection)."""
    value = mapping.get(key)
    if value is None or isinstance(value, (dict, list)):
        return None
    source = getattr(mapping, "source", {})
    return source.get(key, str(value))
