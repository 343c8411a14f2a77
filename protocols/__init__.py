"""The foreign wire protocols, each a thin translation onto the service layer.

One package per protocol: ``openai_images`` (``/v1/``), ``a1111`` (``/sdapi/v1/``) and
``hf_task`` (``/models/<id>``). Each maps its own fields onto the native request fields once,
calls ``api.services`` (never ``backend/``), and answers errors in its own shape.
"""
