from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="playground"),
    path("playground/<str:name>", views.asset, name="playground-asset"),
]
