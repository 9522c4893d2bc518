#!/usr/bin/env bash
# Installs what modelvault needs to build, run and test on Debian 12, then buf
# from the pinned npm lockfile. Safe to run again: it installs only what is missing.
# (openssl: the TLS tests make their certificates with it.)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ninja-build pkg-config git unzip ca-certificates
  protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev libabsl-dev
  libsoci-dev libboost-dev libgtest-dev libgmock-dev libbenchmark-dev
  libpq-dev libsqlite3-dev libsodium-dev libssl-dev libjemalloc-dev postgresql
  grpc-proto libgoogle-common-protos-java nodejs npm openssl
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A machine that already has Node and npm from elsewhere needs no Debian npm.
if command -v npm >/dev/null 2>&1; then
  filtered=()
  for p in "${missing[@]}"; do [[ "$p" == nodejs || "$p" == npm ]] || filtered+=("$p"); done
  missing=("${filtered[@]+"${filtered[@]}"}")
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# buf, pinned by package.json (exact version) and package-lock.json (integrity),
# into the project's own node_modules. Not `npm ci`: the registry reachable here
# serves only this platform's buf binary, so the lockfile cannot list the other
# platforms' optional packages, and `npm ci` refuses such a lockfile.
# `npm install` installs exactly the locked versions and leaves the lockfile as is.
if [ ! -x node_modules/.bin/buf ] || ! node_modules/.bin/buf --version >/dev/null 2>&1; then
  echo "install-deps: installing buf from package-lock.json"
  npm install --no-audit --no-fund --loglevel=error >/dev/null
fi
