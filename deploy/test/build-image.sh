#!/usr/bin/env bash
# Builds deploy/Dockerfile here, as production does but on the local Debian base and with torch's CPU
# build. Layers are cached by podman (torch and the dependency layer are rebuilt only when
# constraints.txt or pyproject.toml change). Usage: build-image.sh IMAGE BASE_IMAGE
set -euo pipefail
image=${1:?image}
base=${2:?base image}
cd "$(dirname "$0")/../.."
torch=$(sed -nE 's/^ *"torch==([^"]+)".*/\1/p' pyproject.toml)
py=$(podman run --rm "$base" bash -c 'command -v python3 >/dev/null && python3 -c "import sys; print(f\"cp{sys.version_info[0]}{sys.version_info[1]}\")" || echo cp311')
# torch's CPU wheel: from this machine's wheel house (pip's find-links here) when it has it, served
# to the build on a fixed loopback port (the build shares the host's network; the port is part of
# the layer's cache key, so it never changes). Otherwise torch==X from PyPI (CUDA wheels, slow).
house=${WHEELHOUSE:-$(python3 -c 'import os; print((os.environ.get("PIP_FIND_LINKS") or "").split()[0] if os.environ.get("PIP_FIND_LINKS") else "")')}
[ -n "$house" ] || house=$( (.venv/bin/pip config get global.find-links 2>/dev/null || true) | awk '{print $1}')
port=${WHEELHOUSE_PORT:-38617}
args=(--build-arg "BASE_IMAGE=$base" --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
server=
if [ -n "$house" ] && compgen -G "$house/torch-$torch+cpu-$py-*.whl" >/dev/null; then
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$house" >/dev/null 2>&1 &
  server=$!
  trap 'kill "$server" 2>/dev/null || true' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
  args+=(--build-arg "TORCH_SPEC=torch==$torch+cpu" --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/")
  echo "image: torch==$torch+cpu from the wheel house $house"
else
  args+=(--build-arg "TORCH_SPEC=torch==$torch")
  echo "image: torch==$torch from PyPI (no CPU wheel for $py in a local wheel house)"
fi
podman build --format docker --network host --layers -f deploy/Dockerfile -t "$image" "${args[@]}" .
