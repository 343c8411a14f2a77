"""Bad input gets a 400 naming the field, the limit and the value, and creates nothing.

Limits are tested below, at and above. "At" goes through the serializer only (it would
otherwise run a generation); "below" and "above" go through the API and check that no
row was created.
"""

from __future__ import annotations

import base64

import pytest

from api.models import Generation
from api.serializers import Img2ImgRequestSerializer, Txt2ImgRequestSerializer
from tests.conftest import png_of

pytestmark = pytest.mark.django_db


def reject(api, body, field, *fragments, path="/api/txt2img/", fmt="json"):
    r = api.post(path, body, format=fmt)
    assert r.status_code == 400, r.content
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["fields"], error
    message = " ".join(error["fields"][field])
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert error["message"]
    assert Generation.objects.count() == 0
    return error


def accept(body, serializer=Txt2ImgRequestSerializer):
    s = serializer(data=body)
    assert s.is_valid(), s.errors
    return s.validated_data["resolved"]


@pytest.mark.parametrize("field", ["width", "height"])
def test_size_bounds_and_multiple_of_8(api, field, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_SIZE": 256}
    reject(api, {"prompt": "x", field: 56}, field, "multiple of 8 between 64 and 256", "got 56")
    assert getattr(accept({"prompt": "x", field: 64}), field) == 64
    assert getattr(accept({"prompt": "x", field: 256}), field) == 256
    reject(api, {"prompt": "x", field: 264}, field, "got 264")
    reject(api, {"prompt": "x", field: 65}, field, "multiple of 8", "got 65")
    reject(api, {"prompt": "x", field: 64.5}, field)
    reject(api, {"prompt": "x", field: "big"}, field)


def test_steps_bounds(api, settings):
    cap = settings.GENERATION_LIMITS["MAX_STEPS"]
    reject(api, {"prompt": "x", "steps": 0}, "steps", f"between 1 and {cap}", "got 0")
    assert accept({"prompt": "x", "steps": 1}).steps == 1
    assert accept({"prompt": "x", "steps": cap}).steps == cap
    reject(api, {"prompt": "x", "steps": cap + 1}, "steps", f"got {cap + 1}")


def test_num_images_bounds(api, settings):
    cap = settings.GENERATION_LIMITS["MAX_NUM_IMAGES"]
    reject(api, {"prompt": "x", "num_images": 0}, "num_images", f"between 1 and {cap}", "got 0")
    assert accept({"prompt": "x", "num_images": cap}).num_images == cap
    reject(api, {"prompt": "x", "num_images": cap + 1}, "num_images", f"got {cap + 1}")


def test_prompt_required_not_blank_and_capped(api, settings):
    reject(api, {"width": 64}, "prompt", "required")
    reject(api, {"prompt": ""}, "prompt")
    reject(api, {"prompt": "   "}, "prompt", "blank")
    cap = settings.GENERATION_LIMITS["MAX_PROMPT_CHARS"]
    assert accept({"prompt": "a" * cap}).prompt == "a" * cap
    reject(api, {"prompt": "a" * (cap + 1)}, "prompt", f"at most {cap} characters", f"got {cap + 1}")


def test_unknown_model_lists_valid_ids(api):
    error = reject(
        api,
        {"prompt": "x", "model_id": "../../etc/passwd"},
        "model_id",
        "tiny-sd",
        "tiny-sdxl",
        "stable-diffusion-v1-5",
    )
    assert "etc/passwd" in error["fields"]["model_id"][0]


def test_seed_range(api):
    reject(api, {"prompt": "x", "seed": -2}, "seed", "between 0 and 4294967295", "got -2")
    assert accept({"prompt": "x", "seed": 0}).seed == 0
    assert accept({"prompt": "x", "seed": 2**32 - 1}).seed == 2**32 - 1
    reject(api, {"prompt": "x", "seed": 2**32}, "seed", f"got {2**32}")


def test_guidance_scale_must_be_finite_and_in_range(api, settings):
    hi = settings.GENERATION_LIMITS["MAX_GUIDANCE"]
    for bad in ("NaN", "Infinity", "-Infinity"):
        reject(api, {"prompt": "x", "guidance_scale": bad}, "guidance_scale")
    reject(api, {"prompt": "x", "guidance_scale": -0.5}, "guidance_scale", "got -0.5")
    assert accept({"prompt": "x", "guidance_scale": hi}).guidance_scale == hi
    reject(api, {"prompt": "x", "guidance_scale": hi + 0.5}, "guidance_scale", f"got {hi + 0.5}")


def test_unknown_scheduler_lists_supported_ones(api):
    reject(api, {"prompt": "x", "scheduler": "magic"}, "scheduler", "ddim", "euler_a", "dpmpp_2m", "got 'magic'")


def test_unknown_fields_are_refused_not_ignored(api):
    reject(api, {"prompt": "x", "sampler": "ddim"}, "sampler", "unknown field")


def test_total_work_cap(api, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_TOTAL_WORK": 64 * 64 * 2 * 4}
    assert accept({"prompt": "x", "num_images": 2, "steps": 4}).num_images == 2
    reject(api, {"prompt": "x", "num_images": 2, "steps": 5}, "non_field_errors", "at most 32768", "64x64x2x5 = 40960")


def test_body_that_is_not_json_gets_the_error_shape(api):
    r = api.post("/api/txt2img/", data="{not json", content_type="application/json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "parse_error"
    r = api.post("/api/txt2img/", data="[1, 2]", content_type="application/json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"
    assert Generation.objects.count() == 0


# --- img2img inputs --------------------------------------------------------------------------


def test_img2img_without_image(api):
    reject(api, {"prompt": "x"}, "image", "required", path="/api/img2img/")


def test_img2img_broken_image(api):
    reject(
        api,
        {"prompt": "x", "image": base64.b64encode(b"not an image at all").decode()},
        "image",
        "not a PNG, JPEG or WebP",
        path="/api/img2img/",
    )
    truncated = png_of()[:60]
    reject(api, {"prompt": "x", "image": base64.b64encode(truncated).decode()}, "image", path="/api/img2img/")


def test_img2img_bad_base64(api):
    reject(api, {"prompt": "x", "image": "@@@not-base64@@@"}, "image", "not valid base64", path="/api/img2img/")
    reject(api, {"prompt": "x", "image": "data:image/png;base64"}, "image", path="/api/img2img/")


def test_img2img_file_that_is_not_an_image(api):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("cat.png", b"GIF89a fake", content_type="image/png")
    reject(
        api, {"prompt": "x", "image": upload}, "image", "not a PNG, JPEG or WebP", path="/api/img2img/", fmt="multipart"
    )


def test_img2img_strength_bounds(api):
    image = base64.b64encode(png_of()).decode()
    reject(api, {"prompt": "x", "image": image, "strength": 0}, "strength", "(0, 1]", "got 0", path="/api/img2img/")
    assert accept({"prompt": "x", "image": image, "strength": 1.0}, Img2ImgRequestSerializer).strength == 1.0
    reject(api, {"prompt": "x", "image": image, "strength": 1.01}, "strength", "got 1.01", path="/api/img2img/")
    # steps x strength below one step would run no denoising at all.
    reject(
        api,
        {"prompt": "x", "image": image, "strength": 0.1, "steps": 4},
        "strength",
        "at least 1",
        path="/api/img2img/",
    )


def test_img2img_pixel_cap_checked_before_decoding(api, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_UPLOAD_PIXELS": 64 * 64}
    assert accept({"prompt": "x", "image": base64.b64encode(png_of(size=(64, 64))).decode()}, Img2ImgRequestSerializer)
    reject(
        api,
        {"prompt": "x", "image": base64.b64encode(png_of(size=(64, 65))).decode()},
        "image",
        "at most 4096 pixels",
        "64x65",
        path="/api/img2img/",
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height; the pixel data is a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width * 3 + 1) * 2)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(50000, 50000), (5000, 5000)])
def test_decompression_bomb_is_refused_from_the_header_with_bounded_memory(api, size):
    import tracemalloc

    bomb = _png_header_only(*size)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        reject(api, {"prompt": "x", "image": base64.b64encode(bomb).decode()}, "image", "pixels", path="/api/img2img/")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding 5000x5000 RGB alone would take 75 MB.
    assert peak < 20 * 1024 * 1024, peak


def test_huge_and_non_finite_json_numbers(api):
    r = api.post("/api/txt2img/", data='{"prompt": "x", "guidance_scale": 1e400}', content_type="application/json")
    assert r.status_code == 400
    assert "finite" in r.json()["error"]["fields"]["guidance_scale"][0]
    r = api.post("/api/txt2img/", data='{"prompt": "x", "guidance_scale": NaN}', content_type="application/json")
    assert r.status_code == 400 and r.json()["error"]["code"] in ("parse_error", "invalid_request")
    r = api.post("/api/txt2img/", data='{"prompt": "x", "steps": 1e400}', content_type="application/json")
    assert r.status_code == 400
    assert Generation.objects.count() == 0


def test_prompt_with_nul_is_refused(api):
    reject(api, {"prompt": "a\x00b"}, "prompt")


def test_upload_byte_cap_below_at_above(api, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    raw = png_of(size=(64, 64))
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_UPLOAD_BYTES": len(raw)}
    at = Img2ImgRequestSerializer(data={"prompt": "x", "image": base64.b64encode(raw).decode()})
    assert at.is_valid(), at.errors
    padded = raw + b"\x00"  # trailing bytes after IEND: one over the cap
    reject(
        api,
        {"prompt": "x", "image": base64.b64encode(padded).decode()},
        "image",
        f"at most {len(raw)} bytes",
        path="/api/img2img/",
    )
    upload = SimpleUploadedFile("big.png", padded, content_type="image/png")
    reject(
        api,
        {"prompt": "x", "image": upload},
        "image",
        f"at most {len(raw)} bytes",
        f"got {len(raw) + 1}",
        path="/api/img2img/",
        fmt="multipart",
    )


def test_real_gif_and_bmp_are_refused_by_content_whatever_the_name(api):
    import io as _io

    from django.core.files.uploadedfile import SimpleUploadedFile
    from PIL import Image as _Image

    for fmt in ("GIF", "BMP"):
        buf = _io.BytesIO()
        _Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format=fmt)
        upload = SimpleUploadedFile("photo.png", buf.getvalue(), content_type="image/png")
        reject(
            api,
            {"prompt": "x", "image": upload},
            "image",
            "not a PNG, JPEG or WebP",
            path="/api/img2img/",
            fmt="multipart",
        )


def test_a_model_default_size_over_the_operator_cap_is_refused(api, settings):
    settings.GENERATION_LIMITS = {**settings.GENERATION_LIMITS, "MAX_SIZE": 512}
    # sdxl-base-1.0 defaults to 1024: over the cap even though the client sent no size.
    error = reject(
        api,
        {"prompt": "x", "model_id": "sdxl-base-1.0"},
        "width",
        "between 64 and 512",
        "got 1024",
        "default size of sdxl-base-1.0",
    )
    # Both sides default to 1024: both are named, so one correction is enough.
    assert set(error["fields"]) == {"width", "height"}
    height = " ".join(error["fields"]["height"])
    assert "between 64 and 512" in height and "got 1024" in height and "ask for a smaller height" in height
    # A size given for one side: only the defaulted side is refused.
    error = reject(api, {"prompt": "x", "model_id": "sdxl-base-1.0", "width": 512}, "height", "got 1024")
    assert set(error["fields"]) == {"height"}
    assert accept({"prompt": "x", "model_id": "sdxl-base-1.0", "width": 512, "height": 512}).width == 512
    assert accept({"prompt": "x", "model_id": "stable-diffusion-v1-5"}).width == 512


def test_too_many_form_fields_is_a_400_not_a_500(api, settings):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 5
    r = api.post("/api/img2img/", {f"f{i}": "x" for i in range(10)}, format="multipart")
    assert r.status_code == 400
    assert r.json()["error"]["code"] in ("bad_request", "invalid_request")
    assert Generation.objects.count() == 0


def test_exif_orientation_is_applied_to_uploads():
    import io as _io

    from PIL import Image as _Image

    from api.images import open_image

    img = _Image.new("RGB", (80, 64), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    opened = open_image(buf.getvalue(), max_bytes=10**6, max_pixels=10**6)
    assert opened.size == (64, 80)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/txt2img/", "/v1/images/generations", "/sdapi/v1/txt2img", "/models/tiny-sd"])
def test_a_body_nested_thousands_deep_is_a_400_in_the_protocols_shape_and_creates_nothing(path, api):
    from api.models import Generation

    body = '{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "inputs": "x"}'
    r = api.post(path, body, content_type="application/json")
    # A1111 answers a body it can't parse as FastAPI does (422); the others 400.
    assert r.status_code == (422 if path.startswith("/sdapi/") else 400), (r.status_code, r.content[:300])
    # Each protocol's own error shape, naming the cause.
    data = r.json()
    if path.startswith("/v1/"):
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["type"] == "invalid_request_error" and "nested too deeply" in data["error"]["message"]
    elif path.startswith("/sdapi/"):
        assert data["detail"][0]["loc"] == ["body"] and "nested too deeply" in data["detail"][0]["msg"]
    elif path.startswith("/models/"):
        assert data == {"error": "the request body is not valid JSON", "error_type": "validation"}
    else:
        assert data == {"error": {"code": "parse_error", "message": "JSON parse error - the body is nested too deeply"}}
    assert Generation.objects.count() == 0
