"""Python configs: nested attribute dicts, `get_config(arg)` loading and `--set key=value` overrides.

A config file is a Python module with `get_config(arg: str | None = None) -> Config`.  It is
named either by path (`configs/tiny.py`, optionally `configs/tiny.py:variant`) or by module name
(`tiny`, resolved inside the installed `sarformer_jax.configs`).
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib
import importlib.util
import os
import pathlib
from typing import Any, Iterable


class Config(dict):
    """A dict with attribute access; nested dicts become Configs.  Keys are fixed once built:
    overrides may only replace existing keys (see `apply_overrides`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, dict) and not isinstance(value, Config):
            value = Config(value)
        super().__setitem__(key, value)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"config has no key {key!r}; keys here: {sorted(self)}"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __deepcopy__(self, memo: dict) -> "Config":
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    def flat_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for k, v in self.items():
            name = f"{prefix}{k}"
            keys.append(name)
            if isinstance(v, Config):
                keys.extend(v.flat_keys(name + "."))
        return keys

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


class ConfigError(ValueError):
    pass


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as `data.root=/data/ade`


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Applies `a.b.c=value` strings (value is a Python literal or a bare string).

    An unknown key is an error that lists the valid keys nearby."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        key = key.strip()
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, Config) or part not in node:
                known = cfg.flat_keys()
                close = difflib.get_close_matches(key, known, n=6, cutoff=0.5)
                parent = ".".join(parts[:i])
                siblings = [k for k in known if k.rsplit(".", 1)[0] == parent and "." in k] if parent \
                    else sorted(cfg)
                hint = close or siblings[:12]
                raise ConfigError(f"unknown config key {key!r}; valid keys nearby: {hint}")
            if i < len(parts) - 1:
                node = node[part]
        old = node[parts[-1]]
        value = _parse_value(text.strip())
        if isinstance(old, Config):
            raise ConfigError(f"{key!r} is a group of keys, set one of {sorted(old)}")
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[parts[-1]] = value
    return cfg


def load_config(spec: str, overrides: Iterable[str] = ()) -> Config:
    """Loads `path.py[:arg]` or `name[:arg]` and applies overrides."""
    name, _, arg = spec.partition(":")
    path = pathlib.Path(name)
    if path.suffix == ".py" and path.exists():
        module_name = f"_sarformer_config_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        stem = path.stem if path.suffix == ".py" else name
        try:
            module = importlib.import_module(f"sarformer_jax.configs.{stem}")
        except ModuleNotFoundError:
            raise ConfigError(
                f"config {spec!r} is neither a file nor a module in sarformer_jax.configs"
            ) from None
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, Config):
        cfg = Config(cfg)
    return apply_overrides(cfg, overrides)


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment switch for A/B runs (`SARFORMER_OPT_ONE_PASS=0`, ...): "0" or "1",
    `default` when unset; anything else is a ValueError naming the variable."""
    text = os.environ.get(name, "1" if default else "0").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {text!r}")
    return text == "1"
