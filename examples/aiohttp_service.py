"""An aiohttp web service that makes images, with callbacks as the fast path.

One NanoBananaClient is shared by every request: created in the app's startup, closed
in its cleanup. Each submission carries a ``callback_url`` to the receiver mounted on
this service, so a wait ends moments after the image is done; if the callback never
comes, the client's lazy polling still finishes the wait.

Endpoints::

    POST /images {"prompt": "...", "model": "..."?}
        200 {"task_id", "image_urls"}           the image is ready
        202 {"task_id", "state": "pending"}     not done within --wait seconds
        422 {"task_id", "error"}                the task failed (e.g. content refused)
        503 {"task_id", ...}                    the service is shutting down
    GET /images/{task_id}                       the task's state and image URLs now
    POST /nanobanana/callback                   where the API delivers callbacks

Run it against the fake server (``nanobanana fake-server`` prints a base URL; its token
is ``test-token``)::

    ACEDATACLOUD_API_TOKEN=test-token python examples/aiohttp_service.py \\
        --base-url http://127.0.0.1:8765 --port 8080
    curl -s -X POST localhost:8080/images -d '{"prompt": "a white siamese cat"}'

Against the real API, ``--public-url`` must be where the service can reach you (e.g.
``https://images.example.com``). SIGINT/SIGTERM shut down gracefully: the listener
closes, requests still waiting answer 503 with their task id (fetch it later with
``GET /images/{task_id}``), then the receiver, the relay and the client are closed.

Several replicas behind one public URL (see ``examples/fleet/README.md``): give them the
same ``NANOBANANA_CALLBACK_SECRET`` and one Redis in ``NANOBANANA_REDIS_URL`` (or
``--redis-url``; needs ``pip install "nanobanana-async[redis]"``). A callback reaching
any replica then finishes the wait on the replica that holds it, at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import attrs
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from nanobanana_async import (
    ClientClosedError,
    NanoBananaClient,
    NanoBananaError,
    Task,
    TaskNotFoundError,
    TaskTimeoutError,
)
from nanobanana_async.webhooks import DEFAULT_PATH, CallbackReceiver

logger = logging.getLogger("aiohttp_service")


@attrs.define
class Settings:
    """What the service needs to know; ``public_url`` may be filled in once bound."""

    base_url: str | None = None
    token: str | None = None
    public_url: str | None = None  # this service's external base URL, for callbacks
    wait: float = 120.0  # seconds a POST /images waits before answering 202
    verify: bool = True  # confirm each callback with one retrieve
    callback_secret: str | None = None  # stable across restarts and replicas, if set
    callback_poll_interval: float = 15.0
    redis_url: str | None = None  # a Redis shared by every replica, to relay callbacks
    redis_channel: str = "nanobanana-async"


SETTINGS = web.AppKey("settings", Settings)
CLIENT = web.AppKey("client", NanoBananaClient)
RECEIVER = web.AppKey("receiver", CallbackReceiver)
STOPPING = web.AppKey("stopping", asyncio.Event)


def create_app(settings: Settings) -> web.Application:
    """The service as an aiohttp application; run it with any aiohttp runner."""
    app = web.Application(client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[STOPPING] = asyncio.Event()
    app.cleanup_ctx.append(nanobanana_context)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/images", create_image)
    app.router.add_get("/images/{task_id}", show_image)
    app.router.add_post(DEFAULT_PATH, receive_callback)
    return app


async def nanobanana_context(app: web.Application) -> AsyncIterator[None]:
    """Startup: one client, its relay if any, and its receiver. Cleanup: the reverse."""
    settings = app[SETTINGS]
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            NanoBananaClient(
                settings.token,
                base_url=settings.base_url,
                callback_poll_interval=settings.callback_poll_interval,
            )
        )
        relay = None
        if settings.redis_url:
            from nanobanana_async.fleet import RedisRelay  # the optional redis extra

            relay = RedisRelay(client, settings.redis_url, channel=settings.redis_channel)
        # With a relay, the receiver refuses a missing secret: replicas must share one.
        receiver = CallbackReceiver(
            client, secret=settings.callback_secret, verify=settings.verify, relay=relay
        )
        if relay is not None:
            await stack.enter_async_context(relay)  # an unreachable Redis is only logged
        stack.push_async_callback(receiver.aclose)  # closed first: it may still publish
        app[CLIENT] = client
        app[RECEIVER] = receiver
        yield


async def on_shutdown(app: web.Application) -> None:
    """The listener is closed by now, so no callback can arrive: stop the waits."""
    app[STOPPING].set()
    await app[RECEIVER].aclose()


async def receive_callback(request: web.Request) -> web.Response:
    return await request.app[RECEIVER].handle(request)


async def create_image(request: web.Request) -> web.Response:
    """Submit, wait for the callback (or a poll), answer with the image URLs."""
    app = request.app
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "the body must be JSON"}, status=400)
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return web.json_response({"error": "prompt must be a non-empty string"}, status=400)
    if app[STOPPING].is_set():
        return web.json_response({"error": "shutting down"}, status=503)
    settings, client = app[SETTINGS], app[CLIENT]
    callback_url = None
    if settings.public_url:  # never derived from the Host header: it would leak the secret
        callback_url = app[RECEIVER].callback_url(settings.public_url.rstrip("/") + DEFAULT_PATH)
    try:
        submission = await client.generate(
            prompt, model=body.get("model"), callback_url=callback_url
        )
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except NanoBananaError as exc:
        logger.warning("submission failed: %s", exc)
        return web.json_response({"error": str(exc)}, status=502)
    task_id = submission.task_id
    waiting = asyncio.ensure_future(client.wait(submission, timeout=settings.wait))
    stopping = asyncio.ensure_future(app[STOPPING].wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not waiting.done():
            waiting.cancel()
        await asyncio.wait({waiting, stopping})
    if waiting.cancelled():
        return _shutting_down(task_id)
    try:
        task = waiting.result()
    except TaskTimeoutError:
        return web.json_response({"task_id": task_id, "state": "pending"}, status=202)
    except ClientClosedError:
        return _shutting_down(task_id)
    except NanoBananaError as exc:
        logger.warning("waiting on task %s failed: %s", task_id, exc)
        return web.json_response({"task_id": task_id, "error": str(exc)}, status=502)
    return web.json_response(_describe(task), status=422 if task.failure else 200)


async def show_image(request: web.Request) -> web.Response:
    """The task's state right now (for a 202 or 503 answered earlier)."""
    task_id = request.match_info["task_id"]
    try:
        task = await request.app[CLIENT].retrieve(task_id)
    except TaskNotFoundError:
        return web.json_response({"task_id": task_id, "error": "no such task"}, status=404)
    except NanoBananaError as exc:
        return web.json_response({"task_id": task_id, "error": str(exc)}, status=502)
    return web.json_response(_describe(task))


def _describe(task: Task) -> dict[str, Any]:
    failure = task.failure
    return {
        "task_id": task.id,
        "state": task.state.value,
        "image_urls": task.image_urls,
        "error": None if failure is None else {"code": failure.code, "message": failure.message},
    }


def _shutting_down(task_id: str) -> web.Response:
    return web.json_response(
        {"task_id": task_id, "state": "pending", "error": "shutting down; GET it later"},
        status=503,
        headers={"Retry-After": "5"},
    )


class PathOnlyAccessLogger(AbstractAccessLogger):
    """An access log without query strings: a callback URL's query holds the secret."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            time,
        )


async def serve(settings: Settings, host: str, port: int) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    runner = web.AppRunner(
        create_app(settings),
        access_log_class=PathOnlyAccessLogger,
        handle_signals=False,
        shutdown_timeout=10.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = f"http://{host}:{runner.addresses[0][1]}"
        if settings.public_url is None:
            settings.public_url = bound
        print(f"listening on {bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        print("shutting down", flush=True)
    finally:
        await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An image service on the Nano Banana API.")
    parser.add_argument("--base-url", default=os.environ.get("ACEDATACLOUD_API_BASE_URL"))
    parser.add_argument(
        "--token",
        default=os.environ.get("ACEDATACLOUD_API_TOKEN"),
        help="API token (better: the ACEDATACLOUD_API_TOKEN environment variable)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--public-url", help="where the API can reach this service")
    parser.add_argument("--wait", type=float, default=120.0)
    parser.add_argument("--no-verify", action="store_true", help="trust callback bodies")
    parser.add_argument("--callback-poll-interval", type=float, default=15.0)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("NANOBANANA_REDIS_URL"),
        help="a Redis shared by every replica, to relay callbacks (may carry a password: "
        "better the NANOBANANA_REDIS_URL environment variable)",
    )
    parser.add_argument("--redis-channel", default="nanobanana-async")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("pass --token or set ACEDATACLOUD_API_TOKEN")
    if args.redis_url and not os.environ.get("NANOBANANA_CALLBACK_SECRET"):
        parser.error(
            "with a Redis relay, set NANOBANANA_CALLBACK_SECRET (the same on every replica)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings(
        base_url=args.base_url,
        token=args.token,
        public_url=args.public_url,
        wait=args.wait,
        verify=not args.no_verify,
        callback_secret=os.environ.get("NANOBANANA_CALLBACK_SECRET"),
        callback_poll_interval=args.callback_poll_interval,
        redis_url=args.redis_url,
        redis_channel=args.redis_channel,
    )
    asyncio.run(serve(settings, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
