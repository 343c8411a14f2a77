import re

from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path
from django.views.static import serve
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from api.metrics.views import metrics_view

# Under /api/, a URL that matches no route and an error outside a view answer in JSON too.
handler400 = "api.exceptions.bad_request_view"
handler403 = "api.exceptions.permission_denied_view"
handler404 = "api.exceptions.not_found_view"
handler500 = "api.exceptions.server_error_view"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("api/", include("api.urls")),
    # The protocols other tools already speak, at the paths those tools expect.
    path("", include("protocols.openai_images.urls")),  # /v1/...
    path("", include("protocols.a1111.urls")),  # /sdapi/v1/... and /internal/ping
    path("", include("protocols.hf_task.urls")),  # /models/<model_id>
    # Prometheus' default scrape path (docs/deployment.md, "Metrics").
    path("metrics", metrics_view, name="metrics"),
]

# The playground page at / with its script and stylesheet (web/), built on the API above.
urlpatterns += [path("", include("web.urls"))]

if settings.SERVE_MEDIA:
    # Generated images, served by Django itself (also under runserver and gunicorn);
    # put a proxy or CDN in front for heavy traffic. serve() refuses paths outside MEDIA_ROOT.
    urlpatterns.append(
        re_path(
            r"^" + re.escape(settings.MEDIA_URL.lstrip("/")) + r"(?P<path>.*)$",
            serve,
            {"document_root": settings.MEDIA_ROOT},
        )
    )
