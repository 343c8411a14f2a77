from django.urls import path
from rest_framework.routers import SimpleRouter

from . import views

router = SimpleRouter()
router.register("results", views.ResultsViewSet, basename="results")

urlpatterns = [
    path("txt2img/", views.Txt2ImgView.as_view(), name="txt2img"),
    path("img2img/", views.Img2ImgView.as_view(), name="img2img"),
    path("inpaint/", views.InpaintView.as_view(), name="inpaint"),
    path("models/", views.ModelsView.as_view(), name="models"),
    path("loras/", views.LorasView.as_view(), name="loras"),
    path("embeddings/", views.EmbeddingsView.as_view(), name="embeddings"),
    path("status/", views.StatusView.as_view(), name="status"),
    path("health/", views.HealthView.as_view(), name="health"),
    *router.urls,
]
