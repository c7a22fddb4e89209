"""Typed configs: dataclasses read from YAML, overridden by dotted keys, documented by their docstrings.

    cfg = load_typed(VQConfig, "configs/vq/vit-vqgan-small.yaml", ["train.steps=100"])
    save_config(cfg, "runs/x/config.yaml")        # the resolved config, written into every run
    print(describe(cfg))                          # every key with its value and meaning

A config is a dataclass whose fields are sections (dataclasses) or plain values (int, float, str,
bool). Unknown keys and values of the wrong type are refused with a ConfigError naming the key.
Each section's dataclass lives beside what it configures (ModelConfig beside the model); the
documentation of a key is the string literal written right below its field.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, get_type_hints

import yaml

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
"""The presets shipped with the project (configs/model, configs/train, configs/vq, configs/eval)."""


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field(s) and the rule."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def check_minima(section, prefix: str, rules) -> None:
    """ConfigError naming `prefix`.field for the first of `rules` ((field, least value, meaning), ...) that the
    section's value is below."""
    for name, low, meaning in rules:
        value = getattr(section, name)
        require(value >= low, f"{prefix}.{name}={value} must be >= {low} ({meaning})")


def _parse_value(text: str, dotted: str) -> Any:
    """A command-line value is read as YAML: 2 -> int, 1e-3 -> float, true -> bool, abc -> str. Refused where
    YAML 1.1 (PyYAML's) would read it otherwise than meant: 010 is octal 8, 1:30 is base 60 (90), and ` #`
    starts a comment."""
    number = re.fullmatch(r"[-+]?[0-9][0-9_:.]*", text) and not isinstance(yaml.safe_load(text), str)
    if number and re.fullmatch(r"[-+]?0[0-9_]+", text):
        raise ConfigError(f"override {dotted}={text}: YAML reads a number with a leading zero as octal; "
                          f"write it without the zero (or, for text, quote it past the shell: {dotted}=\"'{text}'\")")
    if number and re.fullmatch(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?", text):
        raise ConfigError(f"override {dotted}={text}: YAML 1.1 reads digits joined by ':' as a base-60 number "
                          f"({yaml.safe_load(text)}); write the number itself (or, for text, quote it past the shell: "
                          f"{dotted}=\"'{text}'\")")
    if text[:1] not in ("'", '"') and (text.startswith("#") or " #" in text or "\t#" in text):
        raise ConfigError(f"override {dotted}={text}: '#' after a space starts a YAML comment, which would cut "
                          f"the value; quote it: {dotted}=\"'{text}'\"")
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}={text}: not a YAML value ({' '.join(str(e).split())})") from None


def parse_overrides(overrides: list[str]) -> dict:
    """['a.b=1', 'a.c=x'] -> {'a': {'b': 1, 'c': 'x'}}."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, value = (s.strip() for s in item.split("=", 1))
        keys, node = dotted.split("."), tree
        if not all(keys):
            raise ConfigError(f"override {item!r}: an empty key in {dotted!r} (expected section.key=value)")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        value = _parse_value(value, dotted)  # (a section given whole, a.b={...}, merges with a.b.* given before)
        node[keys[-1]] = merge(node[keys[-1]], value) if isinstance(value, dict) and isinstance(
            node.get(keys[-1]), dict) else value
    return tree


def merge(base: dict, update: dict) -> dict:
    """`base` with `update` laid over it, section by section."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently, so an
    edited preset's second `lr:` would win unnoticed)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # (`<<: *anchor`: its keys are defaults the mapping's own may override)
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # (PyYAML's own construction refuses it)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one section (lines {seen[key] + 1} and "
                                  f"{key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:  # (an empty file, or comments only: all defaults; not `or {}`, which took [] or false as that)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def build(cls, values: dict, where: str = ""):
    """Dataclass `cls` from a dict, refusing unknown keys and values of the wrong type."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(values) - known))  # (str: YAML keys may be numbers or bools, `1:`, `yes:`)
    if unknown:
        close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        guesses = "; ".join(f"{where}{k}: did you mean {where}{m[0]}?" for k, m in close.items() if m)
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}"
                          + (f" ({guesses})" if guesses else "") + f"; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):  # (null too: an emptied section is not the defaults)
                raise ConfigError(f"{where}{name} must be a section (mapping), got {value!r}")
            kwargs[name] = build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    optional = [h for h in typing.get_args(hint) if h is not type(None)] if type(hint) is types.UnionType else []
    if len(optional) == 1:  # `float | None`: null, or a value of the type
        return None if value is None else _coerce(value, optional[0], name)
    if typing.get_origin(hint) is list:  # `list[int]`: a list, each item of the type (a lone 5 was a TypeError later)
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} must be a list, e.g. {name}=\"[1, 2]\" on a command line")
        item = (typing.get_args(hint) or (Any,))[0]
        return value if item is Any else [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-4 (no dot) as a string.
            value = float(value)
        except ValueError:
            pass
    if hint is str and (isinstance(value, (int, float, bool)) or type(value).__module__ == "datetime"):
        raise ConfigError(f"{name}={value!r} must be of type str (YAML read the text as a "
                          f"{type(value).__name__}: quote it, e.g. {name}=\"'text'\" on a command line)")
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{name}={value!r} must be of type {hint.__name__}")
    if hint is float and not math.isfinite(value):  # (inf passed checks such as lr > 0)
        raise ConfigError(f"{name}={value!r} must be a finite number")
    return value


def load_raw(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The YAML file's sections (none without a file) with the dotted overrides laid over them."""
    return merge(read_yaml(path) if path else {}, parse_overrides(overrides or []))


def load_typed(cls, path: str | Path | None, overrides: list[str] | None = None):
    """Config dataclass `cls` from a YAML file plus dotted overrides."""
    return build(cls, load_raw(path, overrides))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path, header: str = "") -> None:
    """Write the resolved config as YAML (`header`: comment lines put above it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        if header:
            f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def flat_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 1e-3, ...} from nested sections."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_docs(cls) -> dict[str, str]:
    """Map field name -> the string literal written right below it in the class body (a subclass's
    own over its bases')."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = nxt.value.value
    return docs


def describe(cfg, indent: str = "") -> str:
    """Every key of a config with its value and documentation, sections nested."""
    lines, docs = [], field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:  # {inspect.getdoc(type(value))}")
            lines.append(describe(value, indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {value!r}  # {' '.join(docs.get(f.name, '').split())}")
    return "\n".join(lines)


def add_config_args(parser: argparse.ArgumentParser, where: str = "configs/", example: str = "train.steps=20") -> None:
    parser.add_argument("--config", help=f"YAML config file (see {where})")
    # (extend: every --set group counts, the later value of a key wins; sbatch scripts put their own first)
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"dotted overrides, e.g. {example} (repeatable; the last value wins)")
