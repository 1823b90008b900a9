//! The issuance record: one JSON line per issuance or refusal, appended to
//! `issued.jsonl` in the CA directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

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
}

#[derive(Debug)]
pub struct IssuanceLog {
    file: Mutex<File>,
}

impl IssuanceLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends one record. A failure to write is logged, not fatal: refusing
    /// all signing because the disk is full would take the mesh down.
    pub fn append(&self, mut rec: Record) {
        if rec.time.is_empty() {
            rec.time = now_rfc3339();
        }
        let mut line = serde_json::to_vec(&rec).expect("record serializes");
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(&line) {
            tracing::error!(error = %e, "cannot append to the issuance record");
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
