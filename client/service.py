"""HTTP service (FastAPI): recommendations, health, and checkpoint reload with an atomic swap."""

from __future__ import annotations

import threading
from collections.abc import Callable

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from .serving import Recommender, Request, RequestError


class RecommendRequest(BaseModel):
    """A recommendation request. Give exactly one of user_id, history or history_texts."""

    model_config = ConfigDict(extra="forbid")
    scenario: str = Field(description="scenario whose catalog to rank, e.g. 'video'")
    user_id: str | None = Field(None, description="a user of this scenario; the history comes from its log")
    history: list[str] | None = Field(None, description="item ids of this scenario, oldest first")
    history_texts: list[str] | None = Field(
        None, description="free item texts, oldest first (e.g. a news reader's articles to recommend videos)"
    )
    k: int = Field(10, description="how many items to return (1 .. serve.max-k)")
    weights: dict[str, float] | None = Field(None, description="objective -> weight; default: serve.weights")
    diversity: float | None = Field(None, description="MMR lambda in [0, 1]; 0 = plain top-k; default serve.diversity")
    exclude_seen: bool = Field(False, description="leave out items of the given history")


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
    checkpoint: str = Field(description="checkpoint folder or run folder (its latest round)")


class Health(BaseModel):
    status: str
    checkpoint: str
    scenarios: list[str]


def create_app(recommender: Recommender, load: Callable[[str], Recommender]) -> FastAPI:
    """The service around a loaded recommender; ``load(path)`` builds a replacement for /reload."""
    app = FastAPI(title="crossrec", description="Recommendations from a federated crossrec checkpoint.")
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

    @app.post("/reload", responses={400: {"description": "the checkpoint cannot be loaded"}})
    def reload(body: ReloadRequest) -> Health:
        with reload_lock:
            try:
                new = load(body.checkpoint)
            except (ValueError, OSError) as exc:
                raise HTTPException(status_code=400, detail=f"checkpoint not loaded: {exc}") from None
            current["rec"] = new  # atomic swap: requests in flight keep the old one
        return health()

    return app
