"""The HTTP service on a real uvicorn server on 127.0.0.1, started and stopped by the tests."""

import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from client.serving import Recommender, Request, cache_name
from simulations.serving_cli import running_service

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def service(tmp_path_factory, service_cfg, demo_dir, random_checkpoint):
    cfg = service_cfg
    root = tmp_path_factory.mktemp("serve")
    first, second = random_checkpoint(cfg, root / "a", 1), random_checkpoint(cfg, root / "b", 2)
    data = [demo_dir / "video", demo_dir / "news"]
    with running_service(first, data, root / "cache", 120, reload_root=root, reload_token=TOKEN) as url:
        yield {"url": url, "first": first, "second": second, "cfg": cfg, "root": root}


TOKEN = "a-test-token"


def post(service, body, path="/recommend", token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(service["url"] + path, json=body, timeout=30, headers=headers)


def test_health_and_openapi(service):
    health = httpx.get(service["url"] + "/health").json()
    assert health["status"] == "ok" and health["scenarios"] == ["news", "video"]
    schema = httpx.get(service["url"] + "/openapi.json").json()
    fields = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert {"scenario", "user_id", "history", "history_texts", "k", "weights", "diversity", "exclude_seen"} <= set(
        fields
    )
    assert "RecommendedItem" in schema["components"]["schemas"]


def test_happy_paths(service):
    by_user = post(service, {"scenario": "video", "user_id": "video-user-0001", "k": 5}).json()
    assert len(by_user["items"]) == 5 and by_user["checkpoint"]
    item = by_user["items"][0]
    assert set(item) == {"item_id", "text", "score", "objectives", "expected", "propensity", "explored"}
    assert by_user["policy"] == "greedy" and by_user["arm"] == "A" and len(by_user["request_id"]) == 32
    assert all(i["propensity"] == 1.0 and not i["explored"] for i in by_user["items"])  # greedy: deterministic
    assert set(item["objectives"]) == {"engagement", "satisfaction"}
    scores = [i["score"] for i in by_user["items"]]
    assert scores == sorted(scores, reverse=True)  # diversity 0: plain top-k

    history = ["video-0001", "video-0002", "video-0003"]
    seen = post(service, {"scenario": "video", "history": history, "k": 50, "exclude_seen": True}).json()
    assert not {i["item_id"] for i in seen["items"]} & set(history)

    cross = post(
        service, {"scenario": "video", "history_texts": ["news story: weekly report on derby stadium"], "k": 3}
    )
    assert cross.status_code == 200 and all(i["item_id"].startswith("video-") for i in cross.json()["items"])

    weighted = post(
        service,
        {
            "scenario": "video",
            "user_id": "video-user-0001",
            "k": 10,
            "weights": {"satisfaction": 1.0},
            "diversity": 0.5,
        },
    )
    assert weighted.status_code == 200 and len(weighted.json()["items"]) == 10


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"scenario": "books", "user_id": "x"}, 400, "unknown scenario 'books'"),
        ({"scenario": "video", "history": ["nope"]}, 400, "unknown item ids ['nope']"),
        ({"scenario": "video", "user_id": "ghost"}, 400, "user_id 'ghost' has no history"),
        ({"scenario": "video", "history": []}, 400, "history is empty"),
        ({"scenario": "video", "history_texts": [""]}, 400, "non-empty strings"),
        ({"scenario": "video"}, 400, "exactly one of"),
        ({"scenario": "video", "user_id": "video-user-0001", "history": ["video-0001"]}, 400, "exactly one of"),
        ({"scenario": "video", "user_id": "video-user-0001", "k": 0}, 400, "k must be between 1 and 100"),
        ({"scenario": "video", "user_id": "video-user-0001", "k": 101}, 400, "k must be between 1 and 100"),
        ({"scenario": "video", "user_id": "video-user-0001", "weights": {"engagement": 0}}, 400, "summing to > 0"),
        (
            {"scenario": "video", "user_id": "video-user-0001", "weights": {"engagement": -1, "satisfaction": 2}},
            400,
            "non-negative",
        ),
        ({"scenario": "video", "user_id": "video-user-0001", "weights": {"clicks": 1}}, 400, "unknown objectives"),
        ({"scenario": "video", "user_id": "video-user-0001", "diversity": 2}, 400, "diversity must be in [0, 1]"),
        ({"scenario": "video", "user_id": "video-user-0001", "k": "ten"}, 422, "k"),
        ({"scenario": "video", "user_id": "video-user-0001", "colour": "red"}, 422, "colour"),
        ({"user_id": "video-user-0001"}, 422, "scenario"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(service, body, status, message):
    response = post(service, body)
    assert response.status_code == status, response.text
    assert message in response.text


def test_malformed_json_and_nan_weights(service):
    bad = httpx.post(service["url"] + "/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422
    nan = httpx.post(
        service["url"] + "/recommend",
        headers={"content-type": "application/json"},
        content=b'{"scenario": "video", "user_id": "video-user-0001", "weights": {"engagement": NaN}}',
    )
    assert nan.status_code in (400, 422)
    missing = post(service, {"checkpoint": str(service["root"] / "does-not-exist")}, path="/reload")
    assert missing.status_code == 400 and "checkpoint not loaded" in missing.text


def test_reload_during_requests_drops_nothing(service):
    statuses, ids = [], set()
    stop = threading.Event()

    def hammer():
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(service["url"] + "/recommend", json={"scenario": "news", "user_id": "news-user-0002"})
                statuses.append(r.status_code)
                ids.add(r.json().get("checkpoint"))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    swapped = post(service, {"checkpoint": str(service["second"])}, path="/reload")
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert swapped.status_code == 200
    assert statuses and all(s == 200 for s in statuses)
    assert len(ids) == 2 and swapped.json()["checkpoint"] in ids  # answered by both models, never failed


def test_item_vectors_are_cached_by_checkpoint_and_catalog(service, demo_dir):
    cache = service["root"] / "cache"
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) >= 2  # one per (checkpoint, catalog) served so far
    rec = Recommender(service["first"], [demo_dir / "video"], cache)
    key = cache / cache_name(rec.checkpoint_id, rec.catalogs["video"].scenario.texts)
    assert key in files
    assert torch.equal(load_file(str(key))["table"].clone(), rec.catalogs["video"].table)  # served = cached
    key.write_bytes(b"corrupted")  # a damaged cache entry is recomputed, not fatal
    again = Recommender(service["first"], [demo_dir / "video"], cache)
    assert torch.allclose(again.catalogs["video"].table, rec.catalogs["video"].table)


def test_objective_weights_reproduce_single_objective_rankings(service, demo_dir):
    rec = Recommender(service["first"], [demo_dir / "video"], service["root"] / "cache")
    catalog = rec.catalogs["video"]
    user, _ = rec._user(Request(scenario="video", user_id="video-user-0004"), catalog)
    probs = torch.sigmoid(catalog.model.head.fast_scores(user, catalog.table, catalog.features)[0])
    reference = torch.sigmoid(catalog.model(user, catalog.table)[0])  # the training-path head
    torch.testing.assert_close(probs, reference, atol=1e-5, rtol=1e-5)
    for k, weights in enumerate(({"engagement": 1.0, "satisfaction": 0.0}, {"engagement": 0.0, "satisfaction": 1.0})):
        got = rec.recommend(Request(scenario="video", user_id="video-user-0004", k=20, weights=weights))
        expected = torch.argsort(probs[:, k], descending=True)[:20].tolist()
        assert [catalog.index[i["item_id"]] for i in got] == expected


def test_reload_fails_closed_and_the_old_model_keeps_serving(service, tmp_path):
    """Unauthenticated, outside the root, corrupt, without config, non-finite, x1e30: each refused with a
    4xx naming why; the serving model never changes."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    before = httpx.get(service["url"] + "/health").json()["checkpoint"]
    root, good = service["root"], service["second"]

    def variant(name, change):
        folder = root / "attacks" / name
        shutil.copytree(good, folder)
        change(folder)
        return str(folder)

    def truncate(folder):
        data = (folder / "weights.safetensors").read_bytes()
        (folder / "weights.safetensors").write_bytes(data[: len(data) // 2])

    def scale(by):
        def change(folder):
            weights = load_np(str(folder / "weights.safetensors"))
            save_np({k: (v * by).astype(np.float32) for k, v in weights.items()}, str(folder / "weights.safetensors"))

        return change

    def no_config(folder):
        meta = json.loads((folder / "meta.json").read_text())
        del meta["config"]
        (folder / "meta.json").write_text(json.dumps(meta))

    outside = tmp_path / "elsewhere"
    shutil.copytree(good, outside)
    cases = [
        (post(service, {"checkpoint": str(good)}, path="/reload", token=None), 401, "Authorization: Bearer"),
        (post(service, {"checkpoint": str(good)}, path="/reload", token="wrong"), 401, "Authorization: Bearer"),
        (post(service, {"checkpoint": str(outside)}, path="/reload"), 403, "outside the reload root"),
        (post(service, {"checkpoint": str(root / "a/../../..")}, path="/reload"), 403, "outside the reload root"),
        (post(service, {"checkpoint": variant("truncated", truncate)}, path="/reload"), 400, "unreadable"),
        (post(service, {"checkpoint": variant("no-config", no_config)}, path="/reload"), 400, "no config"),
        (post(service, {"checkpoint": variant("huge", scale(1e30))}, path="/reload"), 400, "weights' norm"),
        (post(service, {"checkpoint": variant("inf", scale(1e39))}, path="/reload"), 400, "non-finite"),
    ]
    for response, status, message in cases:
        assert response.status_code == status and message in response.json()["detail"], response.text
    assert httpx.get(service["url"] + "/health").json()["checkpoint"] == before
    ok = post(service, {"scenario": "video", "user_id": "video-user-0001"})
    assert ok.status_code == 200 and len(ok.json()["items"]) == 10 and ok.json()["checkpoint"] == before


def test_request_limits_and_text_edges_get_4xx(service):
    """Oversized bodies 413; lone surrogates, NUL, overlong texts, too many texts, overflowing or NaN
    weights 422; the service answers normally afterwards."""
    url = service["url"] + "/recommend"
    user = {"scenario": "video", "user_id": "video-user-0001"}
    big = b'{"scenario": "video", "history_texts": ["' + b"x" * 1_100_000 + b'"]}'
    assert httpx.post(url, content=big, headers={"content-type": "application/json"}).status_code == 413
    raw = [
        b'{"scenario": "video", "history_texts": ["\\ud800 lone surrogate"]}',
        b'{"scenario": "video", "user_id": "video-user-0001", "weights": {"engagement": 1e39}}',
        b'{"scenario": "video", "user_id": "video-user-0001", "weights": {"engagement": Infinity}}',
    ]
    for content in raw:
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 422, (content, response.text)
    bodies = [
        {"scenario": "video", "history_texts": ["nul \x00 inside"]},
        {"scenario": "video", "history_texts": ["x" * 2_001]},
        {"scenario": "video", "history_texts": ["news story"] * 201},
        {**user, "scenario": "v" * 2_001},
    ]
    for body in bodies:
        assert post(service, body).status_code == 422, body
    tiny = post(service, {**user, "weights": {"engagement": 1e-46, "satisfaction": 1.0}})
    assert tiny.status_code == 200 and len(tiny.json()["items"]) == 10
    alone = post(service, {**user, "weights": {"engagement": 1e-46}})  # would underflow in float32
    assert alone.status_code == 200 and alone.json()["items"] == post(service, user).json()["items"]
    assert post(service, user).status_code == 200
