#!/usr/bin/env bash
# Fetches a Debian cloud kernel with `apt-get download`, extracts its vmlinuz (a bzImage) into
# target/linux/ (or $1) and from it the uncompressed ELF vmlinux (the bzImage's payload, found
# by its setup header and decompressed with lz4/xz/zstd/gzip: booting the ELF skips the
# decompressor, which takes minutes on a host that emulates guest ring-0 code). Prints the
# vmlinux's path. Exit 0 done (or already there), 77 skipped (no apt-get/dpkg-deb, the package
# cannot be fetched, or no decompressor; said on stderr).
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${1:-$(pwd)/target/linux}
meta=${VEIL_LINUX_PACKAGE:-linux-image-cloud-amd64}
if [ -s "$dest/vmlinux" ]; then echo "$dest/vmlinux"; exit 0; fi
existing=$(ls "$dest"/boot/vmlinuz-* 2>/dev/null | head -1)
for t in apt-get apt-cache dpkg-deb; do
    command -v "$t" >/dev/null 2>&1 || { echo "fetch-linux: $t missing: skipped" >&2; exit 77; }
done
pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq >&2 || true
    pkg=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-linux: no package behind $meta: skipped" >&2; exit 77; }
mkdir -p "$dest" && cd "$dest" || exit 1
if [ -z "$existing" ]; then
    apt-get download "$pkg" >&2 || { echo "fetch-linux: apt-get download $pkg failed: skipped" >&2; exit 77; }
    dpkg-deb -x ./"$pkg"_*.deb . || exit 1
    rm -f ./"$pkg"_*.deb
    existing=$(ls "$dest"/boot/vmlinuz-* | head -1)
fi
# The payload: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c (boot protocol 2.08+).
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
sects=$(u8 "$existing" $((0x1f1))); [ "$sects" = 0 ] && sects=4
off=$(( (sects + 1) * 512 + $(u32 "$existing" $((0x248))) ))
len=$(u32 "$existing" $((0x24c)))
magic=$(od -An -tx1 -j "$off" -N4 "$existing" | tr -d ' ')
case "$magic" in
    02214c18) dec="lz4 -dc" ;; fd377a58) dec="xz -dc" ;; 28b52ffd) dec="zstd -dc" ;;
    1f8b*) dec="gzip -dc" ;; *) echo "fetch-linux: unknown payload format $magic: skipped" >&2; exit 77 ;;
esac
command -v "${dec%% *}" >/dev/null 2>&1 || apt-get install -y -qq "${dec%% *}" >&2 || true
command -v "${dec%% *}" >/dev/null 2>&1 || { echo "fetch-linux: ${dec%% *} missing: skipped" >&2; exit 77; }
tail -c +$((off + 1)) "$existing" | head -c "$len" | $dec > vmlinux.tmp 2>/dev/null
[ -s vmlinux.tmp ] || { echo "fetch-linux: cannot decompress the payload" >&2; exit 1; }
mv vmlinux.tmp vmlinux
echo "$dest/vmlinux"
