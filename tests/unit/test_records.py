"""Frozen records made without the dataclass's ``__init__`` (``infer_server.records``): the same
instances, the same errors."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from infer_server._records import build, fill
from infer_server.messages import Box, Code, DetectionRecord, FileRef, ImageOutcome, ImageRef, ItemDone, WorkItem
from infer_server.records import fast_init, rebuilder


@dataclass(frozen=True)
class Plain:
    a: int
    b: str = "x"
    c: tuple[int, ...] = ()


@fast_init
@dataclass(frozen=True)
class Fast:
    a: int
    b: str = "x"
    c: tuple[int, ...] = ()


def test_fast_init_takes_the_same_arguments_and_makes_the_same_frozen_record() -> None:
    for args, kwargs in (((1,), {}), ((1, "y"), {}), ((), {"a": 1, "c": (2,)}), ((1,), {"b": "z", "c": (3, 4)})):
        fast, plain = Fast(*args, **kwargs), Plain(*args, **kwargs)
        assert dataclasses.asdict(fast) == dataclasses.asdict(plain)
        assert fast == Fast(*args, **kwargs) and hash(fast) == hash(Fast(*args, **kwargs))
    with pytest.raises(dataclasses.FrozenInstanceError):
        Fast(1).a = 2  # type: ignore[misc]
    for args, kwargs in (((), {}), ((1, "y", (), 4), {}), ((1,), {"d": 1}), ((1,), {"a": 2})):
        with pytest.raises(TypeError):
            Plain(*args, **kwargs)
        with pytest.raises(TypeError):
            Fast(*args, **kwargs)


def test_the_pipe_records_are_made_as_their_dataclasses_make_them() -> None:
    ref = ImageRef(2, 10, 5, "a.jpg")
    assert vars(ref) == {"index": 2, "offset": 10, "size": 5, "name": "a.jpg"}
    assert ImageRef(index=0, offset=0, size=1) == ImageRef(0, 0, 1, "")
    outcome = ImageOutcome("b", 1, "n", width=3)
    assert outcome.code is Code.OK and outcome.timings_ms == () and outcome.width == 3
    assert list(vars(outcome)) == [f.name for f in dataclasses.fields(ImageOutcome)]
    assert ItemDone(1, 2).outcomes == ()
    item = WorkItem(1, "b", FileRef("/p", 1, 2, 3, -1), (ref,), 9.0)
    assert (item.attempt, item.submitted, item.route) == (1, 0.0, 0)


def test_fast_init_refuses_what_it_cannot_make() -> None:
    @dataclass
    class Open:
        a: int

    @dataclass(frozen=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True)
    class Post:
        a: int

        def __post_init__(self) -> None: ...

    for cls, why in ((Open, "frozen"), (Factory, "plain defaults"), (Post, "__post_init__")):
        with pytest.raises(TypeError, match=why):
            fast_init(cls)


def test_a_rebuilt_record_equals_the_one_made_by_init_and_a_short_row_is_refused() -> None:
    rebuild = rebuilder(Plain)
    assert rebuild([(1, "y", (2,)), (3, "x", ())]) == [Plain(1, "y", (2,)), Plain(3)]
    with pytest.raises(ValueError):
        rebuild([(1, "y")])
    with pytest.raises(ValueError):
        rebuild([(1, "y", (), 4)])
    with pytest.raises(ValueError):
        rebuild([[1, "y", ()]])  # a row is a tuple, as marshal and pickle give it back
    tagged = rebuilder(Plain, ("b", {0: "zero", 1: "one"}))
    assert tagged([(1, (5, (7,)))]) == [Plain(5, "one", (7,))]
    with pytest.raises(KeyError):
        tagged([(2, (5, ()))])
    with pytest.raises(ValueError):
        tagged([(1, (5, (7,), 8))])
    with pytest.raises(ValueError):
        tagged([(5, (7,))])  # not a (key, row) pair


def test_fill_sets_fields_past_a_frozen_setattr_and_build_refuses_what_it_cannot_make() -> None:
    record = object.__new__(Plain)
    fill(record, ("a", "b", "c"), (1, "y", ()))
    assert record == Plain(1, "y") and vars(record) == {"a": 1, "b": "y", "c": ()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.a = 2  # type: ignore[misc]
    with pytest.raises(ValueError):
        fill(record, ("a", "b"), (1,))
    with pytest.raises(TypeError):
        fill(record, ["a"], (1,))  # type: ignore[arg-type]

    class Own:
        def __new__(cls) -> Own:
            return super().__new__(cls)

    with pytest.raises(TypeError, match="__new__"):
        build(Own, ("a",), [(1,)])
    with pytest.raises(TypeError):
        build(len, ("a",), [(1,)])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build(Plain, ("a", "b", "c"), 3, {}, [(1, ("y", ()))])


def test_a_fast_record_pickles_as_its_fields_unless_it_has_a_reduce_of_its_own() -> None:
    assert Fast(1, "y").__reduce__() == (Fast, (1, "y", ()))
    for record in (Fast(1, "y", (2,)), DetectionRecord(1, "car", 0.5, Box(0.0, 1.0, 2.0, 3.0))):
        assert pickle.loads(pickle.dumps(record, pickle.HIGHEST_PROTOCOL)) == record
    item = WorkItem(1, "b", FileRef("/p", 1, 2, 3, -1), (ImageRef(0, 0, 3),), 9.0)
    assert item.__reduce__()[0].__name__ == "_work_item"  # its rows, not its fields
