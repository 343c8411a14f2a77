"""Many simultaneous requests over real HTTP, and failures that must not stop the server."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import pytest

from api.models import Generation
from backend.catalog import ModelSpec
from backend.manager import get_manager
from tests.conftest import assert_same_image, media_path


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_eight_simultaneous_requests_all_succeed_one_pipeline_at_a_time(live_server, tiny_model_dirs, monkeypatch):
    from backend.local import LocalBackend

    # Observe (not replace) the pipeline calls: how many run at once, and how many jobs each took.
    real_run_call = LocalBackend._run_call
    active, calls, lock = [0], [], threading.Lock()

    def observed(self, model, pipe, mode, group):  # noqa: ANN001, ANN202
        with lock:
            active[0] += 1
            calls.append((active[0], len(group)))
        try:
            return real_run_call(self, model, pipe, mode, group)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(LocalBackend, "_run_call", observed)
    url = live_server.url + "/api/txt2img/"
    bodies = [
        {"prompt": f"scene {i}", "seed": 1000 + i, "model_id": "tiny-sd" if i % 2 else "tiny-sdxl"} for i in range(8)
    ]
    results: list[tuple[int, dict] | None] = [None] * 8
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        results[i] = post_json(url, bodies[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert all(r is not None and r[0] == 200 for r in results), [r and (r[0], r[1].get("error")) for r in results]
    ids = [r[1]["id"] for r in results]
    assert len(set(ids)) == 8

    # One pipeline call at a time (a call may carry several jobs of one model), every job in one.
    assert max(n for n, _ in calls) == 1
    assert sum(jobs for _, jobs in calls) == 8

    # Each image equals what the same request makes on its own (a shared call within noise).
    for body, (_, got) in zip(bodies, results, strict=True):
        status, alone = post_json(url, body)
        assert status == 200
        assert_same_image(media_path(alone["images"][0]["url"]), media_path(got["images"][0]["url"]))

    # The image URL is served by the running server itself.
    with urllib.request.urlopen(results[0][1]["images"][0]["url"]) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"


@pytest.fixture
def broken_model(tmp_path: Path):
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    manager = get_manager()
    manager.catalog["broken-local"] = ModelSpec(
        id="broken-local",
        name="Broken",
        family="sd15",
        default_size=64,
        source="local",
        path=str(folder),
        default_steps=2,
    )
    yield "broken-local"
    manager.catalog.pop("broken-local", None)


@pytest.mark.usefixtures("live_db")
def test_failed_generation_is_recorded_and_the_server_keeps_serving(api, broken_model):
    r = api.post("/api/txt2img/", {"prompt": "x", "model_id": broken_model, "seed": 1}, format="json")
    assert r.status_code == 503, r.content
    body = r.json()
    assert body["status"] == "failed"
    assert body["error"]["code"] == "model_unavailable"
    assert "broken-local" in body["error"]["message"]
    assert str(Path(get_manager().catalog[broken_model].path)) not in json.dumps(body)
    assert body["images"] == []
    assert Generation.objects.get(pk=body["id"]).status == "failed"
    again = api.post("/api/txt2img/", {"prompt": "x", "seed": 1}, format="json")
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    listed = {g["id"]: g for g in api.get("/api/results/").json()["results"]}
    assert listed[body["id"]]["error"] == {"code": "model_unavailable", "message": body["error"]["message"]}
