//! Writes `libcmm.pc` next to `libcmm.so`/`libcmm.a` in the build's profile directory, so C
//! programs can build against an uninstalled tree:
//! `PKG_CONFIG_PATH=target/release pkg-config --cflags --libs libcmm`.
//! (`cmm-lib/install.sh` installs the library, header and a .pc file for a prefix.)

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=include/libcmm.h");
    let (Some(out), Some(manifest)) = (std::env::var_os("OUT_DIR"), std::env::var_os("CARGO_MANIFEST_DIR"))
    else {
        return;
    };
    // OUT_DIR is <target>/<profile>/build/cmm-<hash>/out.
    let Some(profile_dir) = PathBuf::from(out).ancestors().nth(3).map(PathBuf::from) else { return };
    let include = PathBuf::from(manifest).join("include");
    let pc = format!(
        "libdir={}\nincludedir={}\n\nName: libcmm\nDescription: Intentional networking: the cmm API\nVersion: {}\n\
         Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -lcmm\nLibs.private: -lpthread -ldl -lm -lrt -lgcc_s\n\
         Cflags: -I${{includedir}}\n",
        profile_dir.display(),
        include.display(),
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
    // Best effort: a read-only target directory only loses the convenience file.
    let _ = std::fs::write(profile_dir.join("libcmm.pc"), pc);
}
