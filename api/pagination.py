from django.conf import settings
from rest_framework.pagination import PageNumberPagination


class ResultsPagination(PageNumberPagination):
    """``?page=`` and ``?page_size=`` (default 20, capped at 100): ``{count, next, previous, results}``."""

    page_size = settings.RESULTS_PAGE_SIZE
    page_size_query_param = "page_size"
    max_page_size = settings.RESULTS_MAX_PAGE_SIZE
