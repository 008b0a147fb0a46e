"""Frozen dataclasses made and remade at the cost of plain ones, for the records of the data path.

A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__`` (its own
``__setattr__`` refuses): three to four times the cost of a plain one. The server's main process
makes frozen records for every push (an ``ImageRef`` per image, the batch's ``FileRef`` and
``WorkItem``) and remakes every ``ImageOutcome`` a worker sends back, so both
ways are generated here once per class, as ``dataclasses`` generates ``__init__``: the values go
straight into the new instance's ``__dict__``. The instances are the same dataclass instances as
before, frozen as before (docs/performance.md has the measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


def fast_init(cls: type[_T]) -> type[_T]:
    """Give the frozen dataclass ``cls`` an ``__init__`` that stores its fields in the instance's
    ``__dict__``: the same parameters, defaults and errors (a missing or unknown argument is a
    ``TypeError``). Only for fields with plain defaults and no ``__post_init__``: anything else
    is refused when the class is made."""
    if not is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} is not a frozen dataclass")
    if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
        raise TypeError(f"{cls.__name__}: __post_init__ and __slots__ need the dataclass's own __init__")
    namespace: dict[str, Any] = {}
    params, body = [], []
    for f in fields(cls):
        if not f.init or f.kw_only or f.default_factory is not MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: only init fields with plain defaults")
        if f.default is MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"    __record[{f.name!r}] = {f.name}")
    code = "\n".join([f"def __init__(__record_self, {', '.join(params)}):",
                      "    __record = __record_self.__dict__", *body])  # fmt: skip
    exec(code, namespace)  # the code is made here from the dataclass's own field names
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


def rebuilder(cls: type[_T], names: tuple[str, ...], tag: tuple[str, dict[Any, Any]] | None = None
              ) -> Callable[[Iterable[Any]], list[_T]]:  # fmt: skip
    """A function making instances of the frozen dataclass ``cls`` from rows of the fields
    ``names`` (every field: a record of a pipe message, ``messages``), without ``__init__``: each
    row is unpacked straight into the new instance's ``__dict__``, a third of the cost of
    ``__dict__.update(zip(names, row))``; a row of the wrong length raises ``ValueError``.
    ``tag``: rows come as ``(key, row)`` and field ``tag[0]`` is ``tag[1][key]``."""
    targets = ", ".join(f"d[{name!r}]" for name in names)
    code = "\n".join([
        "def rebuild(rows):",
        "    built = []",
        "    for key, row in rows:" if tag else "    for row in rows:",
        "        obj = new(cls)",
        "        d = obj.__dict__",
        f"        {targets}, = row",
        f"        d[{tag[0]!r}] = lookup[key]" if tag else "",
        "        built.append(obj)",
        "    return built",
    ])  # fmt: skip
    namespace: dict[str, Any] = {"new": object.__new__, "cls": cls, "lookup": tag[1] if tag else None}
    exec(code, namespace)  # the code is made here from the dataclass's own field names
    return namespace["rebuild"]  # type: ignore[no-any-return]
