from django.conf import settings
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination


class ResultsPagination(PageNumberPagination):
    """``?page=`` and ``?page_size=`` (default 20, capped at 100): ``{count, next, previous, results}``."""

    page_size = settings.RESULTS_PAGE_SIZE
    page_size_query_param = "page_size"
    max_page_size = settings.RESULTS_MAX_PAGE_SIZE

    def get_page_size(self, request) -> int:  # noqa: ANN001
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None or raw == "":
            return self.page_size
        # A bad page_size is refused rather than quietly replaced by the default;
        # one above the cap is capped, as documented.
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValidationError(
                {
                    "page_size": [
                        f"page_size must be an integer of at least 1 (at most {self.max_page_size} are returned), got {raw[:20]!r}"
                    ]
                }
            )
        return min(value, self.max_page_size)

    def get_schema_operation_parameters(self, view) -> list[dict]:  # noqa: ANN001
        params = super().get_schema_operation_parameters(view)
        for param in params:
            param["schema"]["minimum"] = 1
        return params
