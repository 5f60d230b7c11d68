"""The one cattrs converter that turns wire JSON into our records, configured once.

Production decoding ignores unknown keys, so fields the service adds tomorrow do not
break anyone. Tests build a strict twin with ``make_converter(forbid_extra_keys=True)``
and run it over recorded samples, so API drift shows up as a failing test.

Strict where a value matters, lenient where it is bookkeeping. Ids, ``success``, image
URLs and error codes go through strict hooks: a number where a string belongs is a
decode error naming the field's path, never a silently stringified value. Fields the
client does not act on (timestamps, ``elapsed``, trace ids, ``type``, ``request``, an
error's message, a malformed image entry beside good ones) are read leniently: a value of an
unexpected type becomes None (or is skipped), so it can never keep a finished task's
images from the user.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import datetime
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, override

from ._models import ErrorDetail, ImageResult, Submission, Task, TaskBatch, TaskResponse

__all__ = ["DecodeFailure", "converter", "make_converter", "structure"]

T = TypeVar("T")


class DecodeFailure(Exception):
    """A wire value did not fit its record; ``paths`` says where, as ``$.a.b`` lines."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        super().__init__("; ".join(paths))


def _type_error(expected: str, value: Any) -> TypeError:
    return TypeError(f"expected {expected}, got {type(value).__name__}")


# Strict primitive hooks, each in one call: these run for every field of every record.
# JSON has one number type, so a float field takes ints too, but never bools.


def _structure_str(value: Any, _: type) -> str:
    if type(value) is str:
        return value
    raise _type_error("a string", value)


def _structure_optional_str(value: Any, _: type) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _type_error("a string or null", value)


def _structure_float(value: Any, _: type) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return _int_float(value)
    raise _type_error("a number", value)


def _int_float(value: int) -> float:
    """An int as a float; one too large for a float is a decode error, not an
    OverflowError escaping the decoder."""
    try:
        return float(value)
    except OverflowError:
        raise _type_error("a number that fits a float", value) from None


def _structure_optional_float(value: Any, _: type) -> float | None:
    if type(value) is float or value is None:
        return value
    if type(value) is int:
        return _int_float(value)
    raise _type_error("a number or null", value)


def _structure_int(value: Any, _: type) -> int:
    if type(value) is int:
        return value
    raise _type_error("an integer", value)


def _structure_optional_int(value: Any, _: type) -> int | None:
    return None if value is None else _structure_int(value, int)


def _structure_bool(value: Any, _: type) -> bool:
    if type(value) is bool:
        return value
    raise _type_error("a boolean", value)


def _structure_optional_bool(value: Any, _: type) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise _type_error("a boolean or null", value)


def _structure_json_object(value: Any, _: type) -> dict[str, Any]:
    # A task's ``request`` is the caller's own body, kept as is.
    if type(value) is dict:
        return value
    raise _type_error("an object", value)


def _optional_json_object(value: Any, _: type) -> dict[str, Any] | None:
    return None if value is None else _structure_json_object(value, dict)


_PRIMITIVES: dict[Any, Callable[[Any, type], Any]] = {
    str: _structure_str,
    str | None: _structure_optional_str,
    float: _structure_float,
    float | None: _structure_optional_float,
    int: _structure_int,
    int | None: _structure_optional_int,
    bool: _structure_bool,
    bool | None: _structure_optional_bool,
    dict[str, Any]: _structure_json_object,
    dict[str, Any] | None: _optional_json_object,
}


# Lenient hooks for bookkeeping fields: an unexpected value becomes None.


def _lenient_str(value: Any, _: type) -> str | None:
    return value if type(value) is str else None


def _lenient_name(value: Any, _: type) -> str | None:
    # A short word repeated in every record (``"images"``): one shared string object.
    return (sys.intern(value) if len(value) <= 32 else value) if type(value) is str else None


def _lenient_object(value: Any, _: type) -> dict[str, Any] | None:
    return value if type(value) is dict else None


def _lenient_seconds(value: Any, _: type) -> float | None:
    """A Unix time or a duration: a number, a numeric string or an ISO 8601 time."""
    if type(value) is float:
        return value if value - value == 0.0 else None  # NaN and infinities are not times
    if type(value) is int:
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer is valid JSON, and no time
            return None
    if type(value) is str:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = datetime.fromisoformat(value).timestamp()
            except (ValueError, OverflowError, OSError):
                return None
        return seconds if math.isfinite(seconds) else None
    return None


def _lenient_count(value: Any, _: type) -> int:
    return value if type(value) is int else 0


def _is(hint: Any) -> Callable[[Any], bool]:
    return lambda cls: bool(cls == hint)


def _is_list(cls: Any) -> bool:
    return get_origin(cls) is list


def _is_optional(cls: Any) -> bool:
    args = get_args(cls)
    return get_origin(cls) in (Union, UnionType) and len(args) == 2 and type(None) in args


_BOOKKEEPING_TIMES = {
    name: override(struct_hook=_lenient_seconds)
    for name in ("created_at", "started_at", "finished_at", "elapsed")
}
_LENIENT_STR = override(struct_hook=_lenient_str)

# Per record: fields that never come from the wire, and fields read leniently.
_OVERRIDES: dict[type, dict[str, Any]] = {
    Submission: {"callback_url": override(omit=True), "trace_id": _LENIENT_STR},
    Task: {
        **_BOOKKEEPING_TIMES,
        "trace_id": _LENIENT_STR,
        "type": override(struct_hook=_lenient_name),
        "request": override(struct_hook=_lenient_object),
    },
    TaskResponse: {"trace_id": _LENIENT_STR},
    ImageResult: {"prompt": _LENIENT_STR},
    ErrorDetail: {"message": _LENIENT_STR},
    TaskBatch: {"count": override(struct_hook=_lenient_count)},
}


def make_converter(
    *, forbid_extra_keys: bool = False, detailed_validation: bool = True
) -> cattrs.Converter:
    """Build a converter for our records; production uses the module's ``converter``."""
    conv = cattrs.Converter(
        forbid_extra_keys=forbid_extra_keys, detailed_validation=detailed_validation
    )

    def list_hook(cls: Any) -> Any:
        # cattrs would iterate any iterable: a string would become a list of characters.
        items = list_structure_factory(cls, conv)

        def structure_list(value: Any, cls: Any) -> list[Any]:
            if value is None:  # JSON null for an empty collection
                return []
            if not isinstance(value, list):
                raise TypeError(f"expected an array, got {type(value).__name__}")
            return items(value, cls)  # type: ignore[no-any-return]

        return structure_list

    image_hook: list[Callable[[Any, type], ImageResult] | None] = [None]

    def image_list(value: Any, _: Any) -> list[ImageResult]:
        # The images of a task. A malformed entry (a null, a string, an image_url that is
        # not a string) beside good ones is skipped: it must not keep the good images of
        # a finished, paid task away. With no good entry at all, the list is an error.
        if value is None:
            return []
        if type(value) is not list:
            raise TypeError(f"expected an array, got {type(value).__name__}")
        image = image_hook[0]
        if image is None:  # resolved on first use: the hook is registered below
            image = image_hook[0] = conv.get_structure_hook(ImageResult)
        images: list[ImageResult] = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            if item is None:
                continue
            try:
                images.append(image(item, ImageResult))
            except Exception as exc:  # collected with its index, as cattrs does
                where = f"Structuring image @ index {index}"
                note = IterableValidationNote(where, index, ImageResult)
                exc.__notes__ = [*getattr(exc, "__notes__", []), note]
                errors.append(exc)
        if errors and not images:
            raise IterableValidationError("While structuring images", errors, list)
        return images

    def record_hook(cls: Any) -> Any:
        # cattrs reads attrs classes with ``in`` and ``[]``: a string would pass as empty.
        overrides = _OVERRIDES.get(cls, {})
        if cls is TaskResponse:
            overrides = {**overrides, "data": override(struct_hook=image_list)}
        fields = make_dict_structure_fn(cls, conv, **overrides)

        def structure_record(value: Any, cls: Any) -> Any:
            if type(value) is not dict:  # JSON objects are plain dicts
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return fields(value, cls)

        return structure_record

    def optional_hook(cls: Any) -> Any:
        # cattrs' generic Optional handling dispatches on every value; resolve once here.
        (inner_type,) = (arg for arg in get_args(cls) if arg is not type(None))
        inner = conv.get_structure_hook(inner_type)

        def structure_optional(value: Any, _: Any) -> Any:
            return None if value is None else inner(value, inner_type)

        return structure_optional

    conv.register_structure_hook_factory(_is_optional, optional_hook)
    for hint, hook in _PRIMITIVES.items():
        if isinstance(hint, type):
            # Bare classes go through cattrs' single dispatch, which would otherwise
            # win with its own permissive hook (``str(value)``).
            conv.register_structure_hook(hint, hook)
        else:
            conv.register_structure_hook_func(_is(hint), hook)
    conv.register_structure_hook_factory(_is_list, list_hook)
    conv.register_structure_hook_factory(attrs.has, record_hook)

    error_detail = record_hook(ErrorDetail)

    def structure_error_detail(value: Any, cls: type) -> ErrorDetail:
        # The service occasionally sends the error as a bare string.
        if isinstance(value, str):
            return ErrorDetail(code=None, message=value)
        return error_detail(value, cls)  # type: ignore[no-any-return]

    conv.register_structure_hook(ErrorDetail, structure_error_detail)
    return conv


#: The production converter, used for every answer. Its records' hooks are built here,
#: at import, not on the first answer. Errors carry no paths in this fast form: a failure
#: is structured again by ``_explainer`` to say where (``transform_error``).
converter = make_converter(detailed_validation=False)
_explainer = make_converter()
for _warm in (Submission, Task, TaskBatch, TaskResponse, ImageResult, ErrorDetail):
    converter.get_structure_hook(_warm)
    _explainer.get_structure_hook(_warm)

_FAILURES = (
    cattrs.BaseValidationError,
    TypeError,
    ValueError,
    OverflowError,
    KeyError,
    AttributeError,
    RecursionError,
)


def structure(
    value: Any, cls: type[T], *, path: str = "$", conv: cattrs.Converter | None = None
) -> T:
    """Structure ``value`` as ``cls``, turning any cattrs failure into a DecodeFailure.

    ``path`` names where ``value`` sits in the body, for the failure's messages; ``conv``
    replaces the production converter (tests pass a strict one).
    """
    if not isinstance(value, dict):
        raise DecodeFailure([f"expected an object, got {type(value).__name__} @ {path}"])
    try:
        return (conv or converter).structure(value, cls)
    except _FAILURES as failure:
        raise DecodeFailure(_paths(_explained(failure, value, cls, conv), path)) from None


def _explained(
    failure: BaseException, value: Any, cls: type, conv: cattrs.Converter | None
) -> BaseException:
    """The fast converter says what failed, not where: ask the detailed one."""
    if conv is not None:
        return failure
    try:
        _explainer.structure(value, cls)
    except _FAILURES as detailed:
        return detailed
    return failure


def _paths(exc: BaseException, path: str) -> list[str]:
    try:
        return cattrs.transform_error(exc, path=path)
    except RecursionError:
        return [f"nested too deep @ {path}"]
