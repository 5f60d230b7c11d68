"""The converter: strict on recorded samples (API drift fails here), robust on garbage."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FIXTURES, load_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanobanana_async import NanoBananaError, Submission, Task, TaskBatch, TaskState
from nanobanana_async._converter import DecodeFailure, make_converter, structure
from nanobanana_async._protocol import (
    RawResponse,
    batch_items,
    error_for,
    parse_task,
    read_item,
    unchanged,
)

STRICT = make_converter(forbid_extra_keys=True)
RECORDS = sorted(path.name for path in FIXTURES.glob("task_*.json"))
# Keys every record carries that Task does not keep, on purpose (see _models.Task).
KNOWN_UNKEPT = {"_id", "api_id", "application_id", "credential_id", "user_id"}


def known_keys_only(record: dict[str, Any]) -> dict[str, Any]:
    """The record less the keys Task knows it drops; anything else must be modelled."""
    assert record.keys() >= KNOWN_UNKEPT, "the sample lost a key we expect"
    return {key: value for key, value in record.items() if key not in KNOWN_UNKEPT}


@pytest.mark.parametrize("name", RECORDS)
def test_recorded_records_have_no_unknown_keys(name: str) -> None:
    # Production ignores unknown keys; here a new field in a sample fails loudly.
    structure(known_keys_only(load_fixture(name)), Task, conv=STRICT)


def test_recorded_batch_has_no_unknown_keys() -> None:
    batch = load_fixture("batch.json")
    batch["items"] = [known_keys_only(item) for item in batch["items"]]
    structure(batch, TaskBatch, conv=STRICT)


def test_strict_converter_reports_the_drift() -> None:
    record = known_keys_only(load_fixture("task_succeeded.json"))
    record["response"]["brand_new"] = 1
    with pytest.raises(DecodeFailure, match=r"brand_new.*\$\.response"):
        structure(record, Task, conv=STRICT)
    record = known_keys_only(load_fixture("task_succeeded.json"))
    record["also_new"] = 1
    with pytest.raises(DecodeFailure, match=r"also_new"):
        structure(record, Task, conv=STRICT)


def test_ints_are_numbers_but_bools_are_not() -> None:
    record = {"id": "t", "created_at": 1757183036}
    assert structure(record, Task).created_at == 1757183036.0
    with pytest.raises(DecodeFailure, match=r"\$\.response\.success"):
        structure({"id": "t", "response": {"success": 1}}, Task)


@pytest.mark.parametrize("bad", [None, 5, True, {"a": 1}, ["x"], 1.5])
def test_ids_are_strict_never_stringified(bad: Any) -> None:
    # A possibly paid task id is never replaced by str(None) or str({...}).
    with pytest.raises(DecodeFailure, match=r"\$\.id"):
        structure({"id": bad}, Task)
    with pytest.raises(DecodeFailure, match=r"\$\.task_id"):
        structure({"task_id": bad}, Submission)


SUCCEEDED = {"id": "t", "response": {"success": True, "data": [{"image_url": "https://i/0.png"}]}}


@pytest.mark.parametrize(
    ("field", "value", "read_as"),
    [
        ("elapsed", "11.3", 11.3),
        ("elapsed", True, None),
        ("created_at", "2025-09-06T18:23:56+00:00", 1757183036.0),
        ("created_at", "yesterday", None),
        ("finished_at", {"$date": 1}, None),
        ("started_at", float("inf"), None),
        ("request", "generate a cat", None),
        ("trace_id", 42, None),
        ("type", ["images"], None),
    ],
)
def test_bookkeeping_fields_of_a_finished_task_are_lenient(
    field: str, value: Any, read_as: Any
) -> None:
    # A field the client does not act on must not keep a finished task's images away.
    task = structure({**SUCCEEDED, field: value}, Task)
    assert getattr(task, field) == read_as
    assert task.state is TaskState.SUCCEEDED
    assert task.image_urls == ["https://i/0.png"]


@pytest.mark.parametrize("bad", [None, "oops", 7, {"image_url": 42}, {"image_url": ["u"]}])
def test_a_malformed_image_beside_a_good_one_is_skipped(bad: Any) -> None:
    # A finished, paid task's good image must be reachable whatever sits beside it.
    record = {**SUCCEEDED, "response": {"success": True, "data": [bad, {"image_url": "u"}]}}
    assert structure(record, Task).image_urls == ["u"]


@pytest.mark.parametrize(
    ("response", "path"),
    [
        ({"success": True, "data": [{"image_url": 7}]}, r"\$\.response\.data\[0\]\.image_url"),
        ({"success": True, "data": [None, "https://x"]}, r"\$\.response\.data\[1\]"),
        ({"success": True, "data": [{"image_url": 7}, 5]}, r"\$\.response\.data\[0\]"),
        ({"success": True, "data": "https://x"}, r"\$\.response\.data"),
        ({"success": "true"}, r"\$\.response\.success"),
        ({"success": False, "error": {"code": 403}}, r"\$\.response\.error\.code"),
    ],
)
def test_what_matters_stays_strict(response: Any, path: str) -> None:
    with pytest.raises(DecodeFailure, match=path):
        structure({"id": "t", "response": response}, Task)


def test_null_data_is_empty() -> None:
    task = structure({"id": "t", "response": {"success": True, "data": None}}, Task)
    assert task.image_urls == []
    assert task.state is TaskState.PENDING


# --- property tests ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)


def mutated(record: Any, draw: st.DrawFn) -> Any:
    """Replace one value somewhere in ``record`` (or a whole branch) with any JSON value."""
    if isinstance(record, dict) and record and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(record)))
        return {**record, key: mutated(record[key], draw)}
    if isinstance(record, list) and record and draw(st.booleans()):
        index = draw(st.integers(0, len(record) - 1))
        return [*record[:index], mutated(record[index], draw), *record[index + 1 :]]
    return draw(json_values)


@st.composite
def malformed_records(draw: st.DrawFn) -> Any:
    base = load_fixture(draw(st.sampled_from(RECORDS)))
    for _ in range(draw(st.integers(1, 3))):
        base = mutated(base, draw)
    return base


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_records())
def test_malformed_records_raise_only_our_errors(record: Any) -> None:
    response = RawResponse(200, {}, json.dumps(record).encode())
    asked = record.get("id") if isinstance(record, dict) else None
    try:
        task = parse_task(response, asked if isinstance(asked, str) else "t")
    except NanoBananaError:
        return
    # Whatever decodes must answer the state questions without blowing up.
    assert task.state in TaskState
    assert isinstance(task.image_urls, list)
    assert task.done == (task.state is not TaskState.PENDING)


@settings(max_examples=200)
@given(st.lists(malformed_records(), max_size=4))
def test_malformed_batches_raise_only_our_errors(items: list[Any]) -> None:
    response = RawResponse(200, {}, json.dumps({"items": items}).encode())
    try:
        records = batch_items(response)
    except NanoBananaError:
        return
    for task_id, raw in records.items():
        try:
            task = read_item(raw, None, task_id)
        except NanoBananaError:
            continue
        assert task.id == task_id


def progress(task: Task) -> tuple[Any, ...]:
    """What moves while a task runs (its identity fields do not)."""
    response = task.response
    return (
        task.state,
        task.started_at,
        task.finished_at,
        task.elapsed,
        task.error,
        None if response is None else (response.success, response.data, response.error),
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(malformed_records(), malformed_records())
def test_the_unchanged_shortcut_agrees_with_structuring(before: Any, after: Any) -> None:
    # read_item skips structuring a record it judges unchanged: never wrongly.
    try:
        kept = structure(before, Task)
    except DecodeFailure:
        return
    if not isinstance(after, dict) or not unchanged(after, kept):
        return
    try:
        again = structure({**after, "id": kept.id}, Task)
    except DecodeFailure:
        # Only an identity field can be malformed here; it is not read again.
        return
    assert progress(again) == progress(kept)
    assert not again.done


@settings(max_examples=300)
@given(
    st.integers(100, 599),
    json_values | st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
    st.sampled_from([None, "5", "abc", "Wed, 21 Oct 2015 07:28:00 GMT"]),
)
def test_error_mapping_never_raises(status: int, payload: Any, retry_after: str | None) -> None:
    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    error = error_for(RawResponse(status, headers, body))
    if not 200 <= status < 300:
        assert error is not None
        assert error.status == status
        assert error.message
    if error is not None:
        assert isinstance(error, NanoBananaError)
