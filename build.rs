//! Release link layout of the `bulwark` program.
//!
//! - `src/link/hot-text.order` (written by `tests/perf/text_order.sh`) lists
//!   the functions a sidecar runs; the linker puts them together at the start
//!   of `.text`. The kernel maps text 64 KiB around each page first run, so a
//!   sidecar's functions spread over the whole 20 MB kept 12-13 MB of it
//!   resident in every pod; packed, they need about a third of that.
//! - Relative relocations are packed (`DT_RELR`): 0.8 MB of `.rela.dyn`,
//!   all read at start-up, becomes a few kilobytes.
//!
//! Both need LLD, the default linker of rustc 1.90 and later on
//! x86_64-unknown-linux-gnu. Elsewhere, or with another linker chosen, or with
//! `BULWARK_LINK_LAYOUT=0`, the program links as before.
use std::{env, path::Path, process::Command};

fn main() {
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("src/link/hot-text.order");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=BULWARK_LINK_LAYOUT");
    if let Some(why) = skip_reason() {
        if env::var("PROFILE").as_deref() == Ok("release") {
            println!("cargo:warning=release link layout not applied: {why}");
        }
        return;
    }
    let arg = |a: &str| println!("cargo:rustc-link-arg-bin=bulwark={a}");
    arg("-Wl,-z,pack-relative-relocs");
    if order.exists() {
        arg(&format!("-Wl,--symbol-ordering-file={}", order.display()));
        // Names the program no longer has (renamed functions) are skipped.
        arg("-Wl,--no-warn-symbol-ordering");
    }
}

/// Why the layout cannot be applied to this build, if it cannot.
fn skip_reason() -> Option<String> {
    // Test and debug builds link many programs; the layout is for releases.
    if env::var("PROFILE").as_deref() != Ok("release") {
        return Some("not a release build".into());
    }
    if env::var("BULWARK_LINK_LAYOUT").as_deref() == Ok("0") {
        return Some("BULWARK_LINK_LAYOUT=0".into());
    }
    let target = ["ARCH", "OS", "ENV"]
        .map(|k| env::var(format!("CARGO_CFG_TARGET_{k}")).unwrap_or_default());
    if target != ["x86_64", "linux", "gnu"] {
        return Some(format!(
            "target {target:?} does not link with LLD by default"
        ));
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker")
        || env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
    {
        return Some("a linker is chosen explicitly".into());
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.lines()
                .find_map(|l| l.strip_prefix("release: ").map(str::to_owned))
        });
    let minor = version
        .as_deref()
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m >= 90 => None,
        _ => Some(format!(
            "rustc {version:?} links with the system linker, not LLD"
        )),
    }
}
