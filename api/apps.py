from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Image generation"

    def ready(self) -> None:
        from django.conf import settings

        from backend.config import set_config

        # The engine reads the same settings the web app validated at start-up.
        set_config(settings.ENGINE)
