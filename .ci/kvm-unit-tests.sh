#!/usr/bin/env bash
# Builds kvm-unit-tests (x86) from the shared tarball into target/kvm-unit-tests/ (or $1):
#   ../shared/external/kvm-unit-tests-1da1819e.tar.xz  ->  ./configure && make -j2
# Exit codes: 0 built (or already built), 77 skipped (no tarball, or gcc/make/tar/xz missing:
# said loudly on stderr), 1 the build failed. Under CI=true a missing tool is installed with
# apt-get when possible, and otherwise a failure (exit 1), never a skip.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dest=${1:-$repo/target/kvm-unit-tests}
tarball=${KUT_TARBALL:-$repo/../shared/external/kvm-unit-tests-1da1819e.tar.xz}
stamp=$dest/.built-1da1819e

skip() {
    echo "################################################################" >&2
    echo "# kvm-unit-tests SKIPPED: $*" >&2
    echo "################################################################" >&2
    if [ "${CI:-}" = "true" ]; then
        echo "# under CI=true this is a failure" >&2
        exit 1
    fi
    exit 77
}

[ -f "$stamp" ] && exit 0
[ -f "$tarball" ] || skip "no tarball at $tarball"
missing=()
for t in gcc make tar xz ld objcopy; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ] && [ "${CI:-}" = "true" ] && command -v apt-get >/dev/null 2>&1; then
    echo "kvm-unit-tests: installing gcc make xz-utils binutils (missing: ${missing[*]})" >&2
    (apt-get update -qq && apt-get install -y -qq gcc make xz-utils binutils) >&2
    missing=()
    for t in gcc make tar xz ld objcopy; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
fi
[ ${#missing[@]} -eq 0 ] || skip "missing tools: ${missing[*]} (apt-get install gcc make xz-utils binutils)"

rm -rf "$dest"
mkdir -p "$dest" || exit 1
tar xJf "$tarball" -C "$dest" || { echo "kvm-unit-tests: cannot unpack $tarball" >&2; exit 1; }
cd "$dest/kvm-unit-tests" || exit 1
if ! (./configure && make -j2) >"$dest/build.log" 2>&1; then
    echo "kvm-unit-tests: the build failed; the end of $dest/build.log:" >&2
    tail -20 "$dest/build.log" >&2
    exit 1
fi
touch "$stamp"
