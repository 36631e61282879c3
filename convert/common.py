"""Checkpoint reading and the table-driven conversion engine shared by every converter.

Checkpoints are untrusted input.  Plain state dicts are read with
`torch.load(weights_only=True)`; mmengine checkpoints (which pickle `HistoryBuffer` objects and
other classes that `weights_only` refuses) are read through `RestrictedUnpickler`, which builds
tensors and containers and turns every other class into an inert `Opaque` placeholder, so no
code named by the file ever runs.  Only the state dict is used.

A converter is a table of `Rule(pattern, target, transform)`: every source key must match
exactly one rule (or a `drop` rule), every target parameter must be produced once, with the
expected shape.  All problems are collected and raised together in one `CheckpointError` that
names the file.
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message lists every problem found."""


# ----------------------------------------------------------------------------------------------
# Reading .pth files


class Opaque:
    """Inert stand-in for any class a restricted unpickle does not allow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "Opaque":
        return Opaque()

    def __setitem__(self, key: Any, value: Any) -> None:  # for SETITEMS on unknown dict types
        pass

    def append(self, value: Any) -> None:  # for APPENDS on unknown list types
        pass

    def extend(self, values: Any) -> None:
        pass


def _opaque_class(module: str, name: str) -> type:
    return type(f"Opaque[{module}.{name}]", (Opaque,), {})


_ALLOWED = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Allows tensor reconstruction, torch dtypes/storages and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name.endswith("Storage"):
            return super().find_class(module, name)
        return _opaque_class(module, name)


class _RestrictedPickleModule:
    """A `pickle_module` for `torch.load` whose Unpickler is `RestrictedUnpickler`."""

    Unpickler = RestrictedUnpickler
    load = pickle.load
    __name__ = "sarformer_restricted_pickle"


def read_torch_checkpoint(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a .pth file as a dict without executing code from it.

    Tries `torch.load(weights_only=True)` first; if the file holds objects that mode refuses
    (mmengine checkpoints), reads it again through the restricted unpickler."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install 'sarformer-jax[convert]'"
        ) from e
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            obj = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule
            )
        except Exception as e:
            raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(obj: Mapping[str, Any], path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Unwraps `state_dict` / `model` / `module` containers and a `module.` prefix; returns
    numpy float32/int arrays keyed by the original names."""
    import torch

    for wrapper in ("state_dict", "model", "module"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    out: dict[str, np.ndarray] = {}
    bad = []
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            bad.append(f"{key} ({type(value).__name__})")
            continue
        if key.startswith("module."):
            key = key[len("module.") :]
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        out[key] = t.numpy()
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    return out


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """`read_torch_checkpoint` + `extract_state_dict`."""
    return extract_state_dict(read_torch_checkpoint(path), path)


# ----------------------------------------------------------------------------------------------
# Transforms (torch layout -> flax layout)


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (O, I, kh, kw) -> flax Conv kernel (kh, kw, I, O); depthwise
    (C, 1, kh, kw) -> (kh, kw, 1, C)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv_transpose_kernel(w: np.ndarray) -> np.ndarray:
    """torch ConvTranspose2d weight (I, O, kh, kw) -> flax ConvTranspose kernel (kh, kw, I, O)
    for `transpose_kernel=False`: the spatial flip makes the two conventions agree."""
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1)[::-1, ::-1])


# ----------------------------------------------------------------------------------------------
# The rule engine


@dataclasses.dataclass(frozen=True)
class Rule:
    """Source keys matching `pattern` (a full-match regex) go to `target` (a `re.sub`
    template, dotted path in the flax state) through `transform`.  `target=None` drops the key
    deliberately (the reason goes in `note`)."""

    pattern: str
    target: str | None
    transform: Callable[[np.ndarray], np.ndarray] = identity
    note: str = ""

    def match(self, key: str) -> re.Match | None:
        return re.fullmatch(self.pattern, key)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Dotted-path -> shape of an nnx State / nested dict of arrays (or ShapeDtypeStructs)."""
    from flax import nnx

    out = {}
    if isinstance(tree, nnx.State):
        for path, var in nnx.to_flat_state(tree):
            value = var.get_value() if hasattr(var, "get_value") else var
            out[".".join(str(p) for p in path)] = tuple(value.shape)
        return out

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = tuple(node.shape)

    walk(tree, "")
    return out


def convert_with_rules(
    source: Mapping[str, np.ndarray],
    rules: Iterable[Rule],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source_name: str,
    allow_missing: Iterable[str] = (),
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Applies `rules` to every key of `source`.

    Returns (converted arrays by target path, target paths left at their initial value because
    they match `allow_missing` regexes).  Raises `CheckpointError` listing, all at once: source
    keys no rule matches, keys matched by several rules, target paths produced twice, targets
    missing from the checkpoint, unexpected targets and shape mismatches (expected vs found)."""
    rules = list(rules)
    out: dict[str, np.ndarray] = {}
    unexpected, ambiguous, duplicate, misshaped = [], [], [], []
    for key in sorted(source):
        hits = [(r, m) for r in rules if (m := r.match(key))]
        if not hits:
            unexpected.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(f"{key} (rules {[r.pattern for r, _ in hits]})")
            continue
        rule, m = hits[0]
        if rule.target is None:
            continue
        target = m.expand(rule.target)
        value = np.asarray(rule.transform(np.asarray(source[key])))
        if target in out:
            duplicate.append(f"{target} (from {key})")
            continue
        if target not in expected:
            unexpected.append(f"{key} -> {target} (no such parameter in the model)")
            continue
        if tuple(value.shape) != tuple(expected[target]):
            misshaped.append(
                f"{key}: expected {tuple(expected[target])} for {target}, found {tuple(value.shape)}"
                f" (source shape {tuple(np.shape(source[key]))})"
            )
            continue
        out[target] = value
    allow = [re.compile(p) for p in allow_missing]
    missing, initialised = [], []
    for target in sorted(expected):
        if target in out:
            continue
        if any(p.fullmatch(target) for p in allow):
            initialised.append(target)
        else:
            missing.append(target)
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", misshaped),
        ("keys matched by several rules", ambiguous),
        ("targets written twice", duplicate),
    ):
        if items:
            shown = "; ".join(items[:30]) + (f"; ... ({len(items) - 30} more)" if len(items) > 30 else "")
            problems.append(f"{len(items)} {title}: {shown}")
    if problems:
        raise CheckpointError(f"{source_name}: " + " | ".join(problems))
    return out, initialised


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """Dotted paths -> nested dict (integer-looking parts stay strings)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return root


def _listed(title: str, items: list[str], limit: int = 20) -> str:
    more = f"; ... ({len(items) - limit} more)" if len(items) > limit else ""
    shown = "; ".join(items[:limit]) + more
    return f"{len(items)} {title}: {shown}"


def update_module(module: Any, flat: Mapping[str, np.ndarray], *, source: str = "checkpoint",
                  partial: bool = False) -> None:
    """Writes converted arrays into an nnx module in place (paths as produced by `flat_shapes`).

    `flat` must hold exactly the module's variables (every one but its PRNG state) with their
    shapes: otherwise raises `CheckpointError` naming `source` and listing, all at once, the
    missing, unexpected and mis-shaped entries, before anything is written.  `partial=True`
    allows missing entries (those variables keep their values).  The module may be abstract
    (`nnx.eval_shape`) when `flat` is complete: every variable then gets a concrete value, so
    loading a checkpoint needs no random initialisation first."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(module, nnx.Not(nnx.RngState))
    flat_state = nnx.to_flat_state(state)
    by_path = {".".join(str(p) for p in path): var for path, var in flat_state}
    missing = [] if partial else sorted(set(by_path) - set(flat))
    extra = sorted(set(flat) - set(by_path))
    misshaped = []
    for k in sorted(set(flat) & set(by_path)):
        want, found = tuple(by_path[k].get_value().shape), tuple(np.shape(flat[k]))
        if want != found:
            misshaped.append(f"{k}: expected {want}, found {found}")
    problems = [_listed(title, items) for title, items in
                (("missing", missing), ("not in the model", extra), ("mis-shaped", misshaped))
                if items]
    if problems:
        raise CheckpointError(f"{source}: does not fit {type(module).__name__}: "
                              + " | ".join(problems))
    for name, value in flat.items():
        var = by_path[name]
        var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
    nnx.update(module, nnx.from_flat_state(flat_state))


def save_params(path: str | pathlib.Path, flat: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Writes converted params as a single .npz (dotted keys) plus a `__meta__` JSON entry."""
    import json

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(dict(meta)).encode(), np.uint8), **flat)
    tmp.replace(path)


def load_params(path: str | pathlib.Path, *, meta_only: bool = False
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Reads what `save_params` wrote (`meta_only`: only the metadata, the arrays dict left
    empty).  A missing file, a file that is not an .npz of arrays (no pickled objects are ever
    loaded) or an unreadable entry raises `CheckpointError` naming the file."""
    import json
    import zipfile

    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    what = "written by `sarformer convert`"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy takes bytes that are neither a zip nor an .npy for a pickle (never loaded here)
        why = "neither a zip of arrays nor an array" if "pickle" in str(e) else str(e)
        raise CheckpointError(f"{path}: not an .npz of arrays {what} ({why})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds one array, not an .npz of named arrays {what}")
    with loaded as z:
        name = None
        try:
            flat = {}
            for name in z.files:
                if name != "__meta__" and not meta_only:
                    flat[name] = z[name]
            name = "__meta__"
            meta = json.loads(bytes(z["__meta__"]).decode()) if "__meta__" in z.files else {}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: entry {name!r} cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: entry '__meta__' is not a JSON object")
    return flat, meta
