"""The Hugging Face text-to-image / image-to-image task API at ``POST /models/<model_id>``.

What ``huggingface_hub.InferenceClient(base_url=".../models/<id>")`` sends, mapped onto one
ordinary generation; the answer is the image's bytes, errors are ``{"error": "..."}``.
"""
