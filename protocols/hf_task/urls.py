"""The HF task API at the site root, where ``InferenceClient(base_url=...)`` points."""

from django.urls import path

from . import schema  # noqa: F401 - the view's OpenAPI description
from .views import ModelTaskView

# <path:...> keeps the slash of a hub repository (owner/name); a trailing slash is dropped
# in the view, so /models/<id> and /models/<id>/ are the same.
urlpatterns = [
    path("models/<path:model_id>", ModelTaskView.as_view(), name="hf-task"),
]
