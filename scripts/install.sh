#!/usr/bin/env bash
# Installs the release build of distcore into PREFIX (default: build/prefix):
#   PREFIX/lib/libdistcore.so.X.Y.Z with the usual links libdistcore.so.X (the
#   SONAME) and libdistcore.so, PREFIX/lib/libdistcore.a,
#   PREFIX/include/distcore.h and distcore.hpp, PREFIX/bin/distcore,
#   PREFIX/lib/cmake/distcore/ (find_package) and PREFIX/lib/pkgconfig/distcore.pc.
# Run `cargo build --release` first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=$(mkdir -p "${1:-$root/build/prefix}" && cd "${1:-$root/build/prefix}" && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
release="$root/target/release"

install -d "$prefix/lib/cmake/distcore" "$prefix/lib/pkgconfig" "$prefix/include" "$prefix/bin"
major=${version%%.*}
install -m 755 "$release/libdistcore.so" "$prefix/lib/libdistcore.so.$version"
ln -sf "libdistcore.so.$version" "$prefix/lib/libdistcore.so.$major"
ln -sf "libdistcore.so.$major" "$prefix/lib/libdistcore.so"
install -m 644 "$release/libdistcore.a" "$prefix/lib/"
install -m 755 "$release/distcore" "$prefix/bin/"
install -m 644 "$root/include/distcore.h" "$prefix/include/"
install -m 644 "$root/include/distcore.hpp" "$prefix/include/"
sed "s|@MAJOR@|$major|g" "$root/cmake/distcoreConfig.cmake.in" \
  > "$prefix/lib/cmake/distcore/distcoreConfig.cmake"
sed "s|@VERSION@|$version|g" "$root/cmake/distcoreConfigVersion.cmake.in" \
  > "$prefix/lib/cmake/distcore/distcoreConfigVersion.cmake"
sed -e "s|@VERSION@|$version|g" -e "s|@PREFIX@|$prefix|g" "$root/cmake/distcore.pc.in" \
  > "$prefix/lib/pkgconfig/distcore.pc"
echo "installed distcore $version into $prefix"
