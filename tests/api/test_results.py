"""GET/DELETE /api/results/: pagination, newest first, one generation, deletion."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from api.models import Generation
from tests.conftest import media_path


def make_rows(n: int) -> list[Generation]:
    now = timezone.now()
    rows = [
        Generation(
            id=uuid.uuid4(),
            kind="txt2img",
            model_id="tiny-sd",
            seed=i,
            status="succeeded",
            params={"prompt": f"p{i}"},
            created_at=now,
        )
        for i in range(n)
    ]
    Generation.objects.bulk_create(rows)
    # auto_now_add ignores explicit values: space the timestamps out afterwards.
    for i, row in enumerate(rows):
        Generation.objects.filter(pk=row.pk).update(created_at=now - timedelta(seconds=n - i))
    return rows


@pytest.mark.django_db
def test_pagination_defaults_to_20_newest_first(api):
    make_rows(25)
    page1 = api.get("/api/results/").json()
    assert page1["count"] == 25
    assert len(page1["results"]) == 20
    assert page1["previous"] is None and "page=2" in page1["next"]
    seeds = [g["seed"] for g in page1["results"]]
    assert seeds == list(range(24, 4, -1))  # newest (highest index) first
    page2 = api.get("/api/results/?page=2").json()
    assert [g["seed"] for g in page2["results"]] == [4, 3, 2, 1, 0]
    assert page2["next"] is None and page2["previous"]


@pytest.mark.django_db
def test_page_size_is_honoured_and_capped_at_100(api):
    make_rows(105)
    assert len(api.get("/api/results/?page_size=5").json()["results"]) == 5
    assert len(api.get("/api/results/?page_size=100").json()["results"]) == 100
    assert len(api.get("/api/results/?page_size=101").json()["results"]) == 100
    assert len(api.get("/api/results/?page_size=5000").json()["results"]) == 100


@pytest.mark.django_db
def test_page_out_of_range_is_a_404_in_the_error_shape(api):
    make_rows(3)
    r = api.get("/api/results/?page=9")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.django_db
def test_unknown_and_malformed_ids_are_404(api):
    assert api.get(f"/api/results/{uuid.uuid4()}/").status_code == 404
    r = api.get("/api/results/not-a-uuid/")
    assert r.status_code == 404
    assert api.delete(f"/api/results/{uuid.uuid4()}/").status_code == 404


@pytest.mark.usefixtures("live_db")
def test_get_one_and_delete_removes_row_and_files(api):
    body = api.post("/api/txt2img/", {"prompt": "x", "seed": 8, "num_images": 2}, format="json").json()
    got = api.get(f"/api/results/{body['id']}/").json()
    assert got["id"] == body["id"] and got["status"] == "succeeded"
    assert [i["url"] for i in got["images"]] == [i["url"] for i in body["images"]]
    listed = api.get("/api/results/").json()
    assert listed["results"][0]["id"] == body["id"]
    files = [media_path(i["url"]) for i in body["images"]]
    assert all(f.exists() for f in files)
    assert api.delete(f"/api/results/{body['id']}/").status_code == 204
    assert not any(f.exists() for f in files)
    assert not files[0].parent.exists()
    assert api.get(f"/api/results/{body['id']}/").status_code == 404
    assert not Generation.objects.filter(pk=body["id"]).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.5"])
def test_bad_page_size_is_a_400_naming_it(api, bad):
    make_rows(2)
    r = api.get(f"/api/results/?page_size={bad}")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert "page_size" in error["fields"] and repr(bad) in error["fields"]["page_size"][0]
    assert len(api.get("/api/results/?page_size=1").json()["results"]) == 1
