"""HTTP service (FastAPI): recommendations, health, and checkpoint reload with an atomic swap."""

from __future__ import annotations

import hashlib
import hmac
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, cast

from fastapi import FastAPI, Header, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .feedback import Event, FeedbackConflict, FeedbackStore, Outcome, Shown
from .serving import Recommender, Request, RequestError

MAX_BODY = 1_000_000  # bytes of a request body
MAX_TEXT = 2_000  # characters of one id or text
MAX_LIST = 200  # items in a history, or history texts
MAX_WEIGHT = 1e6  # largest objective weight (float32 arithmetic stays finite)
MAX_EVENTS = 1_000  # feedback events in one batch

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]


def plain_text(value: str) -> str:
    """A string that encodes as UTF-8 and holds no NUL (a lone surrogate or NUL reaches no tokenizer)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    if "\0" in value:
        raise ValueError("must not contain NUL characters")
    return value


class RecommendRequest(BaseModel):
    """A recommendation request. Give exactly one of user_id, history or history_texts."""

    model_config = ConfigDict(extra="forbid")
    scenario: Text = Field(description="scenario whose catalog to rank, e.g. 'video'")
    user_id: Text | None = Field(None, description="a user of this scenario; the history comes from its log")
    history: list[Text] | None = Field(None, max_length=MAX_LIST, description="item ids of this scenario, oldest first")
    history_texts: list[Text] | None = Field(
        None,
        max_length=MAX_LIST,
        description="free item texts, oldest first (e.g. a news reader's articles to recommend videos)",
    )
    k: int = Field(10, description="how many items to return (1 .. serve.max-k)")
    weights: dict[Text, float] | None = Field(None, description="objective -> weight; default: serve.weights")
    diversity: float | None = Field(None, description="MMR lambda in [0, 1]; 0 = plain top-k; default serve.diversity")
    exclude_seen: bool = Field(False, description="leave out items of the given history")

    @field_validator("scenario", "user_id")
    @classmethod
    def _plain(cls, value: str | None) -> str | None:
        return None if value is None else plain_text(value)

    @field_validator("history", "history_texts")
    @classmethod
    def _plain_list(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [plain_text(v) for v in value]

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and not all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in value.values()):
            raise ValueError(f"every weight must be a finite number within +-{MAX_WEIGHT:g}")
        return value


class RecommendedItem(BaseModel):
    item_id: str
    text: str
    score: float = Field(description="final utility used for ranking")
    objectives: dict[str, float] = Field(description="probability of each objective")
    expected: float = Field(description="the model's expected reward (weighted objective probabilities)")
    propensity: float = Field(description="probability that the policy puts this item in the list")
    explored: bool = Field(description="the item fills an exploration slot")


class RecommendResponse(BaseModel):
    request_id: str = Field(description="send it back with the list's feedback")
    scenario: str
    checkpoint: str = Field(description="hash of the checkpoint weights that answered")
    policy: str
    arm: str = Field(description="A/B arm: 'A', or 'B' for the share of users in serve.ab-share")
    items: list[RecommendedItem]


class ShownItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Text
    position: int = Field(ge=0, description="0 = top of the list")
    propensity: float = Field(gt=0.0, le=1.0, description="as /recommend returned it")
    expected: float = Field(ge=0.0, le=1.0, description="as /recommend returned it")
    explored: bool = False


class OutcomeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: Text = Field(description="one of the shown items")
    objective: Text = Field(description="one of the scenario's objectives, e.g. 'engagement' for a click")
    value: float = Field(ge=0.0, le=1.0, description="1 for a click or conversion; a rating scaled to [0, 1]")
    time: float = Field(ge=0.0, le=1e11, description="unix seconds")


class FeedbackEvent(BaseModel):
    """One served list and what the user did with it."""

    model_config = ConfigDict(extra="forbid")
    request_id: Text
    scenario: Text
    user_id: Text
    served: float = Field(ge=0.0, le=1e11, description="unix seconds the list was served")
    shown: list[ShownItem] = Field(min_length=1, max_length=MAX_LIST)
    outcomes: list[OutcomeItem] = Field(default_factory=list, max_length=4 * MAX_LIST)
    policy: Text = "greedy"
    arm: Text = "A"
    checkpoint: Text = ""

    @field_validator("request_id", "scenario", "user_id", "policy", "arm", "checkpoint")
    @classmethod
    def _plain(cls, value: str) -> str:
        return plain_text(value)


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[FeedbackEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class FeedbackReceipt(BaseModel):
    stored: int = Field(description="events stored now (on disk when this answer is sent)")
    duplicates: int = Field(description="events already stored with the same content")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(
        description="checkpoint folder, run folder (its round chosen on validation) or adapter export"
    )


class Health(BaseModel):
    status: str
    checkpoint: str
    scenarios: list[str]


class BodyLimit:
    """413 for a request body above ``limit`` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = JSONResponse({"detail": f"request body above {self.limit} bytes"}, status_code=413)
        length = HTTPRequest(scope).headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limit:
            await too_big(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(status_code=413, detail=f"request body above {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def smoke_problem(new: Recommender, current: Recommender) -> str | None:
    """Why a freshly loaded recommender must not replace the serving one (None when it may): its shared
    weights' norm far from the serving model's (a checkpoint scaled by 1e30 is finite but serves nothing),
    or a smoke request per catalog (one item of history) that does not return k items with finite scores."""
    norm_new, norm_old = new.weights_norm(), current.weights_norm()
    if not 0.1 <= norm_new / norm_old <= 10.0:
        return f"its weights' norm {norm_new:.4g} is {norm_new / norm_old:.3g} x the serving model's {norm_old:.4g}"
    for name, catalog in new.catalogs.items():
        k = min(10, catalog.scenario.num_items)
        items = new.recommend(Request(scenario=name, history=[catalog.scenario.item_ids[0]], k=k))
        if len(items) < k or not all(math.isfinite(float(cast(float, i["score"]))) for i in items):
            return f"a smoke request on '{name}' returned {len(items)} of {k} items"
    return None


def arm_of(user_id: str | None, share: float) -> str:
    """A/B arm of a user: 'B' for a stable pseudo-random ``share`` of user ids (a hash), else 'A'; a request
    without a user id is served by arm A."""
    if user_id is None or share <= 0.0:
        return "A"
    draw = int.from_bytes(hashlib.sha256(f"crossrec-ab:{user_id}".encode()).digest()[:8], "big") / 2.0**64
    return "B" if draw < share else "A"


def to_event(body: FeedbackEvent, number: int, rec: Recommender) -> Event:
    """A feedback event checked against the served catalogs (RequestError naming the field otherwise)."""
    where = f"events[{number}]"
    catalog = rec.catalogs.get(body.scenario)
    if catalog is None:
        known = sorted(rec.catalogs)
        raise RequestError(f"{where}.scenario: unknown scenario '{body.scenario}'; the service has {known}")
    shown = {s.item_id for s in body.shown}
    unknown = sorted(i for i in shown if i not in catalog.index)
    if unknown:
        raise RequestError(f"{where}.shown: unknown item ids {unknown[:5]} in scenario '{body.scenario}'")
    if len(shown) != len(body.shown) or len({s.position for s in body.shown}) != len(body.shown):
        raise RequestError(f"{where}.shown: an item id or a position repeats")
    objectives = catalog.scenario.objectives
    seen = set()
    for n, o in enumerate(body.outcomes):
        if o.item_id not in shown:
            raise RequestError(f"{where}.outcomes[{n}].item_id: '{o.item_id}' was not shown in this list")
        if o.objective not in objectives:
            raise RequestError(f"{where}.outcomes[{n}].objective: '{o.objective}' is not one of {list(objectives)}")
        if (o.item_id, o.objective) in seen:
            raise RequestError(f"{where}.outcomes[{n}]: a second outcome for ('{o.item_id}', '{o.objective}')")
        seen.add((o.item_id, o.objective))
    return Event(
        request_id=body.request_id,
        scenario=body.scenario,
        user_id=body.user_id,
        served=body.served,
        shown=tuple(Shown(**s.model_dump()) for s in body.shown),
        outcomes=tuple(Outcome(**o.model_dump()) for o in body.outcomes),
        policy=body.policy,
        arm=body.arm,
        checkpoint=body.checkpoint,
    )


def attach_feedback(rec: Recommender, store: FeedbackStore) -> None:
    """Give every catalog of ``rec`` its items' feedback totals from ``store``."""
    for name, catalog in rec.catalogs.items():
        catalog.stats = store.item_stats(name, catalog.scenario.item_ids)


def create_app(
    recommender: Recommender,
    load: Callable[[str], Recommender],
    reload_root: Path | None = None,
    reload_token: str | None = None,
    feedback: FeedbackStore | None = None,
    arm_b: Recommender | None = None,
) -> FastAPI:
    """The service around a loaded recommender; ``load(path)`` builds a replacement for /reload, which is
    off unless ``reload_root`` is given: then it needs ``Authorization: Bearer <reload_token>``, loads only
    checkpoints under ``reload_root``, and swaps only a checkpoint that passes :func:`smoke_problem`.
    ``feedback``: the store behind POST /feedback and the policies' item statistics. ``arm_b``: the A/B test's
    second model (default: the same model; arm B then differs by serve.ab-policy only)."""
    if reload_root is not None and not reload_token:
        raise ValueError("reloading needs a token: set CROSSREC_RELOAD_TOKEN")
    stats_lock = threading.Lock()  # feedback totals change with the database, one batch at a time
    if feedback is not None:
        for rec in (recommender, arm_b):
            if rec is not None:
                attach_feedback(rec, feedback)
    app = FastAPI(title="crossrec", description="Recommendations from a federated crossrec checkpoint.")
    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field (without echoing the input: a NaN or a huge text is no JSON to send back)."""
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    current = {"rec": recommender}
    reload_lock = threading.Lock()

    @app.get("/health")
    def health() -> Health:
        rec = current["rec"]
        return Health(status="ok", checkpoint=rec.checkpoint_id, scenarios=sorted(rec.catalogs))

    @app.post("/recommend", responses={400: {"description": "a request that cannot be answered as asked"}})
    def recommend(body: RecommendRequest) -> RecommendResponse:
        rec = current["rec"]  # one consistent model for the whole request, even during a reload
        serve = rec.cfg.serve
        arm = arm_of(body.user_id, serve.ab_share)
        policy = serve.policy
        if arm == "B":
            rec, policy = arm_b or rec, serve.ab_policy or serve.policy
        try:
            items = rec.recommend(Request(**body.model_dump()), policy=policy)
        except RequestError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return RecommendResponse(
            request_id=uuid.uuid4().hex,
            scenario=body.scenario,
            checkpoint=rec.checkpoint_id,
            policy=policy,
            arm=arm,
            items=[RecommendedItem(**i) for i in items],  # type: ignore[arg-type]
        )

    @app.post(
        "/feedback",
        responses={
            400: {"description": "an event that does not fit the served catalogs (nothing of the batch stored)"},
            409: {"description": "a request id already stored with other content (nothing of the batch stored)"},
            503: {"description": "feedback is off, or the database could not store the batch"},
        },
    )
    def record_feedback(body: FeedbackBatch) -> FeedbackReceipt:
        if feedback is None:
            raise HTTPException(status_code=503, detail="feedback is off: start the service with serve.feedback-db")
        with stats_lock:
            rec = current["rec"]
            try:
                events = [to_event(e, n, rec) for n, e in enumerate(body.events)]
                weights = rec.reward_weights()
                fresh = feedback.record(events, weights)
            except RequestError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from None
            except FeedbackConflict as exc:
                raise HTTPException(status_code=409, detail=str(exc)) from None
            except sqlite3.Error as exc:
                raise HTTPException(status_code=503, detail=f"feedback not stored: {exc}") from None
            for event in (e for e, new in zip(events, fresh, strict=True) if new):
                for served in (r for r in (rec, arm_b) if r is not None):  # each keeps its own copy of the totals
                    catalog = served.catalogs[event.scenario]
                    assert catalog.stats is not None
                    for s in event.shown:
                        catalog.stats.add(catalog.index[s.item_id], event.reward(s.item_id, weights), s.expected)
        return FeedbackReceipt(stored=sum(fresh), duplicates=len(fresh) - sum(fresh))

    @app.post(
        "/reload",
        responses={
            400: {"description": "the checkpoint cannot be loaded or fails its checks"},
            401: {"description": "no or a wrong token"},
            403: {"description": "reload is off, or the checkpoint is outside the reload root"},
        },
    )
    def reload(body: ReloadRequest, authorization: str | None = Header(None)) -> Health:
        if reload_root is None or reload_token is None:
            raise HTTPException(status_code=403, detail="reload is off (start the service with --reload-root)")
        given = (authorization or "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, reload_token.encode()):
            raise HTTPException(status_code=401, detail="reload needs the header 'Authorization: Bearer <token>'")
        path = Path(body.checkpoint).resolve()
        if not path.is_relative_to(reload_root.resolve()):
            raise HTTPException(status_code=403, detail=f"{body.checkpoint} is outside the reload root")
        with reload_lock:
            try:
                new = load(str(path))
                problem = smoke_problem(new, current["rec"])
            except (ValueError, OSError, RequestError) as exc:
                raise HTTPException(status_code=400, detail=f"checkpoint not loaded: {exc}") from None
            if problem is not None:
                raise HTTPException(status_code=400, detail=f"checkpoint not loaded: {problem}")
            with stats_lock:
                if feedback is not None:
                    attach_feedback(new, feedback)
                current["rec"] = new  # atomic swap: requests in flight keep the old one
        return health()

    return app
