#!/usr/bin/env bash
# The images docker-compose.yml's CPU profile runs, on the Docker engine named by DOCKER_HOST
# (tests/deploy starts a private one; usable by hand against any engine):
#   python:3.11-slim-bookworm  the base of deploy/docker/Dockerfile.cpu
#   redis:7.4-alpine, prom/prometheus:v2.55.1
#   gd2po:cpu                  deploy/docker/Dockerfile.cpu, built from this checkout
# Each image is pulled when a registry answers. When none does (the machines this runs on reach no
# registry), the base is built offline with mmdebstrap from Debian bookworm (python3 is 3.11 there;
# the tarball is cached) and Redis and Prometheus are stand-ins from Debian's packages
# (deploy/test/images/). Stand-ins carry the label org.gd2po.stand-in and are replaced by the real
# images as soon as a pull succeeds. gd2po:cpu is always built (Docker's build cache makes an unchanged
# checkout a matter of seconds).
#
# Environment:
#   DOCKER_HOST                 the engine (required)
#   DOCKER                      the docker CLI (default /usr/bin/docker: Debian's, matching its daemon)
#   GD2PO_DEPLOY_CACHE          cache folder (default .cache/deploy-test): base tarball, torch wheel
#   GD2PO_BUILD_CA_BUNDLE       CA bundle for pip inside the build, on networks that intercept TLS
#                               (default: $PIP_CERT when set); passed as a BuildKit secret
#   GD2PO_PULL_TIMEOUT          seconds one pull may take before the offline path is used (default 120)
#   PYTHON                      a Python whose pip can fetch torch==2.13.0+cpu (default .venv/bin/python)
# Every phase prints its duration; with GD2PO_DEPLOY_TIMINGS=FILE they are also appended there as
# "name seconds" lines.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
: "${DOCKER_HOST:?set DOCKER_HOST to the engine to build on}"
docker="${DOCKER:-/usr/bin/docker}"
cache="${GD2PO_DEPLOY_CACHE:-$repo/.cache/deploy-test}"
python="${PYTHON:-$repo/.venv/bin/python}"
pull_timeout="${GD2PO_PULL_TIMEOUT:-120}"
ca_bundle="${GD2PO_BUILD_CA_BUNDLE:-${PIP_CERT:-}}"
export DOCKER_BUILDKIT=1  # RUN --mount and --secret; Docker 20.10 defaults to the legacy builder

# The images docker-compose.yml and Dockerfile.cpu name: read from the files, so a version bump there
# is what gets pulled or stood in for here.
python_image="$(sed -n 's/^ARG PYTHON_IMAGE=//p' deploy/docker/Dockerfile.cpu)"
redis_image="$(sed -n 's/^    image: \(redis:.*\)$/\1/p' docker-compose.yml)"
prometheus_image="$(sed -n 's/^    image: \(prom\/prometheus:.*\)$/\1/p' docker-compose.yml)"
for name in python_image redis_image prometheus_image; do
  [ -n "${!name}" ] || { echo "build-images: cannot find $name in Dockerfile.cpu / docker-compose.yml" >&2; exit 1; }
done

# Debian release and packages of the offline base: bookworm's python3 is the 3.11 the project needs;
# python3-dev for DeepSpeed's JIT op, ca-certificates for pip.
debian_suite=bookworm
debian_mirror="${GD2PO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base_packages=python3,python3-venv,python3-pip,python3-dev,python-is-python3,ca-certificates

started=$SECONDS
record() {  # record NAME SECONDS: print a phase's duration (and append it to GD2PO_DEPLOY_TIMINGS)
  echo "[build-images] $1: $2 s"
  [ -z "${GD2PO_DEPLOY_TIMINGS:-}" ] || echo "$1 $2" >> "$GD2PO_DEPLOY_TIMINGS"
}

has_image() { "$docker" image inspect "$1" > /dev/null 2>&1; }
is_stand_in() { [ -n "$("$docker" image inspect -f '{{index .Config.Labels "org.gd2po.stand-in"}}' "$1" 2>/dev/null)" ]; }

# try_pull IMAGE: 0 when pulled (a registry answered), else 1 with the reason on one line.
try_pull() {
  local output
  if output="$(timeout "$pull_timeout" "$docker" pull -q "$1" 2>&1)"; then
    return 0
  fi
  echo "[build-images] $1: no pull (${output##*$'\n'})"
  return 1
}

build_offline_base() {
  command -v mmdebstrap > /dev/null || {
    echo "build-images: mmdebstrap is missing (make test-deploy installs it with apt-get)" >&2
    exit 1
  }
  # The tarball's name covers everything that shapes it, so changing the package list rebuilds it.
  local key tarball
  key="$(printf '%s %s %s' "$debian_suite" "$debian_mirror" "$base_packages" | sha256sum | cut -c1-12)"
  tarball="$cache/base/debian-$debian_suite-python3-$key.tar"
  if [ -f "$tarball" ]; then
    echo "[build-images] $python_image: offline base from the cached $tarball"
  else
    mkdir -p "$cache/base"
    echo "[build-images] $python_image: building Debian $debian_suite + python3 with mmdebstrap (~1–2 min)"
    local t=$SECONDS
    rm -rf "$tarball.partial"  # what an interrupted run left
    # --format: mmdebstrap picks the format from the file name otherwise, and .partial is none.
    mmdebstrap --quiet --variant=minbase --format=tar --include="$base_packages" \
      "$debian_suite" "$tarball.partial" "$debian_mirror"
    mv "$tarball.partial" "$tarball"  # only a complete tarball is ever reused
    record "mmdebstrap base" $((SECONDS - t))
  fi
  # docker import keeps no image config: give it what the official image has (PATH, UTF-8, python3).
  "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.gd2po.stand-in=\"$python_image, from Debian $debian_suite's python3 (mmdebstrap)\"" \
    --change 'CMD ["python3"]' \
    "$tarball" "$python_image" > /dev/null
}

build_stand_in() {  # build_stand_in IMAGE DOCKERFILE
  "$docker" build --quiet --build-arg "BASE_IMAGE=$python_image" -t "$1" \
    -f "deploy/test/images/$2" deploy/test/images > /dev/null
}

# ensure IMAGE BUILDER [ARGS]: a real image present stays; else pull; else a stand-in already built
# stays; else BUILDER builds one.
ensure() {
  local image="$1" t=$SECONDS how
  shift
  if has_image "$image" && ! is_stand_in "$image"; then
    how=present
  elif try_pull "$image"; then
    how=pulled
  elif has_image "$image"; then
    how="stand-in kept from an earlier run"
  else
    "$@"
    how="built offline"
  fi
  record "$image ($how)" $((SECONDS - t))
}

ensure "$python_image" build_offline_base
ensure "$redis_image" build_stand_in "$redis_image" redis.Dockerfile
ensure "$prometheus_image" build_stand_in "$prometheus_image" prometheus.Dockerfile

# torch==2.13.0+cpu: when this machine's pip can get it (a local wheel folder, a mirror), it goes into
# the build context's deploy/docker/wheels/ (a hard link when possible: no copy) and the build uses no
# extra index; otherwise the build fetches it from PyTorch's CPU index as it does by default.
build_args=()
wheels="$repo/deploy/docker/wheels"
linked=()
cleanup() { [ "${#linked[@]}" -eq 0 ] || rm -f "${linked[@]}"; }
trap cleanup EXIT
mkdir -p "$cache/wheels"
if "$python" -m pip download --quiet --no-deps --dest "$cache/wheels" 'torch==2.13.0+cpu' 2>/dev/null; then
  for wheel in "$cache"/wheels/torch-2.13.0+cpu-*.whl; do
    target="$wheels/$(basename "$wheel")"
    if [ ! -e "$target" ]; then
      ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
      linked+=("$target")
    fi
  done
  build_args+=(--build-arg TORCH_INDEX_URL=)
  echo "[build-images] torch==2.13.0+cpu from $cache/wheels (no PyTorch index)"
else
  echo "[build-images] torch==2.13.0+cpu: not available to $python's pip; the build uses PyTorch's CPU index"
fi
if [ -n "$ca_bundle" ]; then
  [ -f "$ca_bundle" ] || { echo "build-images: CA bundle $ca_bundle does not exist" >&2; exit 1; }
  build_args+=(--secret "id=ca_bundle,src=$ca_bundle")
  echo "[build-images] pip inside the build trusts $ca_bundle"
fi

# --progress=plain into a log; its step lines (start, DONE, CACHED, ERROR) are shown as they come.
log="${GD2PO_DEPLOY_BUILD_LOG:-$cache/build-gd2po-cpu.log}"
t=$SECONDS
set +o pipefail
"$docker" build --progress=plain -f deploy/docker/Dockerfile.cpu "${build_args[@]}" -t gd2po:cpu . 2>&1 \
  | tee "$log" | grep --line-buffered -E '^#[0-9]+ (\[|DONE|CACHED|ERROR)'
status="${PIPESTATUS[0]}"
set -o pipefail
if [ "$status" -ne 0 ]; then
  tail -n 40 "$log" >&2
  echo "build-images: docker build of gd2po:cpu failed ($status); full log: $log" >&2
  exit 1
fi
record "build gd2po:cpu" $((SECONDS - t))

# A rebuilt gd2po:cpu leaves the previous one untagged (4 GB): drop untagged images, and keep Docker's
# build cache to what a rebuild of this Dockerfile uses.
t=$SECONDS
"$docker" image prune --force > /dev/null
"$docker" builder prune --force --keep-storage "${GD2PO_BUILD_CACHE_KEEP:-6GB}" > /dev/null
record "prune" $((SECONDS - t))
size="$("$docker" image inspect -f '{{.Size}}' gd2po:cpu)"
echo "[build-images] gd2po:cpu: $((size / 1000000)) MB; all images in $((SECONDS - started)) s"
[ -z "${GD2PO_DEPLOY_TIMINGS:-}" ] || echo "image-size-bytes $size" >> "$GD2PO_DEPLOY_TIMINGS"
