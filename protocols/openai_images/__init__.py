"""The OpenAI Images API (``/v1/images/*`` and ``/v1/models``) on top of the native services.

``fields`` maps an OpenAI request onto native request fields (the one translation),
``errors`` renders failures in OpenAI's error shape, ``encoding`` converts the stored PNGs to
the requested output format, ``streaming`` turns a running job into server-sent events and
``views`` wires them to HTTP. docs/compat.md lists every field and how it is treated.
"""
