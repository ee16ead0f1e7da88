"""A snapshot of everything an adapter could leave behind on a model, to check ``detach()``.

:func:`snapshot` records, without copying any tensor:

* the module tree: every submodule by name, identity and class;
* each module's instance ``__dict__``: its keys, and each value by identity (the
  dicts of parameters, buffers, submodules and hooks entry by entry; tensors held as
  plain attributes, such as a cached ``rope_deltas``, by value);
* the class attributes of every class in the modules' MROs (a patched method);
* the globals of the modules defining those classes (a patched attention or mask function);
* torch's global module hooks.

:func:`differences` lists, in words, how two snapshots differ.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules import module as _torch_module

# torch's process-wide hook dicts (nn.modules.module.register_module_forward_hook & co.).
_GLOBAL_HOOKS = tuple(name for name in dir(_torch_module) if name.startswith("_global_") and name.endswith("hooks"))


@dataclass
class Snapshot:
    modules: dict[str, tuple[int, type]]
    instance: dict[str, dict[str, Any]]
    classes: dict[type, dict[str, Any]]
    globals_: dict[str, dict[str, Any]]
    hooks: dict[str, dict[Any, Any]]


def _shallow(value: Any) -> Any:
    """Dicts (parameters, buffers, submodules, hooks) entry by entry; anything else as is."""
    return dict(value) if isinstance(value, dict) else value


def snapshot(model: torch.nn.Module) -> Snapshot:
    """Record the state :func:`differences` compares (see the module docs)."""
    named = list(model.named_modules(remove_duplicate=False))
    classes: dict[type, dict[str, Any]] = {}
    for _, mod in named:
        for cls in type(mod).__mro__:
            if cls is not object and cls not in classes:
                classes[cls] = dict(vars(cls))
    sources = {cls.__module__ for cls in classes}
    return Snapshot(
        modules={name: (id(mod), type(mod)) for name, mod in named},
        instance={name: {k: _shallow(v) for k, v in vars(mod).items()} for name, mod in named},
        classes=classes,
        globals_={m: dict(vars(sys.modules[m])) for m in sorted(sources) if m in sys.modules},
        hooks={name: dict(getattr(_torch_module, name)) for name in _GLOBAL_HOOKS},
    )


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            type(a) is type(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] or _same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)):
        return type(a) is type(b) and a == b
    return False  # any other object must be the very same one


def _diff_dicts(where: str, before: dict[str, Any], after: dict[str, Any], out: list[str]) -> None:
    for key in sorted(after.keys() - before.keys(), key=str):
        out.append(f"{where}: {key!r} was added ({_name(after[key])})")
    for key in sorted(before.keys() - after.keys(), key=str):
        out.append(f"{where}: {key!r} was removed")
    for key in sorted(before.keys() & after.keys(), key=str):
        a, b = before[key], after[key]
        if _same(a, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):  # parameters, buffers, submodules, hooks
            parts = [
                f"{label} {', '.join(_name(d[k]) for k in keys)}"
                for label, d, keys in (
                    ("added", b, [k for k in b if k not in a]),
                    ("removed", a, [k for k in a if k not in b]),
                    ("changed", b, [k for k in a if k in b and not _same(a[k], b[k])]),
                )
                if keys
            ]
            out.append(f"{where}: {key!r} {'; '.join(parts)}")
        else:
            out.append(f"{where}: {key!r} changed from {_name(a)} to {_name(b)}")


def _name(value: Any) -> str:
    fn = getattr(value, "__func__", value)
    qual = getattr(fn, "__qualname__", None)
    if qual is not None:
        return f"{getattr(fn, '__module__', '?')}.{qual}"
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)[:80]


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """How ``after`` differs from ``before``, one line per difference (empty: the same)."""
    out: list[str] = []
    for name in sorted(after.modules.keys() - before.modules.keys()):
        out.append(f"submodule {name!r} ({after.modules[name][1].__name__}) was added")
    for name in sorted(before.modules.keys() - after.modules.keys()):
        out.append(f"submodule {name!r} was removed")
    for name in sorted(before.modules.keys() & after.modules.keys()):
        if before.modules[name] != after.modules[name]:
            out.append(f"submodule {name!r} was replaced by a {after.modules[name][1].__name__}")
        else:
            _diff_dicts(f"model{'.' + name if name else ''}.__dict__", before.instance[name], after.instance[name], out)
    for cls, attrs in before.classes.items():
        if cls in after.classes:
            _diff_dicts(f"class {cls.__module__}.{cls.__qualname__}", attrs, after.classes[cls], out)
    for mod, names in before.globals_.items():
        if mod in after.globals_:
            _diff_dicts(f"module {mod}", names, after.globals_[mod], out)
    _diff_dicts("torch.nn.modules.module", before.hooks, after.hooks, out)
    return out
