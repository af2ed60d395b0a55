"""`load_config`: a YAML file plus dotted command-line overrides, each value parsed with YAML and
checked against its field's type; a misspelt section or field names the closest known one.

`load_config("configs/local/diffmoe-tiny.yaml", ["model.depth=6", "optim.lr=3e-4"])` returns a
`Config`; `Config.validate()` then checks the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from diffmoe_dist.config.options import ConfigError, fail
from diffmoe_dist.config.schema import Config

# Fields that no longer exist: a YAML or an override naming one is an error; a checkpoint's stored
# config (written before the removal) may still hold one, and loads without it.
REMOVED_FIELDS = {
    "data.dataset": "it was never read: data.path names the data",
    "data.shuffle_buffer": "it was never read: both loaders draw one seeded global permutation",
}
_CHECKPOINT = "checkpoint"


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    listed = f"known are {', '.join(known)}"
    return f"did you mean {prefix}{close[0]}? ({listed})" if close else listed


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(
                    f"{self._origin}: {key!r} appears twice at line {key_node.start_mark.line + 1} "
                    "(the second would silently replace the first): keep one"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_load(text_or_file, origin: str) -> Any:
    """yaml.safe_load with its errors as one line: a syntax error's position, a refused tag, a
    duplicate key."""
    loader = _UniqueKeyLoader(text_or_file)
    loader._origin = origin
    try:
        return loader.get_single_data()
    except yaml.constructor.ConstructorError as exc:
        tag = next(iter(str(exc.problem).split("'")[1:2]), exc.problem)
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(
            f"{origin}: the YAML tag {tag!r}{where} is refused (configs are plain YAML: numbers, strings, lists, maps)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{origin} is not valid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _coerce(name: str, text: str, current: Any, annotation: Any) -> Any:
    """Parses an override string with YAML and checks it against the field's type."""
    value = _yaml_load(text, name)
    kinds = str(annotation)
    if isinstance(current, bool) or kinds == "bool":
        if not isinstance(value, bool):
            fail(name, text, "use true or false")
        return value
    if "int" in kinds and "float" not in kinds:
        if value is None and "None" in kinds:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            fail(name, text, "use an integer")
        return value
    if "float" in kinds:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; Python's float() does not
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(name, text, "use a number")
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a str field given a number in YAML (logging.mfu_peak: 989)
    if isinstance(value, (list, dict)):  # a list would become a directory named "- runs/a\n- ..."
        fail(name, value, f"use one string, not a {'list' if isinstance(value, list) else 'mapping'}")
    return text if value is None or not isinstance(value, str) else value


def _apply(section_obj: Any, section: str, values: dict[str, Any], origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, raw in values.items():
        name = f"{section}.{key}"
        if name in REMOVED_FIELDS and origin == _CHECKPOINT:
            continue  # a checkpoint written before the field was removed: its value was never read
        if name in REMOVED_FIELDS:
            raise ConfigError(f"{name} (from {origin}) is no longer a config field ({REMOVED_FIELDS[name]}): delete it")
        if key not in fields:
            hint = _did_you_mean(key, fields, section + ".")
            raise ConfigError(f"{name} (from {origin}) is not a config field: {hint}")
        current = getattr(section_obj, key)
        text = raw if isinstance(raw, str) else "" if raw is None else yaml.safe_dump(raw)
        value = _coerce(name, text, current, fields[key].type)
        setattr(section_obj, key, value)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"--config {str(path)!r} does not exist: pass a YAML file such as configs/local/diffmoe-tiny.yaml"
            )
        with open(path) as f:
            data = _yaml_load(f, f"--config {str(path)!r}")
        if data is None:
            raise ConfigError(f"--config {str(path)!r} is empty: write the sections to change (model:, moe:, ...)")
        if not isinstance(data, dict):
            raise ConfigError(f"--config {str(path)!r} is not a YAML mapping of sections (model:, moe:, optim:, ...)")
        for section, values in data.items():
            if section not in sections:
                raise ConfigError(
                    f"{section} (in {path}) is not a config section: {_did_you_mean(str(section), sorted(sections))}"
                )
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{section} (in {path}) must map field names to values")
            _apply(getattr(cfg, section), section, values or {}, str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is malformed: write section.field=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        section, fname = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"override {item!r} names no config section: {_did_you_mean(section, sorted(sections))}")
        _apply(getattr(cfg, section), section, {fname: text}, "command line")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config from `Config.to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        _apply(getattr(cfg, section), section, values, _CHECKPOINT)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
