#!/usr/bin/env bash
# Container images for the local single-node cluster (tests/localnode), built on this machine
# without Docker and without any image registry, and loaded straight into containerd.
#
#   tests/localnode/images.sh build              build what changed; print the cache directory
#   tests/localnode/images.sh load <address>     import both archives into containerd (k8s.io)
#
# `build` makes three images, each rebuilt only when its inputs change:
#   localhost/ccred-python-base:bookworm   Debian bookworm (minbase) + python3 3.11, standing in
#                                          for python:3.11-slim, which no registry can give us
#   localhost/ccred-pause:3.10             the pod sandbox image: tests/localnode/pause (Go, static)
#   <kustomize image>                      the operator, from the repo's own Dockerfile on that
#                                          base; named exactly as deploy/kustomization.yaml's
#                                          `images:` renders it, so the shipped manifests run it
#                                          unchanged (imagePullPolicy IfNotPresent)
# and writes pause.oci.tar and operator.oci.tar into the cache directory. Progress goes to
# stderr; stdout is only the directory.
#
# Everything lives under ${XDG_CACHE_HOME:-$HOME/.cache}/connector-credential-operator/images
# (or $CCRED_IMAGES_CACHE), podman's storage, run state, temp files and network config included:
# nothing goes to /var/lib/containers, /run/libpod or /etc/cni, so `rm -rf` of that directory
# leaves the machine as it was. (Unmount first if a build was killed: see `mount | grep images`.)
#
# For the node's containerd: its CRI plugin must use this pause image and must not try to pull
# it, i.e. in config.toml  [plugins."io.containerd.grpc.v1.cri"] sandbox_image =
# "localhost/ccred-pause:3.10" (the CRI plugin also pins it against the kubelet's image GC).
# Check with:  ctr --address <address> -n k8s.io images ls
#
# Environment:
#   CCRED_IMAGES_CACHE            cache directory (default above)
#   CCRED_IMAGES_STORAGE_DRIVER   podman storage driver: overlay or vfs (default: overlay if
#                                 this kernel/filesystem can mount it, else vfs; remembered)
#   CCRED_DEBIAN_MIRROR           Debian mirror for debootstrap (default deb.debian.org)
#   CCRED_SNAPSHOTTER             `load`: snapshotter to unpack into (default: containerd's)
#
# Needs root (debootstrap, podman's storage, ctr), podman, debootstrap, go, tar, sha256sum;
# `load` needs ctr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${CCRED_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/connector-credential-operator/images}"

BASE_REF=localhost/ccred-python-base:bookworm
PAUSE_REF=localhost/ccred-pause:3.10
# The e2e tests' stand-in for the controller of deploy/examples/existing-controller.
STANDIN_REF=localhost/ccred-standin-controller:e2e
# The base recipe; all of it is part of the base's cache key.
BASE_RELEASE=bookworm                     # bookworm's python3 is 3.11, as python:3.11-slim
BASE_VARIANT=minbase
BASE_PACKAGES=python3,python3-venv,python-is-python3   # venv: the Dockerfile's `python -m venv`
DEBIAN_MIRROR="${CCRED_DEBIAN_MIRROR:-http://deb.debian.org/debian}"

log() { echo "images: $*" >&2; }
die() { echo "images: ERROR: $*" >&2; exit 1; }

need() {  # need TOOL WHY...
  command -v "$1" >/dev/null 2>&1 && return 0
  local tool=$1; shift
  die "'$tool' is not on PATH; it is needed $*."
}

# The operator image's name: read from deploy/kustomization.yaml rather than repeated here, so
# a retag there is followed. (newName/newTag of the `connector-credential-operator` entry.)
operator_ref() {
  local k="$repo/deploy/kustomization.yaml" name tag
  name="$(awk '/- name: connector-credential-operator *$/ {f=1; next}
               f && $1 == "newName:" {print $2; exit}' "$k")"
  tag="$(awk '/- name: connector-credential-operator *$/ {f=1; next}
              f && $1 == "newTag:" {print $2; exit}' "$k")"
  [[ -n $name && -n $tag ]] ||
    die "cannot read the operator image's newName/newTag from $k (images: entry for connector-credential-operator)"
  echo "$name:$tag"
}

# ---------------------------------------------------------------------------------------------
# podman, confined to the cache. Every global flag below points something podman would
# otherwise put on the host (/var/lib/containers, /run/containers, /run/libpod, the events log,
# /etc/cni/net.d's lock) into $store. --cgroup-manager cgroupfs: no systemd is needed.
#
# The one exception is the run state (--runroot, --tmpdir: locks, mount counts, "alive" file):
# podman refuses a runroot longer than 50 characters (socket paths), and it records both paths
# in its database and refuses a different one later, so they live at one short fixed path per
# cache, $rt under /run (tmpfs: what run state is for), which this script removes when it exits.
store="$cache/podman"
driver=""
rt="/run/ccred-images-$(printf '%s' "$cache" | sha256sum | cut -c1-8)"

pm() {
  TMPDIR="$store/tmp" podman \
    --root "$store/$driver/root" --runroot "$rt/$driver/run" --storage-driver "$driver" \
    --tmpdir "$rt/$driver/libpod" --network-config-dir "$store/net" \
    --events-backend none --cgroup-manager cgroupfs "$@"
}

# Pick the storage driver once and remember it (a storage root is tied to its driver, so each
# driver gets its own root). overlay is much faster and smaller than vfs (vfs copies every
# layer in full) but cannot be mounted on every filesystem (e.g. overlay-on-overlayfs in some
# containers); containers/storage test-mounts it when it starts, so `podman info` tells.
choose_driver() {
  mkdir -p "$store/tmp" "$store/net"
  if [[ -n ${CCRED_IMAGES_STORAGE_DRIVER:-} ]]; then
    driver=$CCRED_IMAGES_STORAGE_DRIVER
  elif [[ -s $store/driver ]]; then
    driver="$(cat "$store/driver")"
  else
    driver=overlay
    if ! pm info >/dev/null 2>"$store/tmp/overlay-probe.log"; then
      driver=vfs
      pm info >/dev/null 2>&1 ||
        die "podman does not start (with overlay: $(tail -n1 "$store/tmp/overlay-probe.log"))"
      log "podman's overlay storage does not work here ($(tail -n1 "$store/tmp/overlay-probe.log")); using vfs"
    fi
    echo "$driver" >"$store/driver"
  fi
  log "podman storage: $driver under $store/$driver"
}

# ---------------------------------------------------------------------------------------------
# Cache keys: a build is skipped when its key matches the one recorded after its last success
# and what it made is still there. Each key covers the builder function's own text
# (`declare -f`), so changing a recipe here rebuilds too.
hash() { sha256sum | cut -c1-16; }
current() {  # current NAME KEY: recorded key matches?
  [[ -f $cache/state/$1.key && "$(cat "$cache/state/$1.key")" == "$2" ]]
}
record() { mkdir -p "$cache/state"; echo "$2" >"$cache/state/$1.key"; }

# A scratch directory under the cache, removed (after unmounting anything left mounted below
# it, e.g. debootstrap's /proc when it fails half-way) on any exit.
scratch=""
cleanup() {
  local status=$?
  if [[ -d $rt ]]; then
    # containers/storage's overlay driver bind-mounts its own directory (root/overlay) onto
    # itself, private, and podman may exit without undoing it (seen after a failed build and
    # after `podman image mount`/`diff`): undo it when it is the only mount left under $store.
    local home="$store/overlay/root/overlay"
    if [[ "$(findmnt -rn -o TARGET | grep -F "$store/")" == "$home" ]]; then
      umount "$home" 2>/dev/null || true
    fi
    # Nothing else is left running or mounted between commands; if something is (a killed
    # build), keep the run state so that podman can still account for it.
    if findmnt -rn -o TARGET | grep -qF "$store/"; then
      log "podman still has mounts under $store, keeping $rt: $(findmnt -rn -o TARGET | grep -F "$store/" | tr '\n' ' ')"
    else
      rm -rf "$rt"
    fi
  fi
  if [[ $varlib_was_there == 0 && -d /var/lib/containers ]] &&
     [[ -z "$(find /var/lib/containers -mindepth 1 -not -path /var/lib/containers/cache \
                -not -path '/var/lib/containers/cache/blob-info-cache-*' -print -quit)" ]]; then
    rm -rf /var/lib/containers
  fi
  if [[ -n $scratch && -d $scratch ]]; then
    local m
    # deepest first
    while read -r m; do umount -l "$m" 2>/dev/null || true; done \
      < <(findmnt -rn -o TARGET | grep -F "$scratch" | sort -r)
    rm -rf "$scratch"
  fi
  exit "$status"
}

# containers/image keeps a blob-info cache at /var/lib/containers/cache for root whatever
# --root says (podman 4.3 offers no flag for it). If this run is what creates
# /var/lib/containers, it removes it again on exit (see cleanup).
varlib_was_there=0
[[ -e /var/lib/containers ]] && varlib_was_there=1
trap cleanup EXIT

save_archive() {  # save_archive REF FILE: podman save, atomically
  rm -f "$cache/$2.part"
  pm save --format oci-archive -o "$cache/$2.part" "$1" >&2 || die "podman save of $1 failed"
  mv -f "$cache/$2.part" "$cache/$2"
}

# ---------------------------------------------------------------------------------------------
# 1. The base: debootstrap + podman import. The release and package list are the key (and the
# recipe); the mirror is not (any mirror gives the same release). A rebuild also gives it a new
# image ID, and that ID is part of the operator's key, so the operator follows.
build_base() {
  local key rootfs
  key="$(printf '%s\n' "$BASE_RELEASE" "$BASE_VARIANT" "$BASE_PACKAGES" "$(declare -f build_base)" | hash)"
  if current base "$key" && pm image exists "$BASE_REF"; then
    log "base $BASE_REF: up to date"
    return
  fi
  need debootstrap "to build the base image (apt-get install debootstrap)"
  log "base $BASE_REF: debootstrap $BASE_VARIANT $BASE_RELEASE + $BASE_PACKAGES (about a minute)"
  rootfs="$scratch/rootfs"
  debootstrap --variant="$BASE_VARIANT" --include="$BASE_PACKAGES" \
      "$BASE_RELEASE" "$rootfs" "$DEBIAN_MIRROR" >&2 ||
    die "debootstrap of $BASE_RELEASE failed (see above; log in $rootfs/debootstrap/debootstrap.log is removed on exit)"
  # What python:3.11-slim leaves out too: downloaded .debs and apt lists.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  # The mount point of the operator build's pip config (see build_operator): present in the
  # base, the bind mount adds no empty directory to the operator image's layers.
  mkdir -p "$rootfs/etc/xdg/pip"
  # A container gets its own /dev, /proc, /sys from the runtime: do not ship debootstrap's.
  tar --numeric-owner --xattrs -C "$rootfs" \
      --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* --exclude=./run/* \
      -cf "$scratch/rootfs.tar" . || die "tar of the base rootfs failed"
  rm -rf "$rootfs"
  # python:3.11-slim's LANG and PATH, and a default command.
  pm import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      "$scratch/rootfs.tar" "$BASE_REF" >&2 || die "podman import of the base rootfs failed"
  rm -f "$scratch/rootfs.tar"
  record base "$key"
}

# ---------------------------------------------------------------------------------------------
# 2. The pause image: one static binary (tests/localnode/pause), FROM scratch, run as 65535 like
# Kubernetes' pause. --timestamp 0: the same binary gives the same image ID.
build_pause() {
  local key ctx
  need go "to build the pause program (Go >= 1.22)"
  key="$(cat "$here/pause/main.go" "$here/pause/go.mod" <(go version) <(declare -f build_pause) | hash)"
  if current pause "$key" && [[ -f $cache/pause.oci.tar ]] && pm image exists "$PAUSE_REF"; then
    log "pause $PAUSE_REF: up to date"
    return
  fi
  log "pause $PAUSE_REF: building tests/localnode/pause"
  ctx="$scratch/pause"
  mkdir -p "$ctx"
  # Go's caches in ours too; GOTOOLCHAIN=local: never download a toolchain.
  (cd "$here/pause" &&
     CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-trimpath \
     GOCACHE="$cache/go/build" GOMODCACHE="$cache/go/mod" \
     go build -ldflags='-s -w' -o "$ctx/pause" .) >&2 || die "go build of tests/localnode/pause failed"
  cat >"$ctx/Containerfile" <<'EOF'
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
EOF
  pm build --isolation chroot --pull=never --timestamp 0 \
      -f "$ctx/Containerfile" -t "$PAUSE_REF" "$ctx" >&2 || die "podman build of the pause image failed"
  save_archive "$PAUSE_REF" pause.oci.tar
  record pause "$key"
}

# ---------------------------------------------------------------------------------------------
# 3. The operator, from the repo's Dockerfile on our base. Its key: the Dockerfile, the
# .dockerignore, the files its COPY lines take from the context (read from the Dockerfile, so a
# new COPY is followed; __pycache__, *.py[cod] and *.egg-info are left out as .dockerignore
# does), the base's image ID and the name.
dockerfile_sources() {
  # Sources of `COPY` lines that copy from the build context (not --from=): every word after
  # the flags but the last (the destination). Globs are expanded against the repo root.
  local words w i n
  while read -r -a words; do
    n=${#words[@]}
    for ((i = 1; i < n - 1; i++)); do
      w=${words[i]}
      [[ $w == --* ]] && continue
      echo "$w"
    done
  done < <(grep -E '^[[:space:]]*COPY[[:space:]]' "$repo/Dockerfile" | grep -v -- '--from=')
}

operator_inputs_hash() {
  local src
  (
    cd "$repo"
    shopt -s nullglob
    cat Dockerfile .dockerignore
    for src in $(dockerfile_sources); do  # word splitting + globbing wanted here
      [[ -e $src ]] || continue
      find "$src" -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]' ! -path '*.egg-info/*' -print0
    done | sort -zu | xargs -0r sha256sum
  ) | hash
}

build_operator() {
  local ref=$1 key base_id
  base_id="$(pm image inspect --format '{{.Id}}' "$BASE_REF")" || die "base image $BASE_REF is missing"
  key="$(printf '%s\n' "$(operator_inputs_hash)" "$base_id" "$ref" "$(declare -f build_operator)" | hash)"
  if current operator "$key" && [[ -f $cache/operator.oci.tar ]] && pm image exists "$ref"; then
    log "operator $ref: up to date"
    return
  fi
  log "operator $ref: podman build of ./Dockerfile on $BASE_REF (pip install from PyPI; a few minutes)"
  # pip in the build must trust what this host trusts: where egress TLS is re-signed by a
  # local CA (as on these machines), pip's own bundle fails with CERTIFICATE_VERIFY_FAILED.
  # So the RUN steps get a read-only /etc/xdg/pip (a pip site config dir) holding the host's
  # CA bundle and a pip.conf that points at it. A bind mount, not a COPY: none of it enters
  # an image layer, and the Dockerfile stays as it is for Docker users.
  # CCRED_BUILD_CA_BUNDLE=none leaves it out; =FILE picks another bundle.
  local ca=${CCRED_BUILD_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}} pipconf=()
  if [[ $ca != none ]]; then
    [[ -f $ca ]] || die "CA bundle $ca (CCRED_BUILD_CA_BUNDLE / SSL_CERT_FILE) does not exist"
    mkdir -p "$scratch/pip"
    cp "$ca" "$scratch/pip/host-ca.crt"
    printf '[global]\ncert = /etc/xdg/pip/host-ca.crt\n' >"$scratch/pip/pip.conf"
    pipconf=(--volume "$scratch/pip:/etc/xdg/pip:ro")
  fi
  # --isolation chroot: RUN steps without a container runtime's namespaces setup (works here);
  # --network host: pip reaches PyPI without a CNI network; --pull=never: the base is local.
  pm build --isolation chroot --network host --pull=never "${pipconf[@]}" \
      --build-arg PYTHON_IMAGE="$BASE_REF" \
      -f "$repo/Dockerfile" -t "$ref" "$repo" >&2 || die "podman build of the operator image (./Dockerfile) failed"
  save_archive "$ref" operator.oci.tar
  # Drop what the previous builds left untagged (old operator images, the builder stage), so
  # the cache does not grow with each rebuild.
  pm image prune -f >/dev/null 2>&1 || true
  record operator "$key"
}

# ---------------------------------------------------------------------------------------------
# 4. The e2e stand-in controller (tests/e2e/standin): the operator image plus a tiny HTTP
# controller. Its key: its two files and the operator's image ID.
build_standin() {
  local operator=$1 key operator_id
  operator_id="$(pm image inspect --format '{{.Id}}' "$operator")" || die "operator image $operator is missing"
  key="$(cat "$repo/tests/e2e/standin/Containerfile" "$repo/tests/e2e/standin/controller.py" \
           <(echo "$operator_id") <(declare -f build_standin) | hash)"
  if current standin "$key" && [[ -f $cache/standin.oci.tar ]] && pm image exists "$STANDIN_REF"; then
    log "standin $STANDIN_REF: up to date"
    return
  fi
  log "standin $STANDIN_REF: tests/e2e/standin on $operator"
  pm build --isolation chroot --pull=never --build-arg OPERATOR_IMAGE="$operator" \
      -f "$repo/tests/e2e/standin/Containerfile" -t "$STANDIN_REF" "$repo" >&2 ||
    die "podman build of the stand-in controller image failed"
  save_archive "$STANDIN_REF" standin.oci.tar
  record standin "$key"
}

cmd_build() {
  [[ $(id -u) == 0 ]] || die "build needs root (debootstrap, podman's storage)"
  need podman "to build the images (apt-get install podman)"
  need tar "to pack the base rootfs"
  need sha256sum "for the cache keys"
  need flock "to keep two builds from sharing the cache at once (util-linux)"
  need findmnt "to find mounts a failed step left behind (util-linux)"
  local ref start=$SECONDS
  ref="$(operator_ref)"
  mkdir -p "$cache"
  # One build at a time per cache: they would share podman's storage and the archives.
  exec 9>"$cache/.lock"
  flock 9 || die "cannot lock $cache/.lock"
  scratch="$(mktemp -d "$cache/.build.XXXXXX")"
  choose_driver
  build_base
  build_pause
  build_operator "$ref"
  build_standin "$ref"
  log "done in $((SECONDS - start)) s: $cache/{pause,operator,standin}.oci.tar"
  pm images --format '{{.Repository}}:{{.Tag}} {{.Size}}' 2>/dev/null | grep -v '<none>' >&2 || true
  echo "$cache"
}

# ---------------------------------------------------------------------------------------------
# load: `ctr images import` into the k8s.io namespace (the one containerd's CRI plugin, and so
# the kubelet, sees). Importing again is harmless: the content is deduplicated and the names are
# re-pointed. ctr names an imported OCI image after its org.opencontainers.image.ref.name
# annotation, which podman may write as a bare tag or a full name depending on version; so
# afterwards each expected name is checked, and made with `ctr images tag` from whatever name the
# archive's manifest digest was imported under if it is not there.
cmd_load() {
  local address=${1:-} ref
  [[ -n $address ]] || die "usage: $0 load <containerd-address>   (e.g. /run/containerd/containerd.sock)"
  need ctr "to import the images into containerd (apt-get install containerd)"
  [[ -S $address ]] || die "no containerd socket at $address"
  ref="$(operator_ref)"
  import_one "$address" "$cache/pause.oci.tar" "$PAUSE_REF"
  import_one "$address" "$cache/operator.oci.tar" "$ref"
  import_one "$address" "$cache/standin.oci.tar" "$STANDIN_REF"
  log "loaded into $address (namespace k8s.io):"
  ctr --address "$address" -n k8s.io images ls | awk -v a="$PAUSE_REF" -v b="$ref" -v c="$STANDIN_REF" 'NR == 1 || $1 == a || $1 == b || $1 == c' >&2
}

import_one() {  # import_one ADDRESS ARCHIVE REF
  local address=$1 archive=$2 ref=$3 digest imported name
  local ctr=(ctr --address "$address" -n k8s.io)
  [[ -f $archive ]] || die "$archive is missing: run '$0 build' first"
  # The manifest digest the archive's index names: how the imported image is found again.
  digest="$({ tar -xOf "$archive" index.json 2>/dev/null || tar -xOf "$archive" ./index.json; } | grep -o '"digest": *"sha256:[0-9a-f]*"' | head -n1 | grep -o 'sha256:[0-9a-f]*')" ||
    die "cannot read the manifest digest from $archive's index.json"
  log "importing $archive as $ref"
  imported="$("${ctr[@]}" images import ${CCRED_SNAPSHOTTER:+--snapshotter "$CCRED_SNAPSHOTTER"} "$archive" 2>&1)" || {
    echo "$imported" >&2
    die "ctr images import of $archive into $address failed"
  }
  echo "$imported" >&2
  if [[ "$("${ctr[@]}" images ls -q "name==$ref")" != "$ref" ]]; then
    # Imported under another name: find it by digest and give it ours.
    name="$("${ctr[@]}" images ls | awk -v d="$digest" '$3 == d {print $1; exit}')"
    [[ -n $name ]] || die "ctr imported $archive but no image in k8s.io has its manifest $digest"
    log "ctr named it '$name'; tagging it $ref"
    "${ctr[@]}" images tag --force "$name" "$ref" >&2 || die "ctr images tag $name $ref failed"
    "${ctr[@]}" images rm "$name" >/dev/null || true  # a stray name would only confuse
  fi
  [[ "$("${ctr[@]}" images ls -q "name==$ref")" == "$ref" ]] || die "$ref is not in containerd after the import"
}

case "${1:-}" in
  build) cmd_build ;;
  load) shift; cmd_load "$@" ;;
  *) die "usage: $0 build | $0 load <containerd-address>" ;;
esac
