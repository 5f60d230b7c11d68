"""A round-robin reverse proxy, to try several replicas on one machine.

In production the balancer you already run (nginx, HAProxy, a cloud load balancer, a
Kubernetes Service) plays this part; this one exists so that the fleet example, its
test and ``benchmarks/bench_fleet.py`` need nothing else installed. Each request goes
to the next replica in turn, callbacks from the API included: so a callback usually
reaches a replica that does not hold the wait, which is what the Redis relay is for.

    python examples/fleet/front.py --port 8080 http://127.0.0.1:8081 http://127.0.0.1:8082

It keeps no access log: a callback URL's query string carries the shared secret.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

UPSTREAMS = web.AppKey("upstreams", list[str])
SESSION = web.AppKey("session", aiohttp.ClientSession)
TURN = web.AppKey("turn", list[int])

# Headers that belong to one connection, not to the request (RFC 9110, 7.6.1), plus
# the ones aiohttp computes again for the forwarded message.
_NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def create_front(upstreams: list[str]) -> web.Application:
    """A proxy to ``upstreams`` (base URLs), in turn; the list may be filled in later."""
    app = web.Application(client_max_size=1024 * 1024)
    app[UPSTREAMS] = upstreams
    app[TURN] = [0]
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _session(app: web.Application) -> AsyncIterator[None]:
    # No total timeout: a POST /images is held until its image is done.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def _headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _NOT_FORWARDED)


async def forward(request: web.Request) -> web.Response:
    """Send the request to the next upstream and answer with what it answered."""
    app = request.app
    upstreams = app[UPSTREAMS]
    if not upstreams:
        return web.Response(status=503, text="no upstream yet")
    turn = app[TURN]
    upstream = upstreams[turn[0] % len(upstreams)]
    turn[0] += 1
    body = await request.read()
    try:
        async with app[SESSION].request(
            request.method,
            upstream.rstrip("/") + str(request.rel_url),
            data=body,
            headers=_headers(request.headers),
            allow_redirects=False,
        ) as answer:
            payload = await answer.read()
            return web.Response(
                status=answer.status, body=payload, headers=_headers(answer.headers)
            )
    except aiohttp.ClientError:
        return web.Response(status=502, text="upstream unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A round-robin reverse proxy.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("upstreams", nargs="+", help="base URLs of the replicas")
    args = parser.parse_args(argv)
    print(f"listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(
        create_front(args.upstreams), host=args.host, port=args.port, access_log=None, print=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
