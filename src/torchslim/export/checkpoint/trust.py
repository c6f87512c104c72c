"""Which callables a checkpoint may make ``load`` call.

A manifest names its model factory as ``"pkg.module:callable"`` and ``load`` calls it with keyword arguments
from the file, so a file could name ``os:system``. ``load`` therefore only imports and calls what is trusted:

- ``nn.Module`` classes defined in torchslim or ``torch.nn`` (their constructors only build layers), and any
  callable of ``torchslim.models``;
- the classes of registered module codecs (:func:`~torchslim.export.checkpoint.register_module`);
- factories registered with :func:`register_factory`;
- what the caller passes as ``trusted``: ``"pkg.module"`` (every callable in that module and its submodules)
  or ``"pkg.module:callable"`` (that one).

The module of an untrusted name is never imported, since importing runs its code.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Callable, Iterable

from torch import nn

from ...core.errors import CheckpointError, TorchslimError
from .codecs import MODULES

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_BUILTIN_CLASSES = ("torchslim", "torch.nn")  # nn.Module subclasses defined under these are trusted
_BUILTIN_FACTORIES = ("torchslim.models",)  # every callable defined under these is trusted
_REGISTERED: set[str] = set()

Trusted = Iterable["str | Callable[..., Any]"]


def qualified_name(obj: Any) -> str:
    """``"module:QualName"`` of an importable class or function."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qual or "<locals>" in qual or "<lambda>" in qual:
        raise TorchslimError(f"{obj!r} is not importable by name (defined inside a function or a lambda), so a "
                             "checkpoint could not rebuild it; define it at module level or pass "
                             "factory='pkg.module:callable'")
    return f"{module}:{qual}"


def register_factory(factory: str | Callable[..., Any]) -> str:
    """Trust ``factory`` ("pkg.module:callable" or the callable itself) in every later ``load`` of this
    process, and return its name."""
    name = factory if isinstance(factory, str) else qualified_name(factory)
    _split(name, TorchslimError, "register_factory")
    _REGISTERED.add(name)
    return name


def normalise(trusted: Trusted | str | None) -> tuple[str, ...]:
    """``trusted`` as a tuple of names (one string, callables and modules are accepted)."""
    if trusted is None:
        return ()
    items = [trusted] if isinstance(trusted, str) or callable(trusted) or _is_module(trusted) else list(trusted)
    out = []
    for item in items:
        if isinstance(item, str):
            name = item
        elif _is_module(item):
            name = item.__name__
        else:
            name = qualified_name(item)
        if not isinstance(name, str) or not _DOTTED.match(name.partition(":")[0]):
            raise TorchslimError(f"trusted entries are 'pkg.module' or 'pkg.module:callable' strings (or the "
                                 f"callables themselves), got {item!r}")
        out.append(name)
    return tuple(out)


def _is_module(obj: Any) -> bool:
    return isinstance(obj, types.ModuleType)


def _split(name: str, error: type[TorchslimError], where: str) -> tuple[str, str]:
    module, sep, qual = name.partition(":") if isinstance(name, str) else ("", "", "")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(qual):
        raise error(f"{where}: the model factory {name!r} is not of the form 'pkg.module:callable'")
    return module, qual


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _import(module: str, qual: str) -> Any:
    obj: Any = importlib.import_module(module)
    for attr in qual.split("."):
        obj = getattr(obj, attr)
        # "pkg.models:os.system" reaches another module's callable through an import in a trusted one.
        if _is_module(obj):
            raise AttributeError(f"{attr!r} is a module, not a class or function defined in {module}")
    return obj


def resolve_factory(name: str, trusted: tuple[str, ...], where: str,
                    error: type[TorchslimError] = CheckpointError) -> Callable[..., nn.Module]:
    """The callable ``name`` names, if it is trusted (see the module docstring); otherwise ``error``."""
    module, qual = _split(name, error, where)
    for codec in MODULES.values():
        if f"{codec.cls.__module__}:{codec.cls.__qualname__}" == name:
            return codec.cls
    chosen = name in _REGISTERED or name in trusted or _under(module, [t for t in trusted if ":" not in t])
    # Importing a __main__ module runs a program (python -m torchslim.cli would parse sys.argv and run).
    if not chosen and (not _under(module, _BUILTIN_CLASSES) or "__main__" in module.split(".")):
        raise error(
            f"{where}: refusing to call {name!r}: a checkpoint may only rebuild torchslim's and torch.nn's modules, "
            f"registered module codecs and factories you trust. If you trust whoever wrote this file, pass "
            f"load(path, trusted=[{module!r}]) (or [{name!r}]), or call "
            f"torchslim.export.checkpoint.register_factory({name!r}) first")
    try:
        obj = _import(module, qual)
    except Exception as exc:
        raise error(f"{where}: the model factory {name!r} cannot be imported ({type(exc).__name__}: {exc}); install "
                    "or put on sys.path the package that defines it (the same code that saved the checkpoint)"
                    ) from None
    defined_in = getattr(obj, "__module__", None) or ""
    if name not in trusted and name not in _REGISTERED and not _under(defined_in, [module]):
        raise error(f"{where}: refusing to call {name!r}: it is defined in {defined_in or 'another module'}, not in "
                    f"{module}; pass load(path, trusted=[{name!r}]) if you mean it")
    builtin_class = isinstance(obj, type) and issubclass(obj, nn.Module)
    if not chosen and not builtin_class and not _under(module, _BUILTIN_FACTORIES):
        raise error(f"{where}: refusing to call {name!r}: under {module.split('.')[0]} only nn.Module classes are "
                    f"trusted; pass load(path, trusted=[{name!r}]) if you mean it")
    if not callable(obj):
        raise error(f"{where}: the model factory {name!r} is not callable")
    return obj
