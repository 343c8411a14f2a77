"""MEDIA_STORAGE=s3 against a real S3-protocol server on 127.0.0.1 (moto's standalone server):
images and inputs go to the bucket, URLs are presigned or public as the setting says, and
delete removes the objects."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.models import Generation
from tests.conftest import png_of, require_service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server() -> str | None:
    found = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    return found if Path(found).exists() else None


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:  # noqa: ANN001
    binary = _moto_server()
    require_service(binary is not None, "moto_server (pip install 'moto[server]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback test server
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto_server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint, settings) -> str:  # noqa: ANN001
    import boto3

    name = f"sd-{uuid.uuid4().hex[:12]}"
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_endpoint, **creds).create_bucket(Bucket=name)
    settings.AWS_STORAGE_BUCKET_NAME = name
    settings.AWS_S3_ENDPOINT_URL = s3_endpoint
    settings.AWS_ACCESS_KEY_ID = "testing"
    settings.AWS_SECRET_ACCESS_KEY = "testing"
    settings.AWS_S3_REGION_NAME = "us-east-1"
    settings.AWS_QUERYSTRING_AUTH = True
    settings.AWS_S3_FILE_OVERWRITE = True
    settings.AWS_DEFAULT_ACL = None
    settings.AWS_LOCATION = "sdapi"
    settings.MEDIA_STORAGE = "s3"
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage"}}
    return name


def keys(bucket: str, endpoint: str) -> list[str]:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback test server
        return resp.read()


def test_the_storage_layer_saves_reads_lists_and_deletes_in_the_bucket(bucket, s3_endpoint, settings):
    from api import storage

    storage.save("generations/abc/0-1.png", b"one")
    storage.save("generations/abc/1-2.png", b"two")
    storage.save("inputs/abc.png", b"input")
    assert keys(bucket, s3_endpoint) == [
        "sdapi/generations/abc/0-1.png",
        "sdapi/generations/abc/1-2.png",
        "sdapi/inputs/abc.png",
    ]
    assert storage.read("generations/abc/1-2.png") == b"two" and storage.size("inputs/abc.png") == 5
    assert storage.exists("inputs/abc.png") and not storage.exists("inputs/nope.png")
    storage.save("generations/abc/0-1.png", b"again")  # a retried job rewrites its own names
    assert storage.read("generations/abc/0-1.png") == b"again"

    signed = storage.url("generations/abc/0-1.png")
    assert "X-Amz-Signature=" in signed or "Signature=" in signed
    assert fetch(signed) == b"again"
    settings.AWS_QUERYSTRING_AUTH = False
    settings.STORAGES = {**settings.STORAGES}  # a fresh backend with the new setting
    public = storage.url("generations/abc/0-1.png")
    assert "Signature" not in public and public.startswith(s3_endpoint)

    storage.delete_prefix("generations/abc")
    storage.delete("inputs/abc.png")
    assert keys(bucket, s3_endpoint) == []


@pytest.mark.usefixtures("live_db")
def test_generations_keep_their_images_and_inputs_in_the_bucket_and_delete_removes_them(
    bucket, s3_endpoint, api, tiny_model_dirs
):
    r = api.post("/api/txt2img/", {"prompt": "a bucket", "seed": 5, "steps": 2, "num_images": 2}, format="json")
    assert r.status_code == 200, r.content
    body = r.json()
    gid = body["id"]
    pngs = [k for k in keys(bucket, s3_endpoint) if k.endswith(".png")]
    assert pngs[:2] == [f"sdapi/generations/{gid}/0-5.png", f"sdapi/generations/{gid}/1-6.png"]
    png = fetch(body["images"][0]["url"])
    assert png.startswith(b"\x89PNG")
    assert not (Path(os.environ.get("MEDIA_ROOT", "media")) / "generations" / gid).exists()

    import base64

    r = api.post(
        "/api/img2img/",
        {
            "prompt": "from the bucket",
            "seed": 6,
            "steps": 4,
            "strength": 0.5,
            "image": base64.b64encode(png_of()).decode(),
        },
        format="json",
    )
    assert r.status_code == 200, r.content
    img2img = r.json()["id"]
    assert f"sdapi/inputs/{img2img}.png" in keys(bucket, s3_endpoint)

    for g in (gid, img2img):
        assert api.delete(f"/api/results/{g}/").status_code == 204
    assert [k for k in keys(bucket, s3_endpoint) if gid in k or img2img in k] == []
    assert Generation.objects.count() == 0
