//! The issuance record: one JSON line per issuance or refusal, appended to
//! `issued.jsonl` in the CA directory.
//!
//! Anyone who can reach the CA can make it refuse, so refusals must not
//! be able to fill its disk or push issuances out of the record: refusals
//! are recorded at a bounded rate (the next one recorded says how many
//! were not), and at [`MAX_LOG_BYTES`] the file moves to `issued.jsonl.1`
//! (replacing the previous one) and a new one starts.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize, Default)]
pub struct Record {
    /// RFC 3339 time of the decision.
    pub time: String,
    /// The identity asked for (from the CSR) or authenticated, if known.
    pub identity: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    /// `token`, `mtls` or `none`.
    pub auth: &'static str,
    pub peer: Option<String>,
    /// `issued` or `refused`.
    pub outcome: &'static str,
    /// gRPC status code name for refusals.
    pub code: Option<&'static str>,
    pub reason: Option<String>,
    /// Bootstrap token id, when a token was used.
    pub token_id: Option<String>,
    /// Refusals not recorded (over the rate) since the last one that was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusals_not_recorded: Option<u64>,
}

/// Longest identity or reason kept in a record: both may come from an
/// unverified certificate or request.
pub const MAX_FIELD: usize = 512;

fn clip(field: &mut Option<String>) {
    if let Some(f) = field
        && f.len() > MAX_FIELD
    {
        let mut end = MAX_FIELD;
        while !f.is_char_boundary(end) {
            end -= 1;
        }
        f.truncate(end);
        f.push('…');
    }
}

/// Size at which `issued.jsonl` moves to `issued.jsonl.1`.
pub const MAX_LOG_BYTES: u64 = 16 << 20;
/// Refusals recorded per second, sustained, and in a burst.
pub const REFUSALS_PER_SEC: f64 = 20.0;
pub const REFUSAL_BURST: f64 = 100.0;

#[derive(Debug)]
pub struct IssuanceLog {
    path: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: File,
    /// Bytes in the current file (this process's view).
    len: u64,
    tokens: f64,
    refilled: Instant,
    not_recorded: u64,
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl IssuanceLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with_limit(path, MAX_LOG_BYTES)
    }

    /// The same, moving the file aside at `max_bytes`.
    pub fn open_with_limit(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            max_bytes,
            inner: Mutex::new(Inner {
                file,
                len,
                tokens: REFUSAL_BURST,
                refilled: Instant::now(),
                not_recorded: 0,
            }),
        })
    }

    /// Appends one record; false when a refusal over the rate was counted
    /// instead. A failure to write is logged, not fatal: refusing all
    /// signing because the disk is full would take the mesh down.
    pub fn append(&self, mut rec: Record) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if rec.outcome == "refused" {
            let now = Instant::now();
            let earned = now.duration_since(inner.refilled).as_secs_f64() * REFUSALS_PER_SEC;
            inner.tokens = (inner.tokens + earned).min(REFUSAL_BURST);
            inner.refilled = now;
            if inner.tokens < 1.0 {
                inner.not_recorded += 1;
                return false;
            }
            inner.tokens -= 1.0;
        }
        if inner.not_recorded > 0 {
            rec.refusals_not_recorded = Some(std::mem::take(&mut inner.not_recorded));
        }
        if rec.time.is_empty() {
            rec.time = now_rfc3339();
        }
        clip(&mut rec.identity);
        clip(&mut rec.reason);
        let mut line = serde_json::to_vec(&rec).expect("record serializes");
        line.push(b'\n');
        if inner.len > 0 && inner.len + line.len() as u64 > self.max_bytes {
            self.rotate(&mut inner);
        }
        match inner.file.write_all(&line) {
            Ok(()) => inner.len += line.len() as u64,
            Err(e) => tracing::error!(error = %e, "cannot append to the issuance record"),
        }
        true
    }

    /// Moves the full file to `<name>.1` and starts a new one. On failure
    /// the record goes on growing the old file: better than losing it.
    fn rotate(&self, inner: &mut Inner) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let moved = std::fs::rename(&self.path, &old).and_then(|()| open_append(&self.path));
        match moved {
            Ok(file) => {
                inner.file = file;
                inner.len = 0;
                tracing::info!(path = %self.path.display(), "issuance record full; moved to .1");
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot move the full issuance record aside")
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn refusal() -> Record {
        Record {
            auth: "none",
            outcome: "refused",
            ..Default::default()
        }
    }

    #[test]
    fn a_flood_of_refusals_is_counted_not_recorded_and_issuances_always_are() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.jsonl");
        let log = IssuanceLog::open(&path).unwrap();
        let written = (0..1000).filter(|_| log.append(refusal())).count();
        // The burst, and what the rate earned while the loop ran.
        assert!((100..110).contains(&written), "{written}");
        let issued = Record {
            auth: "token",
            outcome: "issued",
            ..Default::default()
        };
        assert!(log.append(issued));
        let recs = lines(&path);
        assert_eq!(recs.len(), written + 1);
        let last = recs.last().unwrap();
        assert_eq!(last["outcome"], "issued");
        assert_eq!(last["refusals_not_recorded"], (1000 - written) as u64);
        // Only the record after the gap carries the count.
        assert!(recs[0].get("refusals_not_recorded").is_none());
    }

    #[test]
    fn long_identities_and_reasons_are_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.jsonl");
        let log = IssuanceLog::open(&path).unwrap();
        log.append(Record {
            identity: Some("é".repeat(2000)),
            reason: Some("x".repeat(5000)),
            ..refusal()
        });
        let rec = &lines(&path)[0];
        assert!(rec["identity"].as_str().unwrap().len() <= MAX_FIELD + 3);
        assert!(rec["reason"].as_str().unwrap().len() <= MAX_FIELD + 3);
    }

    #[test]
    fn a_full_record_moves_aside_and_a_new_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("issued.jsonl");
        let log = IssuanceLog::open_with_limit(&path, 1000).unwrap();
        let issued = |i: usize| Record {
            auth: "mtls",
            outcome: "issued",
            serial: Some(format!("{i:032x}")),
            ..Default::default()
        };
        for i in 0..30 {
            log.append(issued(i));
        }
        let old = lines(&dir.path().join("issued.jsonl.1"));
        let new = lines(&path);
        assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        assert!(!old.is_empty() && !new.is_empty());
        // Nothing lost across the move, in order: the last file moved aside
        // and the current one hold the most recent records.
        let serials: Vec<String> = old
            .iter()
            .chain(&new)
            .map(|r| r["serial"].as_str().unwrap().to_string())
            .collect();
        let first = 30 - serials.len();
        let want: Vec<String> = (first..30).map(|i| format!("{i:032x}")).collect();
        assert_eq!(serials, want);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
