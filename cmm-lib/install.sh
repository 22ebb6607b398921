#!/bin/sh
# Installs libcmm (library, header, pkg-config file) under a prefix.
#   cargo build --release -p cmm && sudo cmm-lib/install.sh /usr/local
# Then:  cc app.c $(pkg-config --cflags --libs libcmm)
set -eu
prefix=${1:-/usr/local}
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../target}/${PROFILE:-release}
[ -f "$target/libcmm.so" ] || { echo "install.sh: $target/libcmm.so not found; run cargo build --release -p cmm" >&2; exit 1; }
libdir=$prefix/lib
mkdir -p "$libdir/pkgconfig" "$prefix/include"
cp "$target/libcmm.so" "$target/libcmm.a" "$libdir/"
cp "$here/include/libcmm.h" "$prefix/include/"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n 1)
cat > "$libdir/pkgconfig/libcmm.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: libcmm
Description: Intentional networking: the cmm API
Version: $version
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -lcmm
Libs.private: -lpthread -ldl -lm -lrt -lgcc_s
Cflags: -I\${includedir}
PC
echo "installed libcmm $version under $prefix"
