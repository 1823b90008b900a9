//! `bulwark audit verify` on a log whose files an attacker wrote. The
//! input is up to 3 files separated by 0xFF bytes (never in UTF-8 JSON).
//! So that mutations get past the hash chain and the MACs to the checks
//! behind them, placeholders are filled in before writing:
//! `"prev":"@"` becomes the hash of the line before, and a line ending in
//! `,"mac":"@"}` gets its MAC under the fuzz key. The first byte says
//! whether to verify with the key (odd) or without. Verification must
//! return a report or the first problem, never panic; with and without
//! the key the verdicts differ only where a MAC decides.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use aws_lc_rs::{digest, hmac};
use bulwark_sidecar::audit::{GENESIS, Problem, VerifyError, verify};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzz-audit-key-0123456789abcdef";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = base.join(format!("bulwark-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("fuzz scratch dir");
        d
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fills in the placeholders, line by line, across files.
fn fix_up(files: Vec<&[u8]>) -> Vec<Vec<u8>> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
    let mut prev = GENESIS.to_string();
    files
        .into_iter()
        .map(|f| {
            let mut out = Vec::new();
            for (i, line) in f.split(|b| *b == b'\n').enumerate() {
                if i > 0 {
                    out.push(b'\n');
                }
                let mut line = replace(
                    line,
                    b"\"prev\":\"@\"",
                    format!("\"prev\":\"{prev}\"").as_bytes(),
                );
                if let Some(body) = line.strip_suffix(b",\"mac\":\"@\"}") {
                    let mut signed = body.to_vec();
                    signed.push(b'}');
                    let tag = hmac::sign(&key, &signed);
                    let mut l = body.to_vec();
                    l.extend_from_slice(format!(",\"mac\":\"{}\"}}", hex(tag.as_ref())).as_bytes());
                    line = l;
                }
                prev = hex(digest::digest(&digest::SHA256, &line).as_ref());
                out.extend_from_slice(&line);
            }
            out
        })
        .collect()
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    match hay.windows(from.len()).position(|w| w == from) {
        Some(i) => [&hay[..i], to, &hay[i + from.len()..]].concat(),
        None => hay.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let files = fix_up(rest.split(|b| *b == 0xFF).take(3).collect());
    let dir = dir();
    for e in std::fs::read_dir(dir).expect("scratch dir") {
        let _ = std::fs::remove_file(e.expect("entry").path());
    }
    let mut paths = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let p = dir.join(format!("audit-{:06}.jsonl", i + 1));
        std::fs::write(&p, f).expect("write scratch file");
        paths.push(p);
    }
    let with_key = verify(&paths, (mode & 1 == 1).then_some(KEY));
    let without = verify(&paths, None);
    match (&with_key, &without) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                (a.records, a.first_seq, a.last_seq),
                (b.records, b.first_seq, b.last_seq)
            );
            assert_eq!(a.head, b.head);
        }
        (
            Err(VerifyError::Invalid {
                problem: Problem::Mac,
                ..
            }),
            _,
        ) => {}
        // A retention marker with a bad MAC accounts for nothing with the
        // key, but does without it.
        (
            Err(VerifyError::Invalid {
                problem: Problem::UnaccountedStart { .. },
                ..
            }),
            _,
        ) => {}
        (
            Err(VerifyError::Invalid {
                problem: pa,
                line: la,
                ..
            }),
            Err(VerifyError::Invalid {
                problem: pb,
                line: lb,
                ..
            }),
        ) => {
            // Without the key the same first problem, unless the key found
            // a MAC problem earlier (handled above).
            assert_eq!((pa, la), (pb, lb));
        }
        (Ok(_), Err(e)) => panic!("passes with the key but not without: {e}"),
        (a, b) => panic!("unexpected pair: {a:?} / {b:?}"),
    }
});
