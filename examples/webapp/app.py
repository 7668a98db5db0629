"""A small aiohttp app that offloads a blocking function to Sluiceway workers and awaits the result.

    SLUICEWAY_REDIS_URL=redis://127.0.0.1:6390/0 python -m examples.webapp.app --port 8080
    sluiceway worker -f examples.webapp.tasks:render_report -q reports

``GET /report/{customer}`` awaits ``call_async`` while the event loop keeps serving ``/health``.
"""

from __future__ import annotations

import argparse

from aiohttp import web

import sluiceway

QUEUE = "reports"


async def report(request: web.Request) -> web.Response:
    try:
        customer = int(request.match_info["customer"])
    except ValueError:
        raise web.HTTPBadRequest(text="customer must be an integer") from None
    try:
        result = await sluiceway.call_async(QUEUE, {"customer": customer}, timeout=30)
    except sluiceway.RemoteError as exc:
        return web.json_response({"error": exc.reason, "message": exc.message}, status=502)
    except TimeoutError:
        return web.json_response({"error": "timeout"}, status=504)
    return web.json_response(result)


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.get("/report/{customer}", report), web.get("/health", health)])
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
