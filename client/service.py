"""HTTP service (FastAPI): recommendations, health, and checkpoint reload with an atomic swap."""

from __future__ import annotations

import hmac
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, cast

from fastapi import FastAPI, Header, HTTPException
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .serving import Recommender, Request, RequestError

MAX_BODY = 1_000_000  # bytes of a request body
MAX_TEXT = 2_000  # characters of one id or text
MAX_LIST = 200  # items in a history, or history texts
MAX_WEIGHT = 1e6  # largest objective weight (float32 arithmetic stays finite)

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


class RecommendResponse(BaseModel):
    scenario: str
    checkpoint: str = Field(description="hash of the checkpoint weights that answered")
    items: list[RecommendedItem]


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


def create_app(
    recommender: Recommender,
    load: Callable[[str], Recommender],
    reload_root: Path | None = None,
    reload_token: str | None = None,
) -> FastAPI:
    """The service around a loaded recommender; ``load(path)`` builds a replacement for /reload, which is
    off unless ``reload_root`` is given: then it needs ``Authorization: Bearer <reload_token>``, loads only
    checkpoints under ``reload_root``, and swaps only a checkpoint that passes :func:`smoke_problem`."""
    if reload_root is not None and not reload_token:
        raise ValueError("reloading needs a token: set CROSSREC_RELOAD_TOKEN")
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
        try:
            items = rec.recommend(Request(**body.model_dump()))
        except RequestError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return RecommendResponse(
            scenario=body.scenario,
            checkpoint=rec.checkpoint_id,
            items=[RecommendedItem(**i) for i in items],  # type: ignore[arg-type]
        )

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
            current["rec"] = new  # atomic swap: requests in flight keep the old one
        return health()

    return app
