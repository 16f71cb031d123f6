#!/usr/bin/env bash
# Build the router image from ./Dockerfile with podman and smoke-test it (.ci/image_smoke.py).
# Called by .ci/run and `make image-test`. Needs root and Debian's apt (no Docker engine and no
# image registry are needed: the base image is made here from Debian packages).
#
#   IMAGE       the tag built (default localhost/champion-challenger-router:ci)
#   BASE_IMAGE  the base made from Debian packages, reused when it exists
#               (default localhost/cc-python-base:bookworm; `podman rmi` it to remake it)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "image: needs root (rootful podman, mmdebstrap, apt-get)" >&2; exit 1; }

IMAGE="${IMAGE:-localhost/champion-challenger-router:ci}"
BASE_IMAGE="${BASE_IMAGE:-localhost/cc-python-base:bookworm}"
# The machine's own Debian sources (its mirror or proxy), and the CA bundle its proxy needs.
SOURCES="${DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
[ -f "$SOURCES" ] || SOURCES=/etc/apt/sources.list
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
started=$(date +%s)
step() { printf 'image: %s (%ss)\n' "$1" "$(($(date +%s) - started))"; }

# 1. Tools, from Debian, only when missing (one apt-get update).
packages=(podman runc mmdebstrap uidmap containernetworking-plugins iptables)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. podman settings for this machine: root here may not raise the open-files limit above its
#    own hard limit, and crun refuses the hybrid cgroup layout, runc does not.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
nofile="$(ulimit -Hn)"
cat >"$work/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$work/containers.conf"

# 3. The base: Debian bookworm's Python 3.11 with a venv first on PATH, like python:3.11-slim.
if podman image exists "$BASE_IMAGE"; then
  step "base $BASE_IMAGE exists"
else
  step "making base $BASE_IMAGE from Debian packages ($SOURCES)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" python3 -m venv /opt/venv' \
    bookworm - "$SOURCES" |
    podman import --quiet \
      --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
fi

# 4. The repository's Dockerfile, unchanged. --format docker keeps HEALTHCHECK (OCI drops it).
#    Debian's pip trusts /etc/ssl/certs/ca-certificates.crt; the host's bundle (with its proxy's
#    CA) is mounted over the base's for the build only: a mount over an existing file leaves the
#    file as it was (a pip.conf mounted where none exists would leave an empty one behind).
step "building $IMAGE"
if ! podman build --format docker --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --volume "$CA_BUNDLE:$CA_BUNDLE:ro" --tag "$IMAGE" . >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log"
  exit 1
fi
step "built $IMAGE"

# 5. Run it and check it from outside.
python3 .ci/image_smoke.py "$IMAGE" "$BASE_IMAGE"
step "done"
