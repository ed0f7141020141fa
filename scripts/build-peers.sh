#!/usr/bin/env bash
# Builds the real peers that Debian lacks, outside the repo, cached by the
# tarball's name: libvfio-user (its samples: gpio-pci-idio-16, server, client)
# from ../shared/peers/. Prints the build directory on its last line.
#
#   VDEVKIT_PEERS_DIR   where to unpack and build (default ~/.cache/vdevkit-peers)
#   VDEVKIT_PEERS_SRC   where the tarballs are (default ../shared/peers beside the repo)
#
# Needs meson, ninja-build, pkg-config, libjson-c-dev, libcmocka-dev (.ci/run installs them).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="${VDEVKIT_PEERS_SRC:-$here/../shared/peers}"
dir="${VDEVKIT_PEERS_DIR:-$HOME/.cache/vdevkit-peers}"
tarball="$(ls "$src"/libvfio-user-*.tar.gz 2>/dev/null | head -n1 || true)"
if [ -z "$tarball" ]; then
  echo "build-peers: no libvfio-user tarball in $src" >&2
  exit 1
fi
name="$(basename "$tarball" .tar.gz)"
out="$dir/$name"
if [ ! -x "$out/libvfio-user/build/samples/server" ] || [ ! -x "$out/libvfio-user/build/samples/gpio-pci-idio-16" ] || [ ! -x "$out/libvfio-user/build/samples/client" ]; then
  rm -rf "$out"
  mkdir -p "$out"
  tar xzf "$tarball" -C "$out"
  (cd "$out/libvfio-user" && meson setup build >"$out/meson.log" 2>&1 && ninja -C build >>"$out/meson.log" 2>&1) || {
    tail -n 40 "$out/meson.log" >&2
    exit 1
  }
fi
echo "$out/libvfio-user/build"
