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

# axe-core, injected into pages by the accessibility tests.
if [ ! -f tests/node_modules/axe-core/axe.min.js ]; then
  (cd tests && npm install --no-audit --no-fund --silent)
fi

# Two cores: two test processes; each starts one browser and its own servers.
exec python3 -m pytest -n 2 --dist loadfile "$@"
