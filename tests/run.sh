#!/usr/bin/env bash
# Install everything the test suite needs, then run all of it.
#   bash tests/run.sh            # the whole suite
#   bash tests/run.sh -k stream  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: a real browser and nginx for the end-to-end tests, and fonts so that
# Chinese text and emoji render in screenshots.
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
[ -d /usr/share/fonts/opentype/noto ] || need+=(fonts-noto-cjk)
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]} (apt-get)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Python packages: webchat itself (editable) with its test extras. The first run
# compiles llama.cpp for the built-in model, which takes several minutes.
python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet -e '.[test]'

# PostgreSQL: the store and multi-instance tests also run against a real server. Use
# WEBCHAT_TEST_POSTGRES_URL if set; else a local server on 127.0.0.1:5432 (started here
# when it is installed but stopped and we are root); else those tests are skipped.
if [ -z "${WEBCHAT_TEST_POSTGRES_URL:-}" ]; then
  local_pg="postgresql://postgres@127.0.0.1:5432/test"
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && [ -d /etc/postgresql ] \
      && [ "$(id -u)" -eq 0 ] && command -v pg_ctlcluster >/dev/null; then
    pg_version=$(ls /etc/postgresql | sort -V | tail -n 1)
    echo "tests/run.sh: PostgreSQL $pg_version is installed but stopped: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" main start || true
    for _ in $(seq 20); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  fi
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && python3 -c \
      "import psycopg, sys; psycopg.connect(sys.argv[1], connect_timeout=5).close()" \
      "$local_pg" 2>/dev/null; then
    export WEBCHAT_TEST_POSTGRES_URL="$local_pg"
    echo "tests/run.sh: PostgreSQL tests use the local server: $local_pg"
  else
    echo "tests/run.sh: no usable PostgreSQL at 127.0.0.1:5432 ($local_pg):" \
         "the PostgreSQL tests will be SKIPPED. Set WEBCHAT_TEST_POSTGRES_URL to run them."
  fi
else
  echo "tests/run.sh: PostgreSQL tests use the server in WEBCHAT_TEST_POSTGRES_URL"
fi

# axe-core, injected into pages by the accessibility tests.
if [ ! -f tests/node_modules/axe-core/axe.min.js ]; then
  (cd tests && npm install --no-audit --no-fund --silent)
fi

# Two cores: two test processes; each starts one browser and its own servers.
status=0
python3 -m pytest -n 2 --dist loadfile "$@" || status=$?

# With PostgreSQL, the stream end-to-end tests run again with every server on a fresh
# PostgreSQL database instead of a SQLite file (WEBCHAT_TEST_STORE, see tests/conftest.py).
# Options go to this run too; test paths given as arguments narrow it to those among them.
stream_files=(tests/test_e2e_resilience.py tests/test_e2e_browser_resilience.py
              tests/test_e2e_chat.py tests/test_e2e_workers.py tests/test_e2e_upstream.py
              tests/test_e2e_features.py)
options=() paths=()
for arg in "$@"; do
  case "$arg" in tests/*|*.py|*.py::*) paths+=("$arg") ;; *) options+=("$arg") ;; esac
done
if [ ${#paths[@]} -gt 0 ]; then
  chosen=()
  for arg in "${paths[@]}"; do
    for file in "${stream_files[@]}"; do
      case "$arg" in
        tests|tests/) chosen+=("$file") ;;
        "$file"|"$file"::*) chosen+=("$arg"); break ;;
      esac
    done
  done
  stream_files=("${chosen[@]}")
fi
if [ -n "${WEBCHAT_TEST_POSTGRES_URL:-}" ] && [ ${#stream_files[@]} -gt 0 ]; then
  echo "tests/run.sh: running the stream end-to-end tests again, every server on a fresh" \
       "PostgreSQL database (WEBCHAT_TEST_STORE=postgres): ${stream_files[*]}"
  WEBCHAT_TEST_STORE=postgres python3 -m pytest -n 2 --dist loadfile \
    "${options[@]}" "${stream_files[@]}" || {
      again=$?
      [ "$again" -eq 5 ] || status=$again  # 5: the options selected none of these tests
    }
fi
exit "$status"
