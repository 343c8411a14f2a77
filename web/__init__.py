"""The playground page at ``/``: one HTML page, one JavaScript module and one stylesheet, built
on the public API only (no build step, nothing from a CDN)."""
