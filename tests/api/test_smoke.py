import pytest

from api.models import Generation


@pytest.mark.usefixtures("live_db")
def test_txt2img_sync_smoke(api):
    r = api.post("/api/txt2img/", {"prompt": "a cat", "seed": 1}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["status"] == "succeeded"
    assert Generation.objects.count() == 1
