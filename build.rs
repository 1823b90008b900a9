//! Release link layout of the `bulwark` program.
//!
//! - `src/link/hot-text.order` (written by `tests/perf/text_order.sh`) lists
//!   the functions a sidecar runs; the linker puts them together at the start
//!   of `.text`. The kernel maps text 64 KiB around each page first run, so a
//!   sidecar's functions spread over the whole 20 MB kept 12-13 MB of it
//!   resident in every pod; packed, they need about a third of that.
//! - Fat LTO names the copies of a function that several crates inlined
//!   `<name>.<number>`, and any code change renumbers them. The file keeps
//!   the names as traced; the link gets them without the number, and a
//!   linker script that puts every numbered copy of those functions, whatever
//!   its number now, just before `.text`, next to the ordered ones. Without
//!   it, a one-line change left 22 hot copies in cold text, and an idle
//!   sidecar held 8.4-8.6 MB instead of 8.0-8.1 MB.
//! - Relative relocations are packed (`DT_RELR`): 0.8 MB of `.rela.dyn`,
//!   all read at start-up, becomes a few kilobytes.
//!
//! Both need LLD (the default linker of rustup's rustc 1.90 and later on
//! x86_64-unknown-linux-gnu) and, for `DT_RELR`, glibc 2.36 or later. Rather
//! than guess, a release build links and runs an empty program with the same
//! compiler, flags and arguments first; if that fails, or when cross
//! compiling, or with `BULWARK_LINK_LAYOUT=0`, the program links as before
//! (with a warning saying why).
use std::{
    collections::HashSet,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("src/link/hot-text.order");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=BULWARK_LINK_LAYOUT");
    // Test and debug builds link many programs; the layout is for releases.
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let mut args = vec!["-Wl,-z,pack-relative-relocs".to_string()];
    let mut script_arg = None;
    if order.exists() {
        let out = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
        match layout_files(&order, &out) {
            Ok((symbols, script)) => {
                args.push(format!("-Wl,--symbol-ordering-file={}", symbols.display()));
                // Names the program no longer has (renamed functions) are skipped.
                args.push("-Wl,--no-warn-symbol-ordering".into());
                if let Some(script) = script {
                    let arg = format!("-Wl,{}", script.display());
                    args.push(arg.clone());
                    script_arg = Some(arg);
                }
            }
            Err(e) => println!("cargo:warning=hot text order not applied: {e}"),
        }
    }
    let mut checked = check(&args);
    // A linker that takes the ordering file but not the script still gets
    // the rest of the layout.
    if let (Err(why), Some(arg)) = (&checked, &script_arg) {
        let without: Vec<String> = args.iter().filter(|a| *a != arg).cloned().collect();
        if check(&without).is_ok() {
            println!("cargo:warning=numbered copies not placed: {why}");
            args = without;
            checked = Ok(());
        }
    }
    match checked {
        Ok(()) => {
            for a in &args {
                println!("cargo:rustc-link-arg-bin=bulwark={a}");
            }
        }
        Err(why) => println!("cargo:warning=release link layout not applied: {why}"),
    }
}

/// Writes, in `out`, the ordering file the linker reads (names without LTO's
/// copy numbers, each once, in the traced order) and, when some names had a
/// number, a script placing every numbered copy of them.
fn layout_files(order: &Path, out: &Path) -> Result<(PathBuf, Option<PathBuf>), String> {
    let text = fs::read_to_string(order).map_err(|e| format!("{}: {e}", order.display()))?;
    let (mut names, mut copies) = (Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Only Rust's mangled names (`_ZN`, `_R`) get LTO numbers; a C
        // function's `.part.0` or `.constprop.0` is its real, stable name.
        let rust = line.starts_with("_ZN") || line.starts_with("_R");
        let (name, numbered) = match line.rsplit_once('.') {
            Some((base, n)) if rust && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                (base, true)
            }
            _ => (line, false),
        };
        if seen.insert(name) {
            names.push(name);
        }
        // A name with a glob or script character cannot be a pattern as is;
        // mangled names have none, so such a line is simply not globbed.
        let plain = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_$.".contains(&b));
        if numbered && plain && !copies.contains(&name) {
            copies.push(name);
        }
    }
    let symbols = out.join("hot-text.symbols");
    fs::write(&symbols, names.join("\n") + "\n").map_err(|e| e.to_string())?;
    if copies.is_empty() {
        return Ok((symbols, None));
    }
    // Rust puts each function in its own `.text.<symbol>` input section.
    let mut script = String::from("SECTIONS {\n  .text.hot_copies : {\n");
    for name in &copies {
        script.push_str(&format!("    *(.text.{name}.*)\n"));
    }
    script.push_str("  }\n} INSERT BEFORE .text;\n");
    let path = out.join("hot-copies.ld");
    fs::write(&path, script).map_err(|e| e.to_string())?;
    Ok((symbols, Some(path)))
}

/// Links and runs an empty program as the real one will be linked.
fn check(args: &[String]) -> Result<(), String> {
    if env::var("BULWARK_LINK_LAYOUT").as_deref() == Ok("0") {
        return Err("BULWARK_LINK_LAYOUT=0".into());
    }
    let (target, host) = (env::var("TARGET"), env::var("HOST"));
    if target != host {
        return Err("cross compiling: the probe program could not run".into());
    }
    if target.as_deref() != Ok("x86_64-unknown-linux-gnu") {
        return Err(format!(
            "target {target:?}: only x86_64-unknown-linux-gnu is laid out"
        ));
    }
    let out = env::var("OUT_DIR").map_err(|e| e.to_string())?;
    let dir = Path::new(&out);
    let src = dir.join("layout_probe.rs");
    let bin = dir.join("layout_probe");
    std::fs::write(&src, "fn main() {}\n").map_err(|e| e.to_string())?;
    let mut rustc = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    // The empty program must not fail on the user's lint flags.
    rustc.arg("--cap-lints=allow");
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    for a in args {
        rustc.arg(format!("-Clink-arg={a}"));
    }
    // In OUT_DIR, with any coverage or profile data it writes kept there.
    let profile = dir.join("layout_probe-%p.profraw");
    let built = rustc
        .current_dir(dir)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    if !built.status.success() {
        let err = String::from_utf8_lossy(&built.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        return Err(format!("the linker refused it (not LLD?): {tail}"));
    }
    let ran = Command::new(&bin)
        .current_dir(dir)
        .env("LLVM_PROFILE_FILE", &profile)
        .output()
        .map_err(|e| format!("the probe program did not start: {e}"))?;
    if !ran.status.success() {
        return Err(format!(
            "the probe program failed (glibc older than 2.36?): {}",
            String::from_utf8_lossy(&ran.stderr).trim()
        ));
    }
    Ok(())
}
