from django.apps import AppConfig


class ApiConfig(AppConfig):
    name = "api"
    default_auto_field = "django.db.models.BigAutoField"
    verbose_name = "Image generation"

    def ready(self) -> None:
        from django.conf import settings
        from django.core.checks import Tags, register

        from backend.config import set_config

        from .checks import check_auth_beyond_localhost

        # The engine reads the same settings the web app validated at start-up.
        set_config(settings.ENGINE)
        # runserver, migrate and check print it at start-up; check --deploy fails on it.
        register(check_auth_beyond_localhost, Tags.security)
