"""`pantherseq serve`: the real-time scoring service (FastAPI) over a store of user states.

    POST /score            one transaction: {"user_id", "timestamp", <the dataset's raw fields>}
                           -> {score, deviation, top_expected, model_version, latency_ms, cold_start, stale,
                               event_seq}
    POST /score/batch      {"transactions": [...]} -> {"results": [...]} (in order; each is also logged)
    POST /feedback         {"user_id", "event_seq", "label"}: a fraud label became known (terminal risk)
    GET  /users/{id}/state what the service holds for a user (readable)
    GET  /health, GET /metrics (Prometheus text), GET /stats (JSON: refresh lag percentiles, queue)
    OpenAPI docs at /docs.

This module is only the HTTP layer: `create_app(service)` over a `Service` (serve/service.py: request
path, event log, refresh worker, metrics), whose scoring is serve/scorer.py and whose request bodies are
serve/schemas.py.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from pantherseq.serve.schemas import Feedback, batch_model, transaction_model
from pantherseq.serve.service import Service


def create_app(service: Service) -> FastAPI:
    Tx = transaction_model(service.scorer.cfg)
    Batch = batch_model(Tx)

    app = FastAPI(title="pantherseq scoring", version=service.scorer.model_version,
                  description="Real-time fraud / deviation scoring from cached PANTHER user states.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body", "reason": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()]
        service.metrics.requests.labels(request.url.path, "422").inc()
        return JSONResponse({"detail": errors}, status_code=422)

    # the body models are made at run time: their annotations are set on the functions (this module's
    # `from __future__ import annotations` would leave FastAPI a string it cannot resolve)
    # `async def`: scoring is ~2 ms of CPU under the GIL, so it runs on the event loop itself; a sync
    # endpoint would hand every request to a worker thread, which cost more than the scoring under load
    async def score(tx) -> dict:
        out = service.score(tx.model_dump())
        service.metrics.requests.labels("/score", "200").inc()
        return out

    async def score_batch(batch) -> dict:
        out = [service.score(t.model_dump()) for t in batch.transactions]
        service.metrics.requests.labels("/score/batch", "200").inc()
        return {"results": out}

    def feedback(fb) -> dict:
        if not service.feedback(fb.user_id, fb.event_seq, fb.label):
            raise HTTPException(404, f"no event {fb.event_seq} of user {fb.user_id!r} with a merchant")
        return {"ok": True}

    for fn, arg, model, path in ((score, "tx", Tx, "/score"), (score_batch, "batch", Batch, "/score/batch"),
                                 (feedback, "fb", Feedback, "/feedback")):
        fn.__annotations__ = {arg: model, "return": dict}
        app.post(path, summary=fn.__name__.replace("_", " "))(fn)

    @app.get("/users/{user_id}/state")
    def user_state(user_id: str) -> dict:
        try:
            return service.user_view(user_id)
        except KeyError:
            raise HTTPException(404, f"unknown user {user_id!r}") from None

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
