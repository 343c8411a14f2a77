"""A1111's paths at the site root. A1111 has no trailing slashes; both forms are accepted, and
so are the doubled leading slashes a base URL ending in "/" makes (Open WebUI)."""

from django.urls import re_path

from . import schema, views  # noqa: F401 - schema: these views' OpenAPI description

_P = r"^(?:/)*sdapi/v1/"  # (?:/)* rather than /*: the same match, without urls.W002


def route(name: str, view, url_name: str):  # noqa: ANN001, ANN201
    return re_path(_P + name + r"/?$", view, name=f"a1111-{url_name}")


urlpatterns = [
    route("txt2img", views.Txt2ImgView.as_view(), "txt2img"),
    route("img2img", views.Img2ImgView.as_view(), "img2img"),
    route("options", views.OptionsView.as_view(), "options"),
    route("sd-models", views.SdModelsView.as_view(), "sd-models"),
    route("refresh-checkpoints", views.RefreshCheckpointsView.as_view(), "refresh-checkpoints"),
    route("refresh-loras", views.RefreshCheckpointsView.as_view(), "refresh-loras"),
    route("refresh-embeddings", views.RefreshCheckpointsView.as_view(), "refresh-embeddings"),
    route("progress", views.ProgressView.as_view(), "progress"),
    route("interrupt", views.InterruptView.as_view(), "interrupt"),
    route("skip", views.SkipView.as_view(), "skip"),
    route("png-info", views.PngInfoView.as_view(), "png-info"),
    route("samplers", views.listing(views.samplers_payload), "samplers"),
    route("schedulers", views.listing(views.schedulers_payload), "schedulers"),
    route("upscalers", views.listing(views.upscalers_payload), "upscalers"),
    route("latent-upscale-modes", views.listing(views.latent_modes_payload), "latent-upscale-modes"),
    route("sd-vae", views.listing(views.empty_list), "sd-vae"),
    route("sd-modules", views.listing(views.empty_list), "sd-modules"),
    route("loras", views.listing(views.loras_payload), "loras"),
    route("hypernetworks", views.listing(views.empty_list), "hypernetworks"),
    route("face-restorers", views.listing(views.empty_list), "face-restorers"),
    route("realesrgan-models", views.listing(views.empty_list), "realesrgan-models"),
    route("prompt-styles", views.listing(views.empty_list), "prompt-styles"),
    route("extensions", views.listing(views.empty_list), "extensions"),
    route("script-info", views.listing(views.empty_list), "script-info"),
    route("embeddings", views.listing(views.embeddings_payload), "embeddings"),
    route("scripts", views.listing(views.scripts_payload), "scripts"),
    route("cmd-flags", views.listing(views.cmd_flags_payload), "cmd-flags"),
    route("memory", views.listing(views.memory_payload), "memory"),
    re_path(r"^(?:/)*internal/ping/?$", views.PingView.as_view(), name="a1111-ping"),
    re_path(_P + r".*$", views.NotFoundView.as_view(), name="a1111-not-found"),
]
