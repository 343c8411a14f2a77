"""Each saved image gets a small WebP thumbnail beside its PNG; the resource links it
(``thumbnail_url``), the media route serves it, and deleting the result removes it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from api.images import THUMBNAIL_MAX_SIDE, thumbnail_bytes, thumbnail_name
from tests.api.test_s3_storage import bucket, fetch, keys, s3_endpoint  # noqa: F401 - fixtures
from tests.conftest import media_path


def webp(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "WEBP"
    img.load()
    return img


def test_thumbnail_name_sits_beside_the_png() -> None:
    assert thumbnail_name("generations/abc/0-42.png") == "generations/abc/0-42.thumb.webp"
    assert thumbnail_name("generations/abc/3-7.png") == "generations/abc/3-7.thumb.webp"


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (256, 256)),
        ((768, 512), (256, 171)),  # aspect kept
        ((320, 192), (256, 154)),
        ((100, 1000), (26, 256)),
        ((257, 64), (256, 64)),  # just above the limit: down
        ((256, 256), (256, 256)),  # at the limit: unchanged
        ((64, 64), (64, 64)),  # below: never enlarged
    ],
)
def test_thumbnail_bytes_fits_the_longer_side_in_256_pixels(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert THUMBNAIL_MAX_SIDE == 256
    thumb = webp(thumbnail_bytes(Image.new("RGB", size, (200, 30, 30))))
    assert thumb.size == expected
    r, g, b = thumb.convert("RGB").getpixel((expected[0] // 2, expected[1] // 2))
    assert abs(r - 200) <= 8 and g <= 40 and b <= 40


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_thumbnail_bytes_takes_any_image_mode(mode: str) -> None:
    thumb = webp(thumbnail_bytes(Image.new(mode, (300, 300))))
    assert thumb.size == (256, 256)


def test_a_thumbnail_carries_no_metadata_of_the_png() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a secret prompt")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG", pnginfo=info)
    with Image.open(buf) as png:
        png.load()
        data = thumbnail_bytes(png)
    assert b"secret" not in data
    assert not webp(data).info.get("exif") and not webp(data).info.get("xmp")


@pytest.mark.usefixtures("live_db")
def test_a_generation_saves_a_webp_thumbnail_per_image_that_the_resource_links_and_the_server_serves(api):
    r = api.post(
        "/api/txt2img/",
        {"prompt": "a lighthouse", "seed": 9, "width": 320, "height": 96, "steps": 1, "num_images": 2},
        format="json",
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert [(i["seed"], i["index"]) for i in body["images"]] == [(9, 0), (10, 1)]
    for image in body["images"]:
        png_path = media_path(image["url"])
        assert image["thumbnail_url"] == image["url"].removesuffix(".png") + ".thumb.webp"
        assert image["thumbnail_url"].startswith("http://testserver/media/generations/")
        thumb_path = media_path(image["thumbnail_url"])
        assert (
            thumb_path.parent == png_path.parent and thumb_path.name == f"{image['index']}-{image['seed']}.thumb.webp"
        )
        thumb = webp(thumb_path.read_bytes())
        assert thumb.size == (256, 77)
        assert thumb_path.stat().st_size < png_path.stat().st_size
        # The same picture, smaller: 16x16 blocks of it match the PNG's (tiny-sd paints noise, which
        # lossy WebP doesn't keep pixel for pixel).
        with Image.open(png_path) as png:
            reference = np.asarray(png.convert("RGB").resize((16, 5), Image.Resampling.BOX), dtype=np.int16)
        blocks = np.asarray(thumb.convert("RGB").resize((16, 5), Image.Resampling.BOX), dtype=np.int16)
        assert np.abs(blocks - reference).mean() < 1.5  # about 0.7; another image of the batch: about 3.7

        served = api.get(image["thumbnail_url"].removeprefix("http://testserver"))
        assert served.status_code == 200
        assert served["Content-Type"] == "image/webp"
        assert served["X-Content-Type-Options"] == "nosniff"
        assert b"".join(served.streaming_content) == thumb_path.read_bytes()

    # The same links in the history and on the resource.
    listed = api.get("/api/results/").json()["results"][0]["images"]
    assert [i["thumbnail_url"] for i in listed] == [i["thumbnail_url"] for i in body["images"]]
    one = api.get(f"/api/results/{body['id']}/").json()["images"]
    assert [i["thumbnail_url"] for i in one] == [i["thumbnail_url"] for i in body["images"]]


@pytest.mark.usefixtures("live_db")
def test_an_image_saved_before_thumbnails_existed_has_a_null_thumbnail_url(api):
    r = api.post("/api/txt2img/", {"prompt": "old", "seed": 1, "steps": 1, "num_images": 2}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    media_path(body["images"][1]["thumbnail_url"]).unlink()  # as images written before this feature
    images = api.get(f"/api/results/{body['id']}/").json()["images"]
    assert images[0]["thumbnail_url"].endswith("/0-1.thumb.webp")
    assert images[1]["thumbnail_url"] is None
    assert images[1]["url"] == body["images"][1]["url"]  # the PNG itself is untouched
    assert api.get("/api/results/").json()["results"][0]["images"][1]["thumbnail_url"] is None


@pytest.mark.usefixtures("live_db")
def test_deleting_a_result_removes_its_thumbnails_too(api):
    body = api.post("/api/txt2img/", {"prompt": "gone", "seed": 2, "steps": 1}, format="json").json()
    thumb = media_path(body["images"][0]["thumbnail_url"])
    assert thumb.is_file()
    assert api.delete(f"/api/results/{body['id']}/").status_code == 204
    assert not thumb.exists() and not Path(thumb.parent).exists()


@pytest.mark.usefixtures("live_db")
def test_with_s3_storage_the_thumbnail_goes_to_the_bucket_and_is_linked_there(bucket, s3_endpoint, api):  # noqa: F811
    r = api.post("/api/txt2img/", {"prompt": "a bucket", "seed": 5, "steps": 1}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    gid = body["id"]
    assert f"sdapi/generations/{gid}/0-5.thumb.webp" in keys(bucket, s3_endpoint)
    url = body["images"][0]["thumbnail_url"]
    assert url.startswith(s3_endpoint) and "Signature" in url
    assert webp(fetch(url)).size == (64, 64)
    assert api.delete(f"/api/results/{gid}/").status_code == 204
    assert [k for k in keys(bucket, s3_endpoint) if gid in k] == []
