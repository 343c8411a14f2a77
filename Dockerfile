# One image for every role: the web process (gunicorn), Celery workers, and one-off commands.
#   docker build -t sdapi .                                   (CUDA build of torch, for GPUs)
#   docker build -t sdapi --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The CUDA libraries come inside the torch wheel; the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit for the worker's GPU reservation in docker-compose.yml.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
# Empty: PyPI's default torch wheel (the CUDA build on x86_64).
ARG TORCH_INDEX_URL=

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Settings come from the container's environment (compose's env_file), never a baked-in .env.
    ENV_FILE=none \
    HF_HOME=/data/huggingface \
    MEDIA_ROOT=/data/media \
    TINY_MODELS_DIR=/data/tiny-models \
    # COMPILE's caches (inductor's kernels, saved compile artifacts): a volume keeps them across restarts.
    COMPILE_CACHE_DIR=/data/compile

WORKDIR /app

# A C compiler: torch.compile (COMPILE=...) builds its kernels' launchers with it.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app \
 && mkdir -p /data/huggingface /data/media /data/tiny-models /data/compile \
 && chown -R app:app /data

# torch first and on its own: a bare torch requirement could otherwise pull another build.
COPY requirements.txt ./
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
 && pip install -r requirements.txt

COPY --chown=app:app . .

USER app
EXPOSE 8000

# /api/health/ never loads a model or imports torch, so it answers while a job runs.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health/', timeout=4)" || exit 1

CMD ["gunicorn", "-c", "gunicorn.conf.py", "config.wsgi:application"]
