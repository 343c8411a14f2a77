"""OpenAI Images API routes; clients send no trailing slash, both forms are served."""

from django.urls import path, re_path

from . import schema, views  # noqa: F401 - schema: these views' OpenAPI description

urlpatterns = [
    re_path(r"^v1/images/generations/?$", views.GenerationsView.as_view(), name="openai-images-generations"),
    re_path(r"^v1/images/edits/?$", views.EditsView.as_view(), name="openai-images-edits"),
    re_path(r"^v1/images/variations/?$", views.VariationsView.as_view(), name="openai-images-variations"),
    re_path(r"^v1/models/?$", views.ModelsView.as_view(), name="openai-models"),
    path("v1/models/<path:model_id>", views.ModelView.as_view(), name="openai-model"),
    re_path(r"^v1(?:/.*)?$", views.NotFoundView.as_view(), name="openai-not-found"),
]
