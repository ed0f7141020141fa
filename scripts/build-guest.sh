#!/usr/bin/env bash
# Builds the Linux guest that the interop tests boot under QEMU (TCG): Debian's
# kernel taken out of its .deb (nothing is installed into /boot) and a
# busybox-static initramfs holding the virtio modules and an /init that runs
# /test.sh (appended per test by test/interop/guest.ts), prints
# `VDEVKIT-GUEST-EXIT <rc>` on the serial console and powers off.
# Cached and idempotent; prints the build directory (vmlinux, vmlinuz, initrd.img) on its last line.
#
#   VDEVKIT_GUEST_DIR      cache (default ~/.cache/vdevkit-guest); <dir>/current -> the build
#   VDEVKIT_GUEST_KERNEL   kernel package (default: the linux-image-6.1.0-*-amd64 that
#                          linux-image-amd64 depends on)
#
# Needs apt-get/apt-cache/dpkg-deb, busybox-static, cpio, gzip, and xz-utils (to unpack the
# kernel's vmlinux for a fast PVH boot; without it the bzImage is booted). .ci/run installs them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
self="$here/$(basename "$0")"
dir="${VDEVKIT_GUEST_DIR:-$HOME/.cache/vdevkit-guest}"
# Modules in load order; their dependencies (modinfo's depends=) are added ahead of them.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net)

log() { echo "build-guest: $*" >&2; }
die() { log "$*"; exit 1; }

# The stamp names what a build is made of: this script and the kernel package chosen.
stamp_of() { printf '%s %s\n' "$(sha256sum "$self" | cut -d' ' -f1)" "$1"; }

current="$dir/current"
if [ -z "${VDEVKIT_GUEST_KERNEL:-}" ] && [ -f "$current/stamp" ] && [ -f "$current/vmlinuz" ] && [ -f "$current/initrd.img" ] \
  && [ "$(cut -d' ' -f1 "$current/stamp")" = "$(sha256sum "$self" | cut -d' ' -f1)" ]; then
  cd "$current" && pwd -P
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install $(case $tool in cpio) echo cpio;; gzip) echo gzip;; flock) echo util-linux;; *) echo apt dpkg coreutils;; esac))"
done
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && [[ "$(LC_ALL=C ldd "$b" 2>&1 || true)" == *"not a dynamic executable"* ]]; then busybox="$b"; break; fi
done
[ -n "$busybox" ] || die "no static busybox (apt-get install busybox-static)"

# Which kernel package: the versioned one linux-image-amd64 depends on.
kpkg="${VDEVKIT_GUEST_KERNEL:-}"
pick_kernel() { apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1; }
if [ -z "$kpkg" ]; then
  kpkg="$(pick_kernel)"
  if [ -z "$kpkg" ]; then
    log "linux-image-amd64 is not known to apt: running apt-get update"
    apt-get update -q >&2 || die "apt-get update failed (run it as root)"
    kpkg="$(pick_kernel)"
  fi
  [ -n "$kpkg" ] || die "apt-cache finds no linux-image-6.1.0-*-amd64 behind linux-image-amd64"
fi
kver="$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)"
[ -n "$kver" ] || die "apt-cache knows no $kpkg"
stamp="$(stamp_of "$kpkg=$kver")"
name="$kpkg-$kver-$(echo "$stamp" | sha256sum | cut -c1-12)"
out="$dir/$name"

built() { [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; }
if ! built; then
  mkdir -p "$dir"
  # One build at a time (the tests may call this from several processes).
  exec 9>"$dir/.lock"
  flock 9
fi
if ! built; then
  work="$(mktemp -d "$dir/.build-XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  # The .deb is kept (debs/<pkg>-<version>/): a rebuild after a change of this script needs no network.
  debdir="$dir/debs/$kpkg-$kver"
  deb="$(ls "$debdir"/*.deb 2>/dev/null | head -n1 || true)"
  if [ -z "$deb" ]; then
    log "downloading $kpkg=$kver"
    mkdir -p "$work/dl"
    if ! (cd "$work/dl" && apt-get download -q "$kpkg=$kver" >&2); then
      log "apt-get download failed: running apt-get update and retrying"
      apt-get update -q >&2 || die "apt-get update failed (run it as root)"
      (cd "$work/dl" && apt-get download -q "$kpkg=$kver" >&2) || die "apt-get download $kpkg=$kver failed"
    fi
    rm -rf "$dir/debs" && mkdir -p "$debdir"
    mv "$work"/dl/*.deb "$debdir/"
    deb="$(ls "$debdir"/*.deb | head -n1)"
  fi
  dpkg-deb -x "$deb" "$work/deb"
  vmlinuz="$(ls "$work"/deb/boot/vmlinuz-* | head -n1)"
  uname_r="${vmlinuz##*/vmlinuz-}"
  moddir="$work/deb/lib/modules/$uname_r"
  [ -d "$moddir" ] || die "$deb holds no lib/modules/$uname_r"

  # The initramfs tree.
  root="$work/root"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,lib/modules/vdevkit}
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list-full); do
    [ "$applet" = bin/busybox ] || [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done
  # A console node for init's stdio before devtmpfs is mounted (init copes without it).
  if [ "$(id -u)" = 0 ]; then mknod -m 600 "$root/dev/console" c 5 1; mknod -m 666 "$root/dev/null" c 1 3; fi

  # Modules: each one's file (decompressed: busybox insmod loads plain .ko only), after its dependencies.
  declare -A placed=()
  order=()
  place() {
    local m="$1" f deps d
    [ -n "${placed[$m]:-}" ] && return 0
    placed[$m]=pending
    f="$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)"
    [ -n "$f" ] || die "module $m is not in $kpkg"
    case "$f" in
      *.ko) cp "$f" "$root/lib/modules/vdevkit/$m.ko" ;;
      *.ko.xz) command -v xz >/dev/null || die "$m is .ko.xz: apt-get install xz-utils"; xz -dc "$f" >"$root/lib/modules/vdevkit/$m.ko" ;;
      *.ko.zst) command -v zstd >/dev/null || die "$m is .ko.zst: apt-get install zstd"; zstd -qdc "$f" >"$root/lib/modules/vdevkit/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" >"$root/lib/modules/vdevkit/$m.ko" ;;
    esac
    deps="$(tr '\0' '\n' <"$root/lib/modules/vdevkit/$m.ko" | sed -n 's/^depends=//p' | head -n1)"
    for d in ${deps//,/ }; do place "$d"; done
    placed[$m]=done
    order+=("$m")
  }
  for m in "${modules[@]}"; do place "$m"; done
  printf '%s\n' "${order[@]}" >"$root/lib/modules/vdevkit/order"

  cat >"$root/init" <<'EOF'
#!/bin/sh
# vdevkit guest init: mount, load the virtio modules, run /test.sh, report, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=256m tmpfs /tmp
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts
for m in $(cat /lib/modules/vdevkit/order); do
  insmod /lib/modules/vdevkit/$m.ko || echo "vdevkit-init: insmod $m failed"
done
echo "VDEVKIT-GUEST-START $(uname -r) $(cut -d' ' -f1 /proc/uptime)"
if [ -f /test.sh ]; then
  cd /tmp && sh /test.sh
  rc=$?
else
  echo "vdevkit-init: no /test.sh in the initramfs"
  rc=127
fi
sync
echo "VDEVKIT-GUEST-EXIT $rc $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
sleep 5
echo o >/proc/sysrq-trigger
EOF
  chmod 755 "$root/init"

  mkdir -p "$work/out"
  (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9n) >"$work/out/initrd.img"
  # Pad to 512 bytes: an archive appended by the harness then starts aligned (the kernel
  # skips the zeros between concatenated archives).
  size=$(stat -c %s "$work/out/initrd.img")
  pad=$(( (512 - size % 512) % 512 ))
  [ "$pad" = 0 ] || head -c "$pad" /dev/zero >>"$work/out/initrd.img"
  cp "$vmlinuz" "$work/out/vmlinuz"
  # The uncompressed ELF vmlinux boots by PVH (CONFIG_PVH), skipping the bzImage's xz
  # decompression, which takes 3-5 s under TCG: the guest then boots in about 3 s, not 7-8.
  config="$work/deb/boot/config-$uname_r"
  off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n1 | cut -d: -f1 || true)"
  if grep -q '^CONFIG_PVH=y' "$config" 2>/dev/null && [ -n "$off" ] && command -v xz >/dev/null; then
    # (xz stops at the end of its stream: tail's SIGPIPE must not count, hence no pipe.)
    if xz -dc --single-stream < <(tail -c +$((off + 1)) "$vmlinuz" 2>/dev/null) >"$work/out/vmlinux" 2>/dev/null \
      && [ "$(head -c 4 "$work/out/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
      log "vmlinux extracted (PVH boot)"
    else
      rm -f "$work/out/vmlinux"
      log "could not extract vmlinux from $vmlinuz: the guest boots the bzImage (slower)"
    fi
  else
    log "no PVH vmlinux (needs CONFIG_PVH, an xz bzImage and xz-utils): the guest boots the bzImage (slower)"
  fi
  echo "$uname_r" >"$work/out/kernel-release"
  printf '%s\n' "${order[@]}" >"$work/out/modules"
  echo "$stamp" >"$work/out/stamp"
  rm -rf "$out"
  mv "$work/out" "$out"
  # Older builds (another kernel or another version of this script) go.
  for old in "$dir"/linux-image-*; do [ "$old" = "$out" ] || rm -rf "$old"; done
  log "built $out (kernel $uname_r, modules: ${order[*]})"
fi
ln -sfn "$name" "$current.tmp" && mv -T "$current.tmp" "$current"
echo "$out"
