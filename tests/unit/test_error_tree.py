"""The exception tree drawn in ``selfie_lora.errors``' docstring, the one place a reader sees
every error and its HTTP answer: a class added without its line there (DatabaseRefusedError,
found in review; ClockSkewError, NoModelError and WeightsDamagedError before it) went unseen."""

from __future__ import annotations

from collections.abc import Iterator

from selfie_lora import errors


def _subclasses(cls: type[BaseException]) -> Iterator[type[BaseException]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_of_the_module_has_its_line_in_the_tree() -> None:
    assert errors.__doc__ is not None
    lines = errors.__doc__.splitlines()
    missing = [cls.__name__ for cls in _subclasses(errors.SelfieLoraError)
               if cls.__module__ == errors.__name__
               and not any(f"── {cls.__name__} " in line or line.endswith(f"── {cls.__name__}")
                           for line in lines)]
    assert missing == []


def test_each_error_has_one_line_in_the_tree() -> None:
    # Review: a merge left DatabaseRefusedError twice, the second copy saying its old answer
    # (HTTP 500) where the first said DatabaseBusyError's 503.
    assert errors.__doc__ is not None
    names = [line[line.index("── ") + 3:].split()[0]
             for line in errors.__doc__.splitlines() if "── " in line]
    assert sorted({name for name in names if names.count(name) > 1}) == []


def test_each_line_of_the_tree_is_under_its_parent() -> None:
    # A line's depth is where its "──" stands; the nearest line above, one level less deep, is
    # its parent: the class must derive from it.
    assert errors.__doc__ is not None
    stack: list[tuple[int, type[BaseException]]] = []
    for line in errors.__doc__.splitlines():
        if "── " not in line and line.strip() != "SelfieLoraError":
            continue
        if line.strip() == "SelfieLoraError":
            stack = [(-1, errors.SelfieLoraError)]
            continue
        depth = line.index("── ")
        name = line[depth + 3:].split()[0]
        cls = getattr(errors, name)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        assert cls.__bases__[0] is stack[-1][1], name
        stack.append((depth, cls))


def test_an_unreachable_database_s_error_takes_the_base_s_details_and_code() -> None:
    """Found in review: ``unanswered`` came with an ``__init__`` of its own that took neither
    ``details=`` nor ``code=`` (a TypeError where every other error takes them)."""
    raised = errors.DatabaseUnreachableError("database error: x", unanswered=True,
                                             details=[{"host": "db"}],
                                             code=errors.ErrorCode.ERROR)
    assert (raised.message, raised.details, raised.unanswered) == (
        "database error: x", [{"host": "db"}], True)
    assert raised.code is errors.ErrorCode.ERROR
