#!/usr/bin/env bash
# Quick setup and start.
#   ./start.sh          set everything up, then serve on http://127.0.0.1:8000
#   ./start.sh test     set everything up (with test tools), then run the whole test suite
#   ./start.sh setup    set up only
# Settings come from .env (created from .env.example on first run). HOST and PORT pick
# where runserver listens; PYTHON picks the interpreter (3.11+).
set -euo pipefail
cd "$(dirname "$0")"

MODE="${1:-serve}"
[ $# -gt 0 ] && shift
PYTHON="${PYTHON:-python3}"
VENV=".venv"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

log() { printf '\033[1m[start.sh]\033[0m %s\n' "$*"; }

setup_venv() {
  local want="requirements.txt"
  [ "$MODE" = "test" ] && want="requirements-dev.txt"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
  fi
  # Re-install only when the requirement files changed.
  local stamp="$VENV/.installed-$(cat requirements*.txt | sha256sum | cut -c1-16)-$(basename "$want")"
  if [ ! -f "$stamp" ]; then
    # torch first: a bare torch requirement with nothing installed can pull a multi-GB build.
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
      log "installing torch==$TORCH_VERSION${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
      "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
    log "installing $want"
    "$VENV/bin/python" -m pip install --quiet -r "$want"
    touch "$stamp"
  fi
}

setup_project() {
  if [ ! -f .env ]; then
    log "creating .env from .env.example"
    cp .env.example .env
  fi
  mkdir -p media/generations media/inputs
  "$VENV/bin/python" manage.py migrate --noinput -v0
}

case "$MODE" in
  serve)
    setup_venv
    setup_project
    HOST="${HOST:-127.0.0.1}"
    PORT="${PORT:-8000}"
    case "$HOST" in
      localhost | 127.* | ::1 | "[::1]") ;;
      *)
        # AUTH_REQUIRED as the server will see it: the environment, else .env, else its default.
        if [ "$("$VENV/bin/python" manage.py shell -v0 -c 'from django.conf import settings; print(settings.AUTH_REQUIRED)')" != "True" ]; then
          log "WARNING: listening on $HOST, beyond this machine, with AUTH_REQUIRED off: anyone who can reach it can generate images and read or delete every result. Set AUTH_REQUIRED=true (keys: manage.py create_api_key NAME) or HOST=127.0.0.1."
        fi
        ;;
    esac
    log "serving on http://$HOST:$PORT/api/ (docs: http://$HOST:$PORT/api/docs/)"
    exec "$VENV/bin/python" manage.py runserver "$HOST:$PORT" "$@"
    ;;
  test)
    setup_venv
    # The suite uses its own settings (config/settings_test.py): no .env, throwaway media.
    exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" "$@"
    ;;
  setup)
    setup_venv
    setup_project
    log "set up; start with ./start.sh"
    ;;
  *)
    echo "usage: $0 [serve|test|setup] [args...]" >&2
    exit 2
    ;;
esac
