"""The wire protocol without I/O: request bodies, and what each recorded answer means."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import load_fixture

from nanobanana_async import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DownloadError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    TaskFailedError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from nanobanana_async._protocol import (
    RawResponse,
    batch_items,
    build_retrieve,
    build_retrieve_batch,
    build_submission,
    check_task_ids,
    error_for,
    parse_retry_after,
    parse_submission,
    parse_task,
    parse_task_batch,
    read_item,
    task_from_callback,
)


def answer(body: Any, status: int = 200, **headers: str) -> RawResponse:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return RawResponse(status, headers, raw)


def record_of(body: dict[str, Any]) -> Any:
    """The Task a ``retrieve`` of the record's own id reads from ``body``."""
    return parse_task(answer(body), body["id"])


# --- requests -------------------------------------------------------------------------


def test_generate_body_sends_only_what_was_set_and_always_async() -> None:
    assert build_submission("generate", "a cat") == {
        "action": "generate",
        "prompt": "a cat",
        "async": True,
    }


def test_edit_body_has_no_default_aspect_ratio() -> None:
    body = build_submission("edit", "blue", image_urls=["https://x/a.png"], count=2)
    assert body == {
        "action": "edit",
        "prompt": "blue",
        "image_urls": ["https://x/a.png"],
        "count": 2,
        "async": True,
    }
    assert "aspect_ratio" not in body


def test_all_options_pass_through() -> None:
    body = build_submission(
        "generate",
        "a cat",
        model="nano-banana-future:official",  # unknown models pass through
        aspect_ratio="16:9",
        resolution="2K",
        count=4,
        callback_url="https://example.com/hook?x=1",
    )
    assert body["model"] == "nano-banana-future:official"
    assert body["aspect_ratio"] == "16:9"
    assert body["resolution"] == "2K"
    assert body["count"] == 4
    assert body["callback_url"] == "https://example.com/hook?x=1"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a", "count": 0}, "count"),
        ({"prompt": "a", "count": 5}, "count"),
        ({"prompt": "a", "count": True}, "count"),
        ({"prompt": "a", "aspect_ratio": "5:4"}, "aspect_ratio"),
        ({"prompt": "a", "resolution": "8K"}, "resolution"),
        ({"prompt": "a", "callback_url": "ftp://x"}, "callback_url"),
        ({"prompt": "a", "model": ""}, "model"),
        ({"prompt": "a", "image_urls": ["https://x/a.png"]}, "image_urls"),
    ],
)
def test_bad_generate_arguments_name_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=argument):
        build_submission("generate", prompt, **kwargs)


@pytest.mark.parametrize("image_urls", [None, [], "https://x/a.png", [""]])
def test_edit_needs_image_urls(image_urls: Any) -> None:
    with pytest.raises(ValueError, match="image_urls"):
        build_submission("edit", "blue", image_urls=image_urls)


def test_retrieve_bodies() -> None:
    assert build_retrieve("t1") == {"action": "retrieve", "id": "t1"}
    assert build_retrieve_batch(["a", "b"]) == {"action": "retrieve_batch", "ids": ["a", "b"]}


@pytest.mark.parametrize("bad", ["", " ", None, 5])
def test_bad_task_id(bad: Any) -> None:
    with pytest.raises(ValueError, match="task_id"):
        build_retrieve(bad)


def test_task_ids_are_checked_and_deduplicated_in_order() -> None:
    assert check_task_ids(["b", "a", "b"]) == ["b", "a"]
    with pytest.raises(ValueError, match="empty"):
        check_task_ids([])
    with pytest.raises(ValueError, match="single string"):
        check_task_ids("abc")
    with pytest.raises(ValueError, match="task_id"):
        check_task_ids(["a", ""])


# --- task records -----------------------------------------------------------------------


def test_finished_record() -> None:
    task = record_of(load_fixture("task_succeeded.json"))
    assert task.state is TaskState.SUCCEEDED
    assert task.done
    assert task.image_urls == ["https://platform.cdn.acedata.cloud/nanobanana/7e7bd000.png"]
    assert task.failure is None
    assert task.elapsed == 11.3
    assert task.request == {"action": "generate", "prompt": "a white siamese cat"}


@pytest.mark.parametrize("name", ["task_pending_ack.json", "task_pending_bare.json"])
def test_pending_records_are_not_done(name: str) -> None:
    # The acknowledgment {"success": true, "task_id": ...} is not a result.
    task = record_of(load_fixture(name))
    assert task.state is TaskState.PENDING
    assert not task.done
    assert task.image_urls == []
    assert task.failure is None


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("task_failed_response.json", "forbidden"),
        ("task_failed_top_level.json", "api_error"),
        ("task_failed_no_images.json", "no_images"),
    ],
)
def test_failed_records(name: str, code: str) -> None:
    task = record_of(load_fixture(name))
    assert task.state is TaskState.FAILED
    assert task.done
    assert task.failure is not None
    assert task.failure.code == code
    assert task.image_urls == []


def test_unknown_id_answers_empty_object() -> None:
    with pytest.raises(TaskNotFoundError) as info:
        parse_task(answer({}), "missing-id")
    assert info.value.task_id == "missing-id"


def test_batch() -> None:
    batch = parse_task_batch(answer(load_fixture("batch.json")))
    assert batch.count == 3
    assert [task.state for task in batch.items] == [
        TaskState.SUCCEEDED,
        TaskState.PENDING,
        TaskState.FAILED,
    ]


def test_poller_batch_decoding_isolates_a_bad_record() -> None:
    body = load_fixture("batch.json")
    body["items"][1]["response"] = {"success": "yes"}
    with pytest.raises(ResponseDecodeError, match=r"\$\.items\[1\]\.response\.success"):
        parse_task_batch(answer(body))
    records = batch_items(answer(body))
    assert list(records) == [item["id"] for item in body["items"]]
    good = [
        read_item(records[item["id"]], None, item["id"])
        for item in (body["items"][0], body["items"][2])
    ]
    assert [task.state for task in good] == [TaskState.SUCCEEDED, TaskState.FAILED]
    bad_id = body["items"][1]["id"]
    with pytest.raises(ResponseDecodeError, match=r"response\.success") as info:
        read_item(records[bad_id], None, bad_id)
    assert bad_id in str(info.value)


def test_poller_batch_keeps_the_first_record_of_a_repeated_id_and_drops_id_less_items() -> None:
    body = load_fixture("batch.json")
    first = body["items"][0]
    body["items"] += [{**first, "trace_id": "second"}, {"no": "id"}, {"id": 5}, "junk"]
    records = batch_items(answer(body))
    assert list(records) == [item["id"] for item in body["items"][:3]]
    assert records[first["id"]]["trace_id"] == first["trace_id"]


def test_an_unchanged_pending_record_is_not_structured_again() -> None:
    raw = load_fixture("task_pending_ack.json")
    task_id = raw["id"]
    first = read_item(json.loads(json.dumps(raw)), None, task_id)
    assert read_item(json.loads(json.dumps(raw)), first, task_id) is first
    moved = {**json.loads(json.dumps(raw)), "started_at": 1757183037.0}
    again = read_item(moved, first, task_id)
    assert again is not first
    assert again.started_at == 1757183037.0


def test_wrong_type_names_the_field_path() -> None:
    record = load_fixture("task_succeeded.json")
    record["response"]["data"][0]["image_url"] = 42
    with pytest.raises(ResponseDecodeError) as info:
        record_of(record)
    assert "$.response.data[0].image_url" in str(info.value)
    assert info.value.status == 200
    assert len(info.value.body_excerpt) <= 200


def test_unknown_fields_are_ignored() -> None:
    record = load_fixture("task_succeeded.json")
    record["brand_new_field"] = {"nested": [1, 2]}
    record["response"]["also_new"] = True
    assert record_of(record).state is TaskState.SUCCEEDED


@pytest.mark.parametrize(
    "body", ["<html>oops</html>", '{"items": [', "", "[1, 2]", '"text"', "null"]
)
def test_bodies_that_are_not_json_objects(body: str) -> None:
    with pytest.raises(ResponseDecodeError) as info:
        parse_task(answer(body), "x")
    assert info.value.body_excerpt == body[:200]


# --- submissions ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["submission_async.json", "submission_sync.json"])
def test_submission(name: str) -> None:
    submission = parse_submission(answer(load_fixture(name)))
    assert submission.task_id == "4d320ead-4af4-4a55-8f3e-f2afebdf4fd0"
    assert submission.trace_id == "7ba1f1e8-0ef8-450d-8bb2-b5c3bf1ea319"
    assert submission.callback_url is None


def test_submission_keeps_callback_url() -> None:
    submission = parse_submission(
        answer(load_fixture("submission_async.json")), callback_url="https://h/cb"
    )
    assert submission.callback_url == "https://h/cb"


def test_submission_without_task_id() -> None:
    with pytest.raises(ResponseDecodeError):
        parse_submission(answer({"success": True, "task_id": ""}))
    with pytest.raises(ResponseDecodeError):
        parse_submission(answer({"success": True}))


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "cls", "code"),
    [
        ("error_400_model.json", 400, BadRequestError, "bad_request"),
        ("error_400_model.json", 413, BadRequestError, "bad_request"),
        ("error_401.json", 401, AuthenticationError, "invalid_token"),
        ("error_403_used_up.json", 403, PermissionDeniedError, "used_up"),
        ("error_500.json", 404, NotFoundError, "api_error"),
        ("error_429.json", 429, RateLimitError, "too_many_requests"),
        ("error_500.json", 500, ServerError, "api_error"),
        ("error_500.json", 503, ServerError, "api_error"),
        ("error_500.json", 418, APIError, "api_error"),
    ],
)
def test_error_answers(name: str, status: int, cls: type[APIError], code: str) -> None:
    payload = load_fixture(name)
    error = error_for(answer(payload, status))
    assert type(error) is cls
    assert error.status == status
    assert error.code == code
    assert error.message == payload["error"]["message"]
    assert error.trace_id == payload["trace_id"]
    assert payload["error"]["message"] in str(error)


def test_error_as_bare_string() -> None:
    error = error_for(answer(load_fixture("error_bare_string.json"), 500))
    assert isinstance(error, ServerError)
    assert error.code is None
    assert error.message == "something went wrong"


def test_proxy_html_page_is_a_readable_server_error() -> None:
    error = error_for(answer(load_fixture("error_502.html"), 502))
    assert isinstance(error, ServerError)
    assert error.status == 502
    assert error.message == "502 Bad Gateway"


def test_2xx_body_with_success_false_is_an_error_by_code() -> None:
    error = error_for(answer(load_fixture("error_403_used_up.json"), 200))
    assert isinstance(error, PermissionDeniedError)
    assert error.code == "used_up"


def test_success_answers_are_not_errors() -> None:
    assert error_for(answer(load_fixture("task_succeeded.json"))) is None
    assert error_for(answer("<html>not json</html>")) is None  # a decode problem instead
    assert error_for(answer({})) is None


def test_rate_limit_reads_retry_after() -> None:
    error = error_for(answer(load_fixture("error_429.json"), 429, **{"Retry-After": "7"}))
    assert isinstance(error, RateLimitError)
    assert error.retry_after == 7.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("3", 3.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("9999", 9999.0),  # capped by RetryPolicy.wait, in one place
        ("inf", None),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now=now) == expected


# --- callbacks --------------------------------------------------------------------------


def test_callback_body_is_a_finished_record() -> None:
    task = task_from_callback(json.dumps(load_fixture("callback_succeeded.json")), received_at=5.0)
    assert task.state is TaskState.SUCCEEDED
    assert task.finished_at == 5.0
    empty = task_from_callback({"success": True, "task_id": "t", "data": []}, received_at=5.0)
    assert empty.state is TaskState.FAILED  # a callback means done: no image is a failure


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"success": true}', b'{"task_id": 3}'])
def test_malformed_callbacks(body: bytes) -> None:
    with pytest.raises(ResponseDecodeError) as info:
        task_from_callback(body, received_at=0.0)
    assert info.value.status == 0


# --- errors survive pickling (multiprocessing, task queues) ---------------------------------


@pytest.mark.parametrize(
    "error",
    [
        BadRequestError("model is invalid.", status=400, code="bad_request", trace_id="t"),
        RateLimitError("slow down", code="too_many_requests", retry_after=3.0),
        ServerError("502 Bad Gateway", status=502),
        ResponseDecodeError("not JSON", status=200, body_excerpt="<html>"),
        TaskNotFoundError("abc"),
        APIConnectionError("refused", request_sent=False),
        APITimeoutError("no answer"),
        DownloadError("HTTP 404", url="https://cdn/x.png", status=404),
        TaskFailedError(record_of(load_fixture("task_failed_response.json"))),
        TaskTimeoutError("abc", record_of(load_fixture("task_pending_ack.json"))),
    ],
)
def test_errors_pickle(error: Exception) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
