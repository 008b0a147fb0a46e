from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, overload

_T = TypeVar("_T")

def fill(obj: object, names: tuple[str, ...], values: tuple[Any, ...], /) -> None: ...
@overload
def build(cls: type[_T], names: tuple[str, ...], rows: Iterable[tuple[Any, ...]], /) -> list[_T]: ...
@overload
def build(
    cls: type[_T], names: tuple[str, ...], position: int, lookup: Mapping[Any, Any],
    rows: Iterable[tuple[Any, tuple[Any, ...]]], /
) -> list[_T]: ...
