"""Decoding a 50-record ``retrieve_batch`` answer, beside ``json.loads`` alone.

The body holds 50 finished records shaped like the protocol notes' example, with every
bookkeeping field (``_id``, ``api_id``, ``application_id``, ``credential_id``,
``user_id``, timestamps, ``request``, ``response`` with one image). Timed, in CPU time
(``time.process_time``, so other processes' load does not count), alternating:

* ``json.loads(body)``: the baseline;
* ``parse_task_batch(RawResponse(200, {}, body))``: the library's ``retrieve_batch`` path
  (error check, JSON, structure into ``TaskBatch``);
* ``batch_items`` + ``read_item`` per record: the poll loop's path (record by record,
  each structured: its first read of each task);
* ``structure(json.loads(body), TaskBatch)``: JSON once plus structuring, to show the
  share of the library's cost that is not structuring.

The last column counts ``json.loads`` calls per decode: every call past the first parses
the same body again.

Target: ``parse_task_batch`` takes at most 3x ``json.loads``, best of the repeats.

    python benchmarks/bench_decode.py [--records 50] [--repeat 15] [--number 200]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from _common import fmt_ratio, median, print_table, verdict

from nanobanana_async import TaskBatch
from nanobanana_async._converter import structure
from nanobanana_async._protocol import RawResponse, batch_items, parse_task_batch, read_item

TARGET = 3.0


def make_record(index: int) -> dict[str, Any]:
    """A finished task record like the protocol notes' example, every field present."""

    def uid(salt: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{salt}/{index}"))

    task_id = uid("task")
    trace_id = uid("trace")
    prompt = f"a white siamese cat, number {index}"
    created = 1757183036.787 + index
    return {
        "_id": f"{index:024x}",
        "id": task_id,
        "api_id": uid("api"),
        "application_id": uid("application"),
        "credential_id": uid("credential"),
        "user_id": uid("user"),
        "created_at": created,
        "started_at": created + 0.113,
        "finished_at": created + 11.313,
        "elapsed": 11.3,
        "type": "images",
        "trace_id": trace_id,
        "request": {"action": "generate", "prompt": prompt},
        "response": {
            "success": True,
            "task_id": task_id,
            "trace_id": trace_id,
            "data": [
                {
                    "prompt": prompt,
                    "image_url": f"https://platform.cdn.acedata.cloud/nanobanana/{index:08x}.png",
                }
            ],
        },
    }


def make_body(records: int) -> bytes:
    items = [make_record(i) for i in range(records)]
    return json.dumps({"items": items, "count": len(items)}).encode()


def count_loads(func: Callable[[], object]) -> int:
    """How many times ``func`` runs ``json.loads`` (anywhere, through the ``json`` module)."""
    calls = 0
    real = json.loads

    def loads(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    json.loads = loads
    try:
        func()
    finally:
        json.loads = real
    return calls


def main(args: argparse.Namespace) -> None:
    body = make_body(args.records)
    response = RawResponse(200, {}, body)

    def loads() -> object:
        return json.loads(body)

    def parse() -> object:
        return parse_task_batch(RawResponse(200, {}, body))

    def items() -> object:
        records = batch_items(RawResponse(200, {}, body))
        return [read_item(raw, None, task_id) for task_id, raw in records.items()]

    def loads_structure() -> object:
        return structure(json.loads(body), TaskBatch)

    cases: dict[str, Callable[[], object]] = {
        "json.loads (baseline)": loads,
        "parse_task_batch": parse,
        "batch_items + read_item (poll loop)": items,
        "json.loads + structure": loads_structure,
    }
    # Sanity: every path decodes every record, the same way.
    batch = parse_task_batch(response)
    tasks = items()
    if not (
        batch.count == len(batch.items) == args.records
        and tasks == batch.items
        and all(task.done and task.image_urls for task in batch.items)
    ):
        raise AssertionError("the decoding paths disagree on the sample body")
    loads_per_call = {name: count_loads(func) for name, func in cases.items()}

    times: dict[str, list[float]] = {name: [] for name in cases}
    ratios: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for func in cases.values():  # warm up
        for _ in range(max(1, args.number // 10)):
            func()
    for repeat in range(args.repeat):
        shift = repeat % len(names)
        got: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:  # rotate the order each repeat
            func = cases[name]
            start = time.process_time()
            for _ in range(args.number):
                func()
            got[name] = (time.process_time() - start) / args.number
            times[name].append(got[name])
        for name in names:
            ratios[name].append(got[name] / got["json.loads (baseline)"])

    base_best = min(times["json.loads (baseline)"])
    rows = []
    for name in names:
        best = min(times[name])
        rows.append(
            [
                name,
                f"{best * 1e6:.1f}",
                f"{median(times[name]) * 1e6:.1f}",
                fmt_ratio(best / base_best),
                fmt_ratio(median(ratios[name])),
                f"{best / args.records * 1e6:.2f}",
                loads_per_call[name],
            ]
        )
    print(
        f"decode a {args.records}-record retrieve_batch body ({len(body)} bytes): "
        f"CPU time, {args.repeat} alternating repeats x {args.number} calls"
    )
    print_table(
        [
            "path",
            "best us/call",
            "median us/call",
            "best ratio",
            "median paired ratio",
            "best us/record",
            "json.loads calls",
        ],
        rows,
    )
    parse_ratio = min(times["parse_task_batch"]) / base_best
    items_ratio = min(times["batch_items + read_item (poll loop)"]) / base_best
    verdict(
        f"parse_task_batch within {TARGET}x of json.loads",
        parse_ratio <= TARGET,
        f"best ratio {fmt_ratio(parse_ratio)}",
    )
    verdict(
        f"the poll loop's path within {TARGET}x of json.loads",
        items_ratio <= TARGET,
        f"best ratio {fmt_ratio(items_ratio)}",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=50, help="records in the body")
    parser.add_argument("--repeat", type=int, default=15, help="alternating repeats")
    parser.add_argument("--number", type=int, default=200, help="calls per timing")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
