"""`pantherseq serve`: the real-time scoring service (FastAPI) over a store of user states.

    POST /score            one transaction: {"user_id", "timestamp", <the dataset's raw fields>}        [score]
                           -> {score, deviation, top_expected, model_version, latency_ms, cold_start, stale,
                               event_seq}; 409 older than the user's last event, 429 new-user cap
    POST /score/batch      {"transactions": [...]} -> {"results": [...]} (in order; each is also logged;
                           a refused one is {"user_id", "error": {"status", "detail"}})                [score]
    POST /feedback         {"user_id", "event_seq", "label"}: a fraud label became known            [feedback]
    GET  /users/{id}/state what the service holds for a user (readable)                           [read-state]
    GET  /stats            refresh-lag percentiles, queue, skipped records (any key; ?reset=true: admin)
    GET  /metrics          Prometheus text (open, or admin when `guard_metrics`)
    GET  /health, OpenAPI at /docs                                                                    (open)

This module is only the HTTP layer: `create_app(service, keys)` over a `Service` (serve/service.py: request
path, event log, refresh worker, metrics), whose scoring is serve/scorer.py and whose request bodies are
serve/schemas.py. `Guard`, an ASGI middleware in front of everything, checks the API key and its scope
(serve/auth.py; 401 / 403 before the body is read), refuses a body over `max_body` bytes (413, before any
parsing) and writes the access log: one JSON line per request on the logger `pantherseq.access` (time,
key id, method, route, status, latency; never a payload, a token or a user id). Scoring runs in the
service's bounded thread pool, never on the event loop; a batch goes in chunks, so other requests
interleave with it; over `Service.max_pending` requests in flight get 503. Error details never echo more
than `MAX_DETAIL` characters of input, and no response holds a server path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from pantherseq.errors import echo
from pantherseq.serve.auth import ApiKeys
from pantherseq.serve.schemas import MAX_BATCH, Feedback, batch_model, transaction_model, valid_user_id
from pantherseq.serve.service import Refused, Service

access_log = logging.getLogger("pantherseq.access")
log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
MAX_DETAIL = 200
MAX_ERRORS = 20
BATCH_CHUNK = 16  # transactions per pool job: a big batch yields to other requests between chunks
OPEN = ("/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
TRUE = {"1", "true", "t", "yes", "y", "on"}


def required_scope(method: str, path: str, query: bytes, guard_metrics: bool) -> str | None:
    """The scope a request needs: None = open, "" = any valid key."""
    if path in OPEN or (path == "/metrics" and not guard_metrics):
        return None
    if path in ("/score", "/score/batch"):
        return "score"
    if path == "/feedback":
        return "feedback"
    if path.startswith("/users/"):
        return "read-state"
    if path == "/stats" and any(v.lower() in TRUE for v in parse_qs(query.decode("latin-1")).get("reset", [])):
        return "admin"
    return "admin" if path == "/metrics" else ""


class Guard:
    """ASGI middleware: authentication and scopes, the body cap, the access log and request counts."""

    def __init__(self, app: Any, service: Service, keys: ApiKeys | None, max_body: int, guard_metrics: bool):
        self.app, self.service, self.keys = app, service, keys
        self.max_body, self.guard_metrics = max_body, guard_metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        state = scope.setdefault("state", {})

        async def send_(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            refusal = self._authorize(scope, state)
            if refusal is None:
                refusal, receive = await self._read_body(scope, receive)
            if refusal is not None:
                await _reply(send_, *refusal)
            else:
                await self.app(scope, receive, send_)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.service.metrics.requests.labels(endpoint, str(status[0])).inc()
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "key": state.get("key_id", "-"),
                    "method": scope["method"], "endpoint": endpoint, "status": status[0],
                    "latency_ms": round((time.perf_counter() - t0) * 1e3, 3)}))

    def _authorize(self, scope: dict, state: dict) -> tuple | None:
        need = required_scope(scope["method"], scope["path"], scope.get("query_string", b""), self.guard_metrics)
        if self.keys is None or need is None:
            return None
        auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        key = self.keys.check(auth)
        if key is None:
            return 401, "a valid API key is required: Authorization: Bearer <token>", [(b"www-authenticate",
                                                                                        b"Bearer")]
        state["key_id"] = key.key_id
        if need and need not in key.scopes:
            return 403, f"this key lacks the scope {need!r}", []
        return None

    async def _read_body(self, scope: dict, receive: Any) -> tuple[tuple | None, Any]:
        """Read the body (at most max_body bytes) before anything parses it; replay it to the app."""
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        too_big = 413, f"the request body is over {self.max_body} bytes", []
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return (too_big if length.isdigit() else (400, "bad content-length", [])), receive
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return (400, "the client disconnected", []), receive
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return too_big, receive
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), [False]

        async def replay() -> dict:
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


async def _reply(send: Any, status: int, detail: str, headers: list) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc[1:])[:100] or "body"


def create_app(service: Service, keys: ApiKeys | None = None, *, max_body: int = MAX_BODY,
               max_batch: int = MAX_BATCH, guard_metrics: bool = False) -> FastAPI:
    """The HTTP app over `service`; `keys` None = no authentication (loopback development only)."""
    Tx = transaction_model(service.scorer.cfg)
    Batch = batch_model(Tx, max_batch)

    app = FastAPI(title="pantherseq scoring", version=service.scorer.model_version,
                  description="Real-time fraud / deviation scoring from cached PANTHER user states.")
    app.state.service = service
    app.add_middleware(Guard, service=service, keys=keys, max_body=max_body, guard_metrics=guard_metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field(e.get("loc", ())), "reason": str(e.get("msg", ""))[:MAX_DETAIL],
                   "type": str(e.get("type", ""))[:50]} for e in exc.errors()[:MAX_ERRORS]]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %s", type(exc).__name__, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    async def offload(fn: Any, *args: Any) -> Any:
        """Run `fn` in the service's pool (off the event loop); 503 when too many requests are in it."""
        if service.in_flight >= service.max_pending:
            raise HTTPException(503, "busy: too many requests in flight", headers={"Retry-After": "1"})
        service.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(service.pool, fn, *args)
        except Refused as e:
            raise HTTPException(e.status, e.reason) from None
        finally:
            service.in_flight -= 1

    # the body models are made at run time: their annotations are set on the functions (this module's
    # `from __future__ import annotations` would leave FastAPI a string it cannot resolve)
    async def score(tx) -> dict:
        return await offload(service.score, tx.model_dump())

    async def score_batch(batch) -> dict:
        txs = [t.model_dump() for t in batch.transactions]
        out = []
        for i in range(0, len(txs), BATCH_CHUNK):
            out += await offload(service.score_many, txs[i:i + BATCH_CHUNK])
        return {"results": out}

    async def feedback(fb) -> dict:
        if not await offload(service.feedback, fb.user_id, fb.event_seq, fb.label):
            raise HTTPException(404, f"no event {fb.event_seq} of user {echo(fb.user_id)} with a merchant")
        return {"ok": True}

    for fn, arg, model, path in ((score, "tx", Tx, "/score"), (score_batch, "batch", Batch, "/score/batch"),
                                 (feedback, "fb", Feedback, "/feedback")):
        fn.__annotations__ = {arg: model, "return": dict}
        app.post(path, summary=fn.__name__.replace("_", " "))(fn)

    @app.get("/users/{user_id}/state")
    async def user_state(user_id: str) -> dict:
        if not valid_user_id(user_id):
            return JSONResponse({"detail": [{"field": "user_id", "reason": "1..128 characters, no control "
                                             "characters", "type": "value_error"}]}, status_code=422)
        try:
            return await offload(service.user_view, user_id)
        except KeyError:
            raise HTTPException(404, f"unknown user {echo(user_id)}") from None

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_version": service.scorer.model_version,
                "refresh_worker": service.refresher.is_alive(), "queue": len(service.refresher.pending)}

    @app.get("/stats")
    def stats(reset: bool = False) -> dict:
        return service.stats(reset)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        from prometheus_client import generate_latest

        service.metrics.queue.set(len(service.refresher.pending))
        return generate_latest(service.metrics.registry).decode()

    return app
