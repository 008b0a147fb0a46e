"""Frozen dataclasses made and remade at the cost of plain ones, for the records of the data path.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (its own
``__setattr__`` refuses): three to four times the cost of a plain one. The server's main process
makes frozen records for every push (an ``ImageRef`` per image, the batch's ``FileRef`` and
``WorkItem``) and remakes every ``ImageOutcome`` a worker sends back, so both ways are generated
here once per class, as ``dataclasses`` generates ``__init__``: the values are set by one C call
(``infer_server._records``) that does what ``object.__setattr__`` does for each field, without
its call per field. Set that way the fields live in the values array CPython lays out with the
instance, never in a ``__dict__`` (none is made until something asks for one): a record is one
object, not an object and a dict, and every read of a field costs about half of a read from a
dict. ``replaced`` copies a record with some fields changed the same way. The instances are the
same dataclass instances as before, frozen as before (docs/performance.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields, is_dataclass
from functools import partial
from operator import attrgetter
from typing import Any, TypeVar

from infer_server._records import build, fill

__all__ = ["fast_init", "fill", "rebuilder", "replaced"]

_T = TypeVar("_T")


def fast_init(cls: type[_T]) -> type[_T]:
    """Give the frozen dataclass ``cls`` an ``__init__`` that sets its fields in one C call: the
    same parameters, defaults and errors (a missing or unknown argument is a ``TypeError``); and,
    unless it has its own, a ``__reduce__`` that pickles its fields as a tuple, remade through that
    ``__init__`` (a dataclass pickles its ``__dict__``, and is remade through it). Only for fields
    with plain defaults and no ``__post_init__``: anything else is refused when the class is made."""
    if not is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: __post_init__ and __slots__ need the dataclass's own __init__")
    namespace: dict[str, Any] = {"_fill": fill, "_NAMES": _shape(cls)[0]}
    params = []
    for f in fields(cls):
        if not f.init or f.kw_only or f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: only init fields with plain defaults")
        if f.default is MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
    values = "".join(f"__record_self.{name}, " for name in namespace["_NAMES"])
    code = "\n".join([f"def __init__(__record_self, {', '.join(params)}):",
                      f"    _fill(__record_self, _NAMES, ({', '.join(namespace['_NAMES'])},))",
                      "def __reduce__(__record_self):",
                      f"    return _cls, ({values})"])  # fmt: skip
    namespace["_cls"] = cls
    exec(code, namespace)  # the code is made here from the dataclass's own field names
    for name in ("__init__", "__reduce__"):
        if name == "__init__" or name not in vars(cls):  # a __reduce__ of its own stays
            namespace[name].__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, namespace[name])
    return cls


def rebuilder(cls: type[_T], convert: tuple[str, dict[Any, Any]] | None = None) -> Callable[[Iterable[Any]], list[_T]]:
    """A function making instances of the frozen dataclass ``cls`` from rows of all its fields in
    their order (a record of a pipe message, ``messages``), without ``__init__``, in one C call per
    message; a row of the wrong length raises ``ValueError``. ``convert``: rows come as ``(key,
    row)``, ``row`` every other field, and field ``convert[0]`` is ``convert[1][key]`` (an enum
    member sent as its int; an unknown key raises ``KeyError``)."""
    names = _shape(cls)[0]
    if convert is None:
        return partial(build, cls, names)
    return partial(build, cls, names, names.index(convert[0]), convert[1])


def replaced(record: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for the frozen records here, without ``__init__``: a copy of
    ``record``'s fields with ``changes`` over them (none of the records has a ``__post_init__``),
    set as ``fast_init`` sets them. A fifth of the cost; a worker makes one per image when the
    front caches results."""
    names, row, position = _shape(type(record))
    values = list(row(record)) if len(names) > 1 else [row(record)]
    for name, value in changes.items():
        if name not in position:
            raise TypeError(f"{type(record).__name__} has no field {name!r}")
        values[position[name]] = value
    new = object.__new__(type(record))
    fill(new, names, tuple(values))
    return new


_Shape = tuple[tuple[str, ...], Callable[[Any], Any], dict[str, int]]
_SHAPES: dict[type, _Shape] = {}


def _shape(cls: type) -> _Shape:
    """A dataclass's field names in order, a getter of all of them, each name's position (made
    once per class)."""
    shape = _SHAPES.get(cls)
    if shape is None:
        names = tuple(f.name for f in fields(cls))
        shape = _SHAPES[cls] = (names, attrgetter(*names), {name: k for k, name in enumerate(names)})
    return shape
