//! Tamper-evident audit log of authorization decisions: who (SPIFFE ID)
//! called which service, method and path, when, whether it was allowed,
//! and which policy decided.
//!
//! # On disk
//!
//! A directory of JSON-lines files, `audit-000001.jsonl`,
//! `audit-000002.jsonl`, ... (mode 0600), rotated when a file would grow past
//! [`AuditOptions::max_file_bytes`]. Each line is one JSON object:
//!
//! ```text
//! {"seq":7,"prev":"<hex SHA-256 of line 6>","kind":"access","time":"2025-05-01T12:00:00.000Z",
//!  "source_identity":"spiffe://cluster.local/ns/default/sa/web","destination_identity":"...",
//!  "service":"default/api","method":"GET","path":"/v1/items","decision":"allow",
//!  "policy":"AuthorizationPolicy default/api-callers","mac":"<hex HMAC-SHA256>"}
//! ```
//!
//! - `seq` counts lines from 1 and continues across files.
//! - `prev` is the hex SHA-256 of the exact bytes of the previous line (without
//!   its newline), across file boundaries; the very first line has
//!   [`GENESIS`].
//! - `mac` is always the last field. It is the HMAC-SHA256, under the log's
//!   key, of the line's bytes up to (not including) `,"mac":` followed by `}`,
//!   i.e. of the line as it would read without the `mac` field. Because every
//!   `mac` also covers `prev`, somebody who can edit the files but does not
//!   hold the key cannot rewrite a record, or the chain after it, without
//!   verification noticing. Without the key, [`verify`] still checks the
//!   chain, which catches naive edits but not a chain recomputed from scratch.
//! - `kind` is `access` for an [`AuditRecord`] and `retention` for a
//!   [`RetentionMarker`]: when a rotated file is deleted because its last
//!   record is older than [`AuditOptions::retention`], a marker naming it,
//!   its last `seq` and the hash of its last line is appended first, so a
//!   chain that starts after the genesis is accounted for.
//!
//! # Use
//!
//! ```no_run
//! use bulwark_sidecar::audit::{self, AuditLog, AuditOptions, AuditRecord, Decision};
//! # fn main() -> Result<(), audit::AuditError> {
//! let key = audit::read_key_file("/etc/bulwark/audit.key".as_ref())?;
//! // `dropped` may be a counter registered in the sidecar's metrics.
//! let log = AuditLog::open("/var/log/bulwark".as_ref(), &key, AuditOptions::default())?;
//! log.record(AuditRecord {
//!     time: String::new(), // now
//!     source_identity: "spiffe://cluster.local/ns/default/sa/web".into(),
//!     destination_identity: "spiffe://cluster.local/ns/default/sa/api".into(),
//!     service: "default/api".into(),
//!     method: "GET".into(),
//!     path: "/v1/items".into(),
//!     decision: Decision::Deny,
//!     policy: "AuthorizationPolicy default/api-callers".into(),
//!     reason: Some("source not allowed".into()),
//!     subject: None,
//!     scopes: Vec::new(),
//! });
//! # Ok(()) }
//! ```
//!
//! # The keyed head
//!
//! Nothing follows the last line, so the chain alone cannot show that lines
//! were cut off the end. After every write the writer also records the head
//! of the log in [`HEAD_FILE`] (one line, rewritten in place):
//!
//! ```text
//! {"seq":9,"hash":"<hex SHA-256 of line 9>","file":"audit-000002.jsonl","mac":"<hex HMAC-SHA256>"}
//! ```
//!
//! where `mac` is the HMAC, under the log's key, of `seq`, `hash` and `file`.
//! [`verify`] reads the head beside the newest file given: a log that ends
//! before the head's `seq`, or whose line at that `seq` hashes differently,
//! was cut or rewritten. Without the key the head cannot be forged, only
//! deleted, which the report shows ([`VerifyReport::head`]). Reopening a log
//! whose head is ahead of its files refuses to resume (it would overwrite
//! the evidence).
//!
//! # Limits
//!
//! A write that lands in a file but not (yet) in the head leaves the head
//! one batch behind; that is not a problem, only the lines up to the head
//! are protected against removal. Strings longer than [`MAX_FIELD_BYTES`]
//! are cut to keep lines bounded.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, hmac};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

/// `prev` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// The keyed head beside the log files (see the module documentation).
pub const HEAD_FILE: &str = "audit.head";
/// The head is rewritten in place as one block of this size (space-padded),
/// so a reader never sees half of an old and half of a new head.
const HEAD_BYTES: usize = 256;
/// Shortest key [`AuditLog::open`] accepts.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest string kept in a record field; longer ones are cut (at a char boundary).
pub const MAX_FIELD_BYTES: usize = 4096;
const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 20;
const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 86400);
const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Retention also runs on rotation and on open; this catches quiet logs.
const RETENTION_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// Records written per batch (one `write` call) at most.
const MAX_BATCH: usize = 1024;
/// `,"mac":"` + 64 hex digits + `"}`.
const MAC_SUFFIX_LEN: usize = 8 + 64 + 2;

/// Whether the request was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

/// One authorization decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 time of the decision; [`AuditLog::record`] fills it in when empty.
    pub time: String,
    /// The caller's verified SPIFFE ID (empty for an unauthenticated caller).
    pub source_identity: String,
    /// This workload's SPIFFE ID.
    pub destination_identity: String,
    pub service: String,
    pub method: String,
    pub path: String,
    pub decision: Decision,
    /// What decided, e.g. `AuthorizationPolicy default/api-callers`, or `none`
    /// when no policy targets the service.
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a request from outside the mesh (through the gateway): the
    /// caller's authenticated subject (`issuer#sub`) and token scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}

/// Says that a rotated file was deleted by the retention policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionMarker {
    pub time: String,
    /// File name (no directory) of the deleted file.
    pub removed_file: String,
    /// `seq` of the deleted file's last line.
    pub removed_last_seq: u64,
    /// Hex SHA-256 of the deleted file's last line: the `prev` of the line
    /// that now starts the log.
    pub removed_last_hash: String,
}

/// What a line holds, tagged by its `kind` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Access(AuditRecord),
    Retention(RetentionMarker),
}

impl Entry {
    pub fn time(&self) -> &str {
        match self {
            Entry::Access(r) => &r.time,
            Entry::Retention(m) => &m.time,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// A file is rotated before a line would take it past this size
    /// (a single line longer than this still gets a file of its own).
    pub max_file_bytes: u64,
    /// Rotated files whose last record is older than this are deleted.
    pub retention: Duration,
    /// Records waiting for the writer; beyond this, records are dropped.
    pub queue_capacity: usize,
    /// Counts records that were not written: queue full, writer gone, or a
    /// failed write. Pass a counter registered in the metrics registry to
    /// export it.
    pub dropped: Counter,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            retention: DEFAULT_RETENTION,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            dropped: Counter::default(),
        }
    }
}

/// Why the log could not be opened or flushed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit key must be at least {MIN_KEY_BYTES} bytes, got {0}")]
    WeakKey(usize),
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: io::Error },
    /// The newest line could not be resumed from; `bulwark audit verify`
    /// says more.
    #[error("cannot resume the audit log: last line of {}: {problem}", path.display())]
    Damaged { path: PathBuf, problem: Problem },
    #[error("the audit writer has stopped")]
    WriterGone,
    #[error("{}: the audit key is readable by group or others (mode {mode:o}); chmod 600 it", path.display())]
    KeyFileMode { path: PathBuf, mode: u32 },
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("truncated: the last line is incomplete (no newline)")]
    Truncated,
    #[error("not an audit line: {0}")]
    Malformed(String),
    #[error("seq {found} where {expected} was expected: {}", seq_hint(.found, .expected))]
    Seq { expected: u64, found: u64 },
    #[error(
        "prev does not match the hash of the line before it: a record was edited, removed or reordered"
    )]
    Prev,
    #[error("mac does not match: the line was edited, or the key is wrong")]
    Mac,
    #[error(
        "the log starts at seq {seq} but no retention record accounts for the records before it: records were removed"
    )]
    UnaccountedStart { seq: u64 },
    #[error(
        "the log ends at seq {last} but its keyed head ({HEAD_FILE}) says seq {head} was written: records at the end were removed (or the newest files were not given)"
    )]
    TailRemoved { last: u64, head: u64 },
    #[error(
        "the line at seq {seq} is not the one the keyed head ({HEAD_FILE}) recorded: the log was rewritten"
    )]
    HeadMismatch { seq: u64 },
    #[error("{HEAD_FILE} is not a valid head: {0}")]
    BadHead(String),
}

fn seq_hint(found: &u64, expected: &u64) -> &'static str {
    if found > expected {
        "records are missing or reordered"
    } else {
        "records are reordered or repeated"
    }
}

/// Why verification failed: the first problem, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}:{line}: {problem}", file.display())]
    Invalid {
        file: PathBuf,
        line: u64,
        problem: Problem,
    },
    #[error("{}: {error}", file.display())]
    Io { file: PathBuf, error: io::Error },
}

/// What a successful [`verify`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub files: usize,
    /// Lines (access records and retention markers).
    pub records: u64,
    /// 0 when there are no records.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Hex SHA-256 of the last line: the `prev` of the next one.
    pub head: String,
    /// Whether every line's `mac` was checked (a key was given).
    pub mac_checked: bool,
    /// Whether the log starts after files deleted by retention.
    pub starts_after_retention: bool,
    /// The keyed head's seq, when [`HEAD_FILE`] was found beside the newest
    /// file and the log reaches it (its mac checked when a key was given).
    pub head_seq: Option<u64>,
}

enum Msg {
    Record(Box<Entry>),
    Flush(SyncSender<io::Result<()>>),
}

/// An open audit log. Records go through a bounded queue to a writer
/// thread, so [`AuditLog::record`] never blocks the request path. Dropping
/// the log writes what is queued and stops the writer.
#[derive(Debug)]
pub struct AuditLog {
    tx: Option<SyncSender<Msg>>,
    writer: Option<JoinHandle<()>>,
    dropped: Counter,
    dir: PathBuf,
}

impl AuditLog {
    /// Opens (or creates, mode 0700) the log in `dir` and resumes the chain
    /// from the last line of the newest file, which must verify under `key`.
    pub fn open(dir: &Path, key: &[u8], opts: AuditOptions) -> Result<AuditLog, AuditError> {
        if key.len() < MIN_KEY_BYTES {
            return Err(AuditError::WeakKey(key.len()));
        }
        let io_err = |error| AuditError::Io {
            path: dir.to_path_buf(),
            error,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let files = list_log_files(dir).map_err(io_err)?;
        let (seq, head) = resume(&files, &key)?;
        let index = files.last().map(|(i, _)| *i).unwrap_or(1);
        let head_path = dir.join(HEAD_FILE);
        let damaged = |problem| AuditError::Damaged {
            path: head_path.clone(),
            problem,
        };
        // A head ahead of the files means records were cut off the end while
        // the log was closed: resuming would overwrite that evidence.
        if let Some(h) = read_head(&head_path, Some(&key)).map_err(damaged)? {
            if h.seq > seq {
                return Err(damaged(Problem::TailRemoved {
                    last: seq,
                    head: h.seq,
                }));
            }
            if h.seq == seq && h.hash != head {
                return Err(damaged(Problem::HeadMismatch { seq }));
            }
        }
        let head_file = open_head(dir).map_err(io_err)?;
        let last_file = files
            .iter()
            .rev()
            .find(|(_, p)| p.metadata().is_ok_and(|m| m.len() > 0))
            .map_or_else(|| file_name(index), |(i, _)| file_name(*i));
        write_head(&head_file, &key, seq, &head, &last_file).map_err(io_err)?;
        let path = dir.join(file_name(index));
        let file = open_append(&path).map_err(|error| AuditError::Io {
            path: path.clone(),
            error,
        })?;
        let size = file
            .metadata()
            .map_err(|error| AuditError::Io {
                path: path.clone(),
                error,
            })?
            .len();
        tracing::info!(dir = %dir.display(), file = %path.display(), seq, "audit log opened");
        let (tx, rx) = mpsc::sync_channel(opts.queue_capacity.max(1));
        let writer = Writer {
            dir: dir.to_path_buf(),
            key,
            max_file_bytes: opts.max_file_bytes.max(1),
            retention: opts.retention,
            dropped: opts.dropped.clone(),
            index,
            file,
            size,
            seq,
            committed: (seq, head.clone()),
            head,
            pending: Vec::new(),
            pending_records: 0,
            retention_due: true,
            head_file,
        };
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err)?;
        Ok(AuditLog {
            tx: Some(tx),
            writer: Some(handle),
            dropped: opts.dropped,
            dir: dir.to_path_buf(),
        })
    }

    /// Queues a record for the writer and returns at once. When the queue is
    /// full (or the writer has stopped) the record is dropped and counted in
    /// [`AuditLog::dropped`] (and the `dropped` counter of the options): an
    /// audit backlog must never stall requests. Fills in an empty `time`
    /// and cuts fields longer than [`MAX_FIELD_BYTES`].
    pub fn record(&self, mut rec: AuditRecord) {
        if rec.time.is_empty() {
            rec.time = rfc3339(SystemTime::now());
        }
        for s in [
            &mut rec.source_identity,
            &mut rec.destination_identity,
            &mut rec.service,
            &mut rec.method,
            &mut rec.path,
            &mut rec.policy,
        ] {
            cap(s);
        }
        if let Some(r) = &mut rec.reason {
            cap(r);
        }
        let sent = match &self.tx {
            Some(tx) => tx.try_send(Msg::Record(Box::new(Entry::Access(rec)))),
            None => return,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = sent {
            let n = self.dropped.inc() + 1;
            // Logging every drop would add load exactly when there is too much.
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "audit queue full or writer stopped; records dropped"
                );
            }
        }
    }

    /// Waits until every record queued before this call is written and
    /// synced to disk. Blocks: not for the request path.
    pub fn flush(&self) -> Result<(), AuditError> {
        let tx = self.tx.as_ref().ok_or(AuditError::WriterGone)?;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(done_tx))
            .map_err(|_| AuditError::WriterGone)?;
        done_rx
            .recv()
            .map_err(|_| AuditError::WriterGone)?
            .map_err(|error| AuditError::Io {
                path: self.dir.clone(),
                error,
            })
    }

    /// Records dropped so far (see [`AuditLog::record`]).
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Closing the queue makes the writer drain it and exit.
        drop(self.tx.take());
        if let Some(w) = self.writer.take()
            && w.join().is_err()
        {
            tracing::error!("audit writer panicked");
        }
    }
}

/// Reads a key file: hex (trailing whitespace allowed) when it is all hex
/// digits, otherwise its raw bytes. The sidecar and `bulwark audit verify`
/// read keys the same way.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, AuditError> {
    let io_err = |error| AuditError::Io {
        path: path.to_path_buf(),
        error,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    // Anyone who can read the key can forge a consistent log.
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuditError::KeyFileMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(parse_key(&std::fs::read(path).map_err(io_err)?))
}

/// See [`read_key_file`].
pub fn parse_key(raw: &[u8]) -> Vec<u8> {
    let t = raw.trim_ascii();
    if !t.is_empty() && t.len().is_multiple_of(2) && t.iter().all(u8::is_ascii_hexdigit) {
        t.chunks(2)
            .map(|p| (hex_val(p[0]) << 4) | hex_val(p[1]))
            .collect()
    } else {
        raw.to_vec()
    }
}

/// Verifies a log: every line is complete JSON with a `mac` last, `seq`
/// continues by one, `prev` is the hash of the line before, the log starts
/// at the genesis or right after files a retention marker accounts for, and,
/// with `key`, every `mac`. Files are taken in name order (numerically for
/// `audit-N.jsonl`), whatever order they are given in. Reports the first
/// problem by file and line. On a live log the newest line may still be
/// being written (reported as truncated); verify after [`AuditLog::flush`]
/// or leave out the current file.
pub fn verify(files: &[PathBuf], key: Option<&[u8]>) -> Result<VerifyReport, VerifyError> {
    let key = key.map(|k| hmac::Key::new(hmac::HMAC_SHA256, k));
    // `DIR/*` names the head too: it is read beside the newest file anyway.
    let mut files: Vec<PathBuf> = files
        .iter()
        .filter(|p| p.file_name().is_none_or(|n| n != HEAD_FILE))
        .cloned()
        .collect();
    files.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (log_index(&name).unwrap_or(u32::MAX), name, p.clone())
    });
    let mut chain = Chain::default();
    // Checked after the lines: a wrong key is reported at the first line.
    let head = files.last().map(|newest| {
        let path = newest.parent().unwrap_or(Path::new(".")).join(HEAD_FILE);
        let head = read_head(&path, key.as_ref());
        (path, head)
    });
    chain.want = match &head {
        Some((_, Ok(Some(h)))) => Some(h.seq),
        _ => None,
    };
    let mut first_error: Option<VerifyError> = None;
    let mut end = (PathBuf::new(), 0u64);
    for file in &files {
        let io_err = |error| VerifyError::Io {
            file: file.clone(),
            error,
        };
        let mut r = BufReader::new(File::open(file).map_err(io_err)?);
        let mut buf = Vec::new();
        let mut line_no = 0u64;
        loop {
            buf.clear();
            if r.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
                break;
            }
            line_no += 1;
            let result = match buf.pop() {
                Some(b'\n') => chain.check(&buf, key.as_ref(), file, line_no),
                _ => Err(Problem::Truncated),
            };
            if let Err(problem) = result {
                if first_error.is_none() {
                    first_error = Some(VerifyError::Invalid {
                        file: file.clone(),
                        line: line_no,
                        problem,
                    });
                }
                // Keep reading: a retention marker further on may still
                // decide whether the log's start is the first problem.
                chain.broken = true;
            }
        }
        end = (file.clone(), line_no + 1);
    }
    let mut starts_after_retention = false;
    if let Some(start) = &chain.start
        && !(start.seq == 1 && start.prev == GENESIS)
    {
        let accounted = start
            .seq
            .checked_sub(1)
            .is_some_and(|s| chain.markers.contains(&(s, start.prev.clone())));
        if !accounted {
            // Nothing comes before the start, so this is the first problem.
            return Err(VerifyError::Invalid {
                file: start.file.clone(),
                line: start.line,
                problem: Problem::UnaccountedStart { seq: start.seq },
            });
        }
        starts_after_retention = true;
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let last_seq = chain.last.as_ref().map(|(s, _)| *s).unwrap_or(0);
    let head = match head {
        Some((file, Err(problem))) => {
            return Err(VerifyError::Invalid {
                file,
                line: 1,
                problem,
            });
        }
        Some((_, Ok(h))) => h,
        None => None,
    };
    if let Some(h) = &head {
        let problem = if last_seq < h.seq {
            Some(Problem::TailRemoved {
                last: last_seq,
                head: h.seq,
            })
        } else if chain.found.as_deref().is_some_and(|f| f != h.hash) {
            Some(Problem::HeadMismatch { seq: h.seq })
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(VerifyError::Invalid {
                file: end.0,
                line: end.1,
                problem,
            });
        }
    }
    Ok(VerifyReport {
        files: files.len(),
        records: chain.records,
        first_seq: chain.start.as_ref().map(|s| s.seq).unwrap_or(0),
        last_seq: chain.last.as_ref().map(|(s, _)| *s).unwrap_or(0),
        head: chain
            .last
            .map(|(_, h)| h)
            .unwrap_or_else(|| GENESIS.to_string()),
        mac_checked: key.is_some(),
        starts_after_retention,
        head_seq: head.map(|h| h.seq),
    })
}

/// The keyed head on disk.
#[derive(Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
    file: String,
    mac: String,
}

fn head_mac(key: &hmac::Key, seq: u64, hash: &str, file: &str) -> String {
    hex(hmac::sign(key, format!("{seq}\n{hash}\n{file}").as_bytes()).as_ref())
}

/// Reads [`HEAD_FILE`] (None when there is none), checking its mac with `key`.
fn read_head(path: &Path, key: Option<&hmac::Key>) -> Result<Option<Head>, Problem> {
    let raw = match std::fs::read(path) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Problem::BadHead(e.to_string())),
    };
    let h: Head =
        serde_json::from_slice(raw.trim_ascii()).map_err(|e| Problem::BadHead(e.to_string()))?;
    if let Some(k) = key {
        let mac = decode_hex(&h.mac).ok_or_else(|| Problem::BadHead("mac is not hex".into()))?;
        hmac::verify(
            k,
            format!("{}\n{}\n{}", h.seq, h.hash, h.file).as_bytes(),
            &mac,
        )
        .map_err(|_| {
            Problem::BadHead("mac does not match: the head was edited, or the key is wrong".into())
        })?;
    }
    Ok(Some(h))
}

/// Rewrites [`HEAD_FILE`] in place (one fixed-size write).
fn write_head(
    file: &File,
    key: &hmac::Key,
    seq: u64,
    hash: &str,
    log_file: &str,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let head = Head {
        seq,
        hash: hash.to_string(),
        file: log_file.to_string(),
        mac: head_mac(key, seq, hash, log_file),
    };
    let mut block = serde_json::to_vec(&head).map_err(io::Error::other)?;
    block.resize(HEAD_BYTES - 1, b' ');
    block.push(b'\n');
    file.write_all_at(&block, 0)
}

fn open_head(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(HEAD_FILE))
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-05-01T12:00:00.000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, m, day) = civil_from_days(secs.div_euclid(86400));
    let s = secs.rem_euclid(86400);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Unix seconds of an RFC 3339 time (`Z` or `±HH:MM` offset, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && sep(i + 3, b":") => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *c == b'+' { o } else { -o }
        }
        _ => return None,
    };
    Some(days_from_civil(y, mo as u32, d as u32) * 86400 + h * 3600 + mi * 60 + sec - offset)
}

// ---- chain checking -------------------------------------------------------

struct Start {
    file: PathBuf,
    line: u64,
    seq: u64,
    prev: String,
}

#[derive(Default)]
struct Chain {
    start: Option<Start>,
    /// seq and hash of the last good line.
    last: Option<(u64, String)>,
    /// (removed_last_seq, removed_last_hash) of retention markers seen.
    markers: HashSet<(u64, String)>,
    records: u64,
    /// After the first problem, lines are only scanned for retention markers.
    broken: bool,
    /// The keyed head's seq, and the hash of the line found there.
    want: Option<u64>,
    found: Option<String>,
}

impl Chain {
    fn check(
        &mut self,
        line: &[u8],
        key: Option<&hmac::Key>,
        file: &Path,
        line_no: u64,
    ) -> Result<(), Problem> {
        let parsed = parse_line(line)?;
        if let Some(k) = key {
            check_mac(k, line, &parsed)?;
        }
        if self.broken {
            if let Entry::Retention(m) = parsed.entry {
                self.markers
                    .insert((m.removed_last_seq, m.removed_last_hash));
            }
            return Ok(());
        }
        match &self.last {
            Some((seq, hash)) => {
                if parsed.seq != seq + 1 {
                    return Err(Problem::Seq {
                        expected: seq + 1,
                        found: parsed.seq,
                    });
                }
                if parsed.prev != *hash {
                    return Err(Problem::Prev);
                }
            }
            None => {
                self.start = Some(Start {
                    file: file.to_path_buf(),
                    line: line_no,
                    seq: parsed.seq,
                    prev: parsed.prev.clone(),
                })
            }
        }
        if let Entry::Retention(m) = parsed.entry {
            self.markers
                .insert((m.removed_last_seq, m.removed_last_hash));
        }
        let hash = sha256_hex(line);
        if self.want == Some(parsed.seq) {
            self.found = Some(hash.clone());
        }
        self.last = Some((parsed.seq, hash));
        self.records += 1;
        Ok(())
    }
}

#[derive(Deserialize)]
struct LineIn {
    seq: u64,
    prev: String,
    mac: String,
    #[serde(flatten)]
    entry: Entry,
}

#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(flatten)]
    entry: &'a Entry,
}

struct Parsed {
    seq: u64,
    prev: String,
    entry: Entry,
    mac: Vec<u8>,
}

fn parse_line(line: &[u8]) -> Result<Parsed, Problem> {
    let l: LineIn = serde_json::from_slice(line).map_err(|e| Problem::Malformed(e.to_string()))?;
    // The mac covers the bytes before its own field, so it must be last and
    // spelled exactly as the writer spells it.
    let n = line.len();
    let suffix_ok = n > MAC_SUFFIX_LEN
        && line[n - MAC_SUFFIX_LEN..].starts_with(b",\"mac\":\"")
        && line.ends_with(b"\"}")
        && line[n - 66..n - 2] == *l.mac.as_bytes();
    // No successor to u64::MAX: a line claiming it would make the chain
    // check and the writer's next seq overflow.
    if l.seq == u64::MAX {
        return Err(Problem::Malformed(format!(
            "`seq` {} is out of range",
            l.seq
        )));
    }
    let mac = decode_hex(&l.mac).filter(|m| m.len() == 32);
    match mac {
        Some(mac) if suffix_ok => Ok(Parsed {
            seq: l.seq,
            prev: l.prev,
            entry: l.entry,
            mac,
        }),
        _ => Err(Problem::Malformed(
            "`mac` must be the last field, 64 hex digits".into(),
        )),
    }
}

fn check_mac(key: &hmac::Key, line: &[u8], parsed: &Parsed) -> Result<(), Problem> {
    let mut signed = line[..line.len() - MAC_SUFFIX_LEN].to_vec();
    signed.push(b'}');
    hmac::verify(key, &signed, &parsed.mac).map_err(|_| Problem::Mac)
}

/// One line (no newline) with `mac` appended.
fn encode_line(key: &hmac::Key, seq: u64, prev: &str, entry: &Entry) -> Vec<u8> {
    let mut line = serde_json::to_vec(&LineOut { seq, prev, entry })
        .expect("audit lines serialize: strings and integers only");
    let tag = hmac::sign(key, &line);
    line.pop(); // the closing brace; the mac goes before it
    line.extend_from_slice(b",\"mac\":\"");
    line.extend_from_slice(hex(tag.as_ref()).as_bytes());
    line.extend_from_slice(b"\"}");
    line
}

// ---- the writer -----------------------------------------------------------

struct Writer {
    dir: PathBuf,
    key: hmac::Key,
    max_file_bytes: u64,
    retention: Duration,
    dropped: Counter,
    index: u32,
    file: File,
    /// Bytes of the current file on disk.
    size: u64,
    /// Head including pending lines.
    seq: u64,
    head: String,
    /// Head of what is on disk, to fall back to when a write fails.
    committed: (u64, String),
    pending: Vec<u8>,
    pending_records: u64,
    retention_due: bool,
    /// [`HEAD_FILE`], rewritten after every write.
    head_file: File,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut next_retention = Instant::now();
        loop {
            if self.retention_due || Instant::now() >= next_retention {
                self.retention_due = false;
                self.enforce_retention();
                next_retention = Instant::now() + RETENTION_CHECK_EVERY;
            }
            let first =
                match rx.recv_timeout(next_retention.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
            // Batch what is already queued into one write.
            let mut flushes = Vec::new();
            let mut msg = Some(first);
            let mut n = 0;
            while let Some(m) = msg {
                match m {
                    Msg::Record(e) => self.append(*e),
                    Msg::Flush(done) => flushes.push(done),
                }
                n += 1;
                msg = if n < MAX_BATCH {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            let written = self.commit();
            if !flushes.is_empty() {
                let synced = written.and_then(|()| self.file.sync_data());
                for done in flushes {
                    let r = match &synced {
                        Ok(()) => Ok(()),
                        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                    };
                    let _ = done.send(r);
                }
            }
        }
        // The queue is closed and drained.
        if self.commit().and_then(|()| self.file.sync_data()).is_err() {
            tracing::error!("cannot write the last audit records");
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(file_name(self.index))
    }

    fn append(&mut self, entry: Entry) {
        let mut line = encode_line(&self.key, self.seq + 1, &self.head, &entry);
        let used = self.size + self.pending.len() as u64;
        if used > 0 && used + line.len() as u64 + 1 > self.max_file_bytes {
            let _ = self.commit();
            self.rotate();
            // A failed commit moved the head back.
            line = encode_line(&self.key, self.seq + 1, &self.head, &entry);
        }
        self.seq += 1;
        self.head = sha256_hex(&line);
        self.pending.extend_from_slice(&line);
        self.pending.push(b'\n');
        self.pending_records += 1;
    }

    /// Writes pending lines. On failure the partial write is cut off again
    /// and the chain continues from the last line on disk.
    fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all(&self.pending);
        match &result {
            Ok(()) => {
                self.size += self.pending.len() as u64;
                self.committed = (self.seq, self.head.clone());
                if let Err(e) = write_head(
                    &self.head_file,
                    &self.key,
                    self.seq,
                    &self.head,
                    &file_name(self.index),
                ) {
                    tracing::error!(dir = %self.dir.display(), error = %e,
                        "cannot update the audit head; removal of the newest records would go unnoticed");
                }
            }
            Err(e) => {
                tracing::error!(file = %self.path().display(), error = %e, records = self.pending_records,
                    "cannot write audit records; they are lost");
                self.dropped.inc_by(self.pending_records);
                if let Err(e) = self.file.set_len(self.size) {
                    tracing::error!(file = %self.path().display(), error = %e,
                        "cannot cut off a partial audit write; verification will report the file as damaged");
                }
                (self.seq, self.head) = self.committed.clone();
            }
        }
        self.pending.clear();
        self.pending_records = 0;
        result
    }

    fn rotate(&mut self) {
        let next = self.index + 1;
        let path = self.dir.join(file_name(next));
        let opened = self.file.sync_data().and_then(|()| {
            let f = OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            // The new name must survive a crash along with its content.
            File::open(&self.dir)?.sync_all()?;
            Ok(f)
        });
        match opened {
            Ok(f) => {
                tracing::info!(file = %path.display(), seq = self.seq + 1, "audit log rotated");
                self.file = f;
                self.index = next;
                self.size = 0;
                self.retention_due = true;
            }
            // Keep appending to the current file rather than lose records.
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot rotate the audit log")
            }
        }
    }

    /// Deletes the oldest rotated files whose last record is older than the
    /// retention, oldest first and only a contiguous run of them, so the
    /// remaining log always starts right after the newest marker.
    fn enforce_retention(&mut self) {
        let files = match list_log_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list audit files for retention");
                return;
            }
        };
        let cutoff = unix_now() - self.retention.as_secs().min(i64::MAX as u64) as i64;
        for (index, path) in files {
            if index >= self.index {
                break;
            }
            let line = match last_line(&path) {
                Ok(LastLine::Empty) => continue,
                Ok(LastLine::Complete(l)) => l,
                Ok(LastLine::Partial) => {
                    tracing::warn!(file = %path.display(), "not deleting a damaged audit file (partial last line)");
                    return;
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read audit file for retention");
                    return;
                }
            };
            let parsed = match parse_line(&line)
                .and_then(|p| check_mac(&self.key, &line, &p).map(|()| p))
            {
                Ok(p) => p,
                Err(problem) => {
                    tracing::warn!(file = %path.display(), %problem, "not deleting an audit file whose last line fails verification");
                    return;
                }
            };
            match parse_rfc3339(parsed.entry.time()) {
                Some(t) if t < cutoff => {}
                _ => return,
            }
            let name = file_name(index);
            self.append(Entry::Retention(RetentionMarker {
                time: rfc3339(SystemTime::now()),
                removed_file: name.clone(),
                removed_last_seq: parsed.seq,
                removed_last_hash: sha256_hex(&line),
            }));
            // The marker must be on disk before the file it accounts for goes.
            if let Err(e) = self.commit().and_then(|()| self.file.sync_data()) {
                tracing::error!(error = %e, file = %name, "cannot record an audit retention marker; not deleting");
                return;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), last_seq = parsed.seq, "deleted audit file past retention")
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete audit file past retention");
                    return;
                }
            }
        }
    }
}

/// The head (seq, hash of the last line) to continue from: the last line of
/// the newest non-empty file, verified.
fn resume(files: &[(u32, PathBuf)], key: &hmac::Key) -> Result<(u64, String), AuditError> {
    for (_, path) in files.iter().rev() {
        let damaged = |problem| AuditError::Damaged {
            path: path.clone(),
            problem,
        };
        match last_line(path).map_err(|error| AuditError::Io {
            path: path.clone(),
            error,
        })? {
            LastLine::Empty => continue,
            LastLine::Partial => return Err(damaged(Problem::Truncated)),
            LastLine::Complete(line) => {
                let parsed = parse_line(&line).map_err(damaged)?;
                check_mac(key, &line, &parsed).map_err(damaged)?;
                return Ok((parsed.seq, sha256_hex(&line)));
            }
        }
    }
    Ok((0, GENESIS.to_string()))
}

// ---- files ----------------------------------------------------------------

fn file_name(index: u32) -> String {
    format!("audit-{index:06}.jsonl")
}

fn log_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The log's files, oldest first.
fn list_log_files(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some(i) = e.file_name().to_str().and_then(log_index) {
            out.push((i, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

enum LastLine {
    Empty,
    /// Without its newline.
    Complete(Vec<u8>),
    /// The file does not end with a newline.
    Partial,
}

/// Reads a file's last line from its end, so large files cost little.
fn last_line(path: &Path) -> io::Result<LastLine> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(LastLine::Empty);
    }
    let mut last = [0u8];
    f.seek(SeekFrom::Start(len - 1))?;
    f.read_exact(&mut last)?;
    if last[0] != b'\n' {
        return Ok(LastLine::Partial);
    }
    // Walk back in chunks to the newline before the last one.
    let end = len - 1;
    let mut start = end;
    let mut tail: Vec<u8> = Vec::new();
    const CHUNK: u64 = 8192;
    while start > 0 {
        let from = start.saturating_sub(CHUNK);
        let mut chunk = vec![0u8; (start - from) as usize];
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(&mut chunk)?;
        if let Some(p) = chunk.iter().rposition(|&b| b == b'\n') {
            chunk.drain(..=p);
            chunk.extend_from_slice(&tail);
            return Ok(LastLine::Complete(chunk));
        }
        chunk.extend_from_slice(&tail);
        tail = chunk;
        start = from;
    }
    Ok(LastLine::Complete(tail))
}

// ---- small helpers --------------------------------------------------------

fn cap(s: &mut String) {
    if s.len() > MAX_FIELD_BYTES {
        let mut i = MAX_FIELD_BYTES;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, b).as_ref())
}

fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) || !b.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    Some(
        b.chunks(2)
            .map(|p| (hex_val(p[0]) << 4) | hex_val(p[1]))
            .collect(),
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

// Howard Hinnant's civil-calendar algorithms (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const KEY: &[u8] = b"0123456789abcdef-test-key";

    /// A scratch directory removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Dir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "bulwark-audit-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
        fn files(&self) -> Vec<PathBuf> {
            list_log_files(&self.0)
                .unwrap()
                .into_iter()
                .map(|(_, p)| p)
                .collect()
        }
        fn file(&self, index: u32) -> PathBuf {
            self.0.join(file_name(index))
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rec(i: usize, time: &str) -> AuditRecord {
        AuditRecord {
            time: time.to_string(),
            source_identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            destination_identity: "spiffe://cluster.local/ns/default/sa/api".into(),
            service: "api".into(),
            method: "GET".into(),
            path: format!("/items/{i}"),
            decision: if i.is_multiple_of(3) {
                Decision::Deny
            } else {
                Decision::Allow
            },
            policy: "AuthorizationPolicy default/api-callers".into(),
            reason: i
                .is_multiple_of(3)
                .then(|| "source not allowed".to_string()),
            subject: None,
            scopes: Vec::new(),
        }
    }

    fn write(dir: &Path, opts: AuditOptions, range: std::ops::Range<usize>, time: &str) {
        let log = AuditLog::open(dir, KEY, opts).unwrap();
        for i in range {
            log.record(rec(i, time));
        }
        log.flush().unwrap();
        assert_eq!(log.dropped(), 0);
    }

    fn small_files() -> AuditOptions {
        AuditOptions {
            max_file_bytes: 2000,
            ..Default::default()
        }
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write_lines(p: &Path, lines: &[String]) {
        std::fs::write(
            p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    fn problem_at(r: Result<VerifyReport, VerifyError>) -> (PathBuf, u64, Problem) {
        match r {
            Err(VerifyError::Invalid {
                file,
                line,
                problem,
            }) => (file, line, problem),
            other => panic!("expected a verification problem, got {other:?}"),
        }
    }

    #[test]
    fn audit_line_with_the_largest_seq_is_malformed_not_an_overflow() {
        // A line with seq u64::MAX followed by any line overflowed `seq + 1`
        // in the chain check (a panic with overflow checks, as under the
        // audit_verify fuzz target), and resuming from it the writer's next seq.
        let d = Dir::new();
        std::fs::create_dir_all(&d.0).unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
        let entry = Entry::Access(rec(1, "2025-05-01T12:00:00.000Z"));
        let first = encode_line(&key, u64::MAX, GENESIS, &entry);
        let second = encode_line(&key, 1, &sha256_hex(&first), &entry);
        let lines = [first, second].map(|l| String::from_utf8(l).unwrap());
        write_lines(&d.file(1), &lines);

        for key in [Some(KEY), None] {
            let (_, line, problem) = problem_at(verify(&d.files(), key));
            assert_eq!(line, 1);
            assert!(matches!(problem, Problem::Malformed(m) if m.contains("out of range")));
        }
        write_lines(&d.file(1), &lines[..1]);
        assert!(matches!(
            AuditLog::open(&d.0, KEY, AuditOptions::default()),
            Err(AuditError::Damaged {
                problem: Problem::Malformed(_),
                ..
            })
        ));
    }

    #[test]
    fn audit_log_written_then_verified_is_ok_with_and_without_the_key() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..10, "");
        let files = d.files();
        assert_eq!(files.len(), 1);
        let r = verify(&files, Some(KEY)).unwrap();
        assert_eq!(
            (r.records, r.first_seq, r.last_seq, r.mac_checked),
            (10, 1, 10, true)
        );
        assert!(!r.starts_after_retention);
        let r = verify(&files, None).unwrap();
        assert!(!r.mac_checked);

        // The line format: seq, prev, kind, the record, mac last.
        let l = lines(&files[0]);
        let first: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
        assert_eq!(first["seq"], 1);
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["kind"], "access");
        assert_eq!(first["decision"], "deny");
        assert_eq!(first["reason"], "source not allowed");
        assert_eq!(first["policy"], "AuthorizationPolicy default/api-callers");
        assert!(parse_rfc3339(first["time"].as_str().unwrap()).is_some());
        assert!(l[0].starts_with(r#"{"seq":1,"prev":"0000"#), "{}", l[0]);
        assert!(l[0].contains(r#","mac":""#) && l[0].ends_with("\"}"));
        let second: serde_json::Value = serde_json::from_str(&l[1]).unwrap();
        assert_eq!(second["prev"], sha256_hex(l[0].as_bytes()));
        assert!(second.get("reason").is_none());
        assert_eq!(r.head, sha256_hex(l[9].as_bytes()));
        // Private to the workload.
        let mode = std::fs::metadata(&files[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn audit_edited_record_is_detected_at_its_line_with_the_key_and_at_the_next_without() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..10, "");
        let f = d.file(1);
        let mut l = lines(&f);
        l[4] = l[4].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
        l[4] = l[4].replace("/items/4", "/items/x");
        write_lines(&f, &l);
        assert_eq!(
            problem_at(verify(&d.files(), Some(KEY))),
            (f.clone(), 5, Problem::Mac)
        );
        // Without the key, the chain still gives the edit away on the next line.
        assert_eq!(
            problem_at(verify(&d.files(), None)),
            (f.clone(), 6, Problem::Prev)
        );
        let msg = verify(&d.files(), None).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("{}:6: prev does not match", f.display())),
            "{msg}"
        );
    }

    #[test]
    fn audit_deleted_record_is_detected_where_the_seq_jumps() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..10, "");
        let f = d.file(1);
        let mut l = lines(&f);
        l.remove(3);
        write_lines(&f, &l);
        let (file, line, problem) = problem_at(verify(&d.files(), Some(KEY)));
        assert_eq!(
            (file, line, problem.clone()),
            (
                f,
                4,
                Problem::Seq {
                    expected: 4,
                    found: 5
                }
            )
        );
        assert!(problem.to_string().contains("missing"), "{problem}");
    }

    #[test]
    fn audit_swapped_pair_is_detected_at_the_first_of_the_two() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..10, "");
        let f = d.file(1);
        let mut l = lines(&f);
        l.swap(6, 7);
        write_lines(&f, &l);
        assert_eq!(
            problem_at(verify(&d.files(), Some(KEY))),
            (
                f,
                7,
                Problem::Seq {
                    expected: 7,
                    found: 8
                }
            )
        );
    }

    #[test]
    fn audit_truncated_file_is_detected_at_its_partial_last_line() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..10, "");
        let f = d.file(1);
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 30]).unwrap();
        assert_eq!(
            problem_at(verify(&d.files(), Some(KEY))),
            (f.clone(), 10, Problem::Truncated)
        );
        // And the writer will not silently continue after it.
        let err = AuditLog::open(&d.0, KEY, AuditOptions::default()).unwrap_err();
        assert!(
            matches!(
                &err,
                AuditError::Damaged {
                    problem: Problem::Truncated,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn audit_chain_continues_across_rotated_files_in_any_given_order() {
        let d = Dir::new();
        write(&d.0, small_files(), 0..40, "");
        let files = d.files();
        assert!(files.len() >= 3, "{files:?}");
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 2000);
        }
        // The first line of each file chains to the last line of the one before.
        let (a, b) = (lines(&files[0]), lines(&files[1]));
        let head: serde_json::Value = serde_json::from_str(&b[0]).unwrap();
        assert_eq!(head["prev"], sha256_hex(a.last().unwrap().as_bytes()));
        let mut reversed = files.clone();
        reversed.reverse();
        let r = verify(&reversed, Some(KEY)).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (40, 1, 40));
        assert_eq!(r.files, files.len());

        // A middle file removed by hand: the next file's first line says so.
        let mut without = files.clone();
        without.remove(1);
        assert_eq!(
            problem_at(verify(&without, Some(KEY))).1,
            1,
            "reported at the first line of the file after the gap"
        );
        assert_eq!(problem_at(verify(&without, Some(KEY))).0, files[2]);
    }

    #[test]
    fn audit_reopening_resumes_the_chain_from_the_newest_file() {
        let d = Dir::new();
        write(&d.0, small_files(), 0..25, "");
        write(&d.0, small_files(), 25..50, "");
        write(&d.0, AuditOptions::default(), 50..51, "");
        let r = verify(&d.files(), Some(KEY)).unwrap();
        assert_eq!((r.records, r.first_seq, r.last_seq), (51, 1, 51));
    }

    #[test]
    fn audit_reopening_refuses_a_last_line_that_fails_its_mac() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..3, "");
        let err =
            AuditLog::open(&d.0, b"another key of 16+ bytes", AuditOptions::default()).unwrap_err();
        assert!(
            matches!(
                &err,
                AuditError::Damaged {
                    problem: Problem::Mac,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn audit_retention_deletes_old_rotated_files_and_verification_starts_at_the_marker() {
        let d = Dir::new();
        let old = "2020-01-01T00:00:00.000Z";
        let keep_all = AuditOptions {
            retention: Duration::from_secs(100 * 365 * 86400),
            ..small_files()
        };
        write(&d.0, keep_all, 0..30, old);
        let old_files = d.files();
        assert!(old_files.len() >= 3);
        let (rotated, current) = old_files.split_at(old_files.len() - 1);
        // Opening with a 90-day retention deletes the old rotated files but
        // never the current one, however old its records.
        write(&d.0, small_files(), 30..30, "");
        // New records rotate the log, which applies the retention again.
        write(&d.0, small_files(), 30..40, "");
        let files = d.files();
        assert!(
            !files.iter().any(|f| rotated.contains(f)),
            "old rotated files remain: {files:?}"
        );
        assert!(files.contains(&current[0]), "{files:?}");
        let r = verify(&files, Some(KEY)).unwrap();
        assert!(r.starts_after_retention);
        assert!(r.first_seq > 1);
        // One marker per deleted file, naming it.
        let markers: Vec<RetentionMarker> = files
            .iter()
            .flat_map(|f| lines(f))
            .filter_map(
                |l| match serde_json::from_str::<LineIn>(&l).unwrap().entry {
                    Entry::Retention(m) => Some(m),
                    Entry::Access(_) => None,
                },
            )
            .collect();
        let names: Vec<String> = rotated
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let removed: Vec<String> = markers.iter().map(|m| m.removed_file.clone()).collect();
        assert_eq!(removed, names);
        assert_eq!(markers.last().unwrap().removed_last_seq, r.first_seq - 1);

        // Deleting the oldest remaining file by hand is not accounted for.
        if files.len() > 1 {
            let (file, line, problem) = problem_at(verify(&files[1..], Some(KEY)));
            assert_eq!((file, line), (files[1].clone(), 1));
            assert!(
                matches!(problem, Problem::UnaccountedStart { .. }),
                "{problem}"
            );
        }
    }

    #[test]
    fn audit_start_after_the_genesis_without_a_marker_is_reported() {
        let d = Dir::new();
        write(&d.0, small_files(), 0..30, "");
        let files = d.files();
        let (file, line, problem) = problem_at(verify(&files[1..], Some(KEY)));
        assert_eq!((file, line), (files[1].clone(), 1));
        assert!(
            matches!(problem, Problem::UnaccountedStart { .. }),
            "{problem}"
        );
    }

    #[test]
    fn audit_wrong_key_fails_at_the_first_line() {
        let d = Dir::new();
        write(&d.0, AuditOptions::default(), 0..5, "");
        assert_eq!(
            problem_at(verify(&d.files(), Some(b"not the key at all"))),
            (d.file(1), 1, Problem::Mac)
        );
    }

    #[test]
    fn audit_full_queue_drops_and_counts_records_instead_of_blocking() {
        let d = Dir::new();
        let opts = AuditOptions {
            queue_capacity: 1,
            ..Default::default()
        };
        let dropped = opts.dropped.clone();
        let log = AuditLog::open(&d.0, KEY, opts).unwrap();
        let sent = 20_000;
        for i in 0..sent {
            log.record(rec(i, ""));
        }
        log.flush().unwrap();
        let written = verify(&d.files(), Some(KEY)).unwrap().records;
        assert!(log.dropped() > 0, "a one-slot queue must overflow");
        assert_eq!(written + log.dropped(), sent as u64);
        assert_eq!(
            dropped.get(),
            log.dropped(),
            "the caller's counter is the one counted"
        );
    }

    #[test]
    fn audit_open_rejects_a_short_key() {
        let d = Dir::new();
        assert!(matches!(
            AuditLog::open(&d.0, b"short", AuditOptions::default()),
            Err(AuditError::WeakKey(5))
        ));
    }

    #[test]
    fn audit_key_files_are_hex_or_raw_bytes() {
        assert_eq!(parse_key(b"00ff10\n"), vec![0, 255, 16]);
        assert_eq!(parse_key(b"not hex at all!!"), b"not hex at all!!".to_vec());
        // Odd length: raw, untrimmed.
        assert_eq!(parse_key(b"abc\n"), b"abc\n".to_vec());
    }

    #[test]
    fn audit_long_fields_are_cut_to_keep_lines_bounded() {
        let d = Dir::new();
        let log = AuditLog::open(&d.0, KEY, AuditOptions::default()).unwrap();
        let mut r = rec(1, "");
        r.path = "é".repeat(MAX_FIELD_BYTES);
        log.record(r);
        log.flush().unwrap();
        let l = lines(&d.file(1));
        assert!(l[0].len() < 2 * MAX_FIELD_BYTES, "{}", l[0].len());
        verify(&d.files(), Some(KEY)).unwrap();
    }

    #[test]
    fn audit_rfc3339_formats_and_parses_utc_and_offsets() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20.250Z");
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.250Z"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800));
        assert_eq!(parse_rfc3339("2023-11-14 22:13"), None);
        assert_eq!(parse_rfc3339("2023-13-14T22:13:20Z"), None);
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(parse_rfc3339(&rfc3339(now)), Some(secs));
    }

    #[test]
    fn audit_records_cut_off_the_end_are_caught_by_the_keyed_head() {
        let d = Dir::new();
        // Recent records (an empty time is now): no file is old enough for retention.
        write(&d.0, small_files(), 0..30, "");
        let report = verify(&d.files(), Some(KEY)).unwrap();
        let total = report.last_seq;
        assert_eq!((report.head_seq, total), (Some(30), 30));

        // Whole lines removed from the end of the newest file: every line
        // left is intact, only the head knows there were more.
        let newest = d.files().pop().unwrap();
        let mut kept = lines(&newest);
        let n = kept.len() as u64;
        kept.truncate(kept.len() - 2);
        write_lines(&newest, &kept);
        for key in [Some(KEY), None] {
            let (file, line, problem) = problem_at(verify(&d.files(), key));
            assert_eq!((file, line), (newest.clone(), n - 1));
            assert_eq!(
                problem,
                Problem::TailRemoved {
                    last: total - 2,
                    head: total
                }
            );
        }
        // ... and the whole newest file removed too.
        std::fs::remove_file(&newest).unwrap();
        let (_, _, problem) = problem_at(verify(&d.files(), Some(KEY)));
        assert!(
            matches!(problem, Problem::TailRemoved { head, .. } if head == total),
            "{problem:?}"
        );

        // Reopening refuses to resume over the evidence.
        match AuditLog::open(&d.0, KEY, small_files()) {
            Err(AuditError::Damaged { path, problem }) => {
                assert_eq!(path, d.0.join(HEAD_FILE));
                assert!(matches!(problem, Problem::TailRemoved { head, .. } if head == total));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn audit_head_lowered_without_the_key_fails_its_mac() {
        let d = Dir::new();
        write(
            &d.0,
            AuditOptions::default(),
            0..5,
            "2025-05-01T12:00:00.000Z",
        );
        let f = d.0.join(HEAD_FILE);
        let head = std::fs::read_to_string(&f).unwrap();
        assert_eq!(head.len(), HEAD_BYTES);
        std::fs::write(&f, head.replacen("\"seq\":5", "\"seq\":3", 1)).unwrap();
        let (file, line, problem) = problem_at(verify(&d.files(), Some(KEY)));
        assert_eq!((file, line), (f, 1));
        assert!(matches!(problem, Problem::BadHead(m) if m.contains("mac does not match")));
    }

    #[test]
    fn audit_head_survives_reopening_and_a_missing_head_is_reported_not_invented() {
        let d = Dir::new();
        write(
            &d.0,
            AuditOptions::default(),
            0..3,
            "2025-05-01T12:00:00.000Z",
        );
        write(
            &d.0,
            AuditOptions::default(),
            3..6,
            "2025-05-01T12:00:00.000Z",
        );
        assert_eq!(verify(&d.files(), Some(KEY)).unwrap().head_seq, Some(6));
        std::fs::remove_file(d.0.join(HEAD_FILE)).unwrap();
        let r = verify(&d.files(), Some(KEY)).unwrap();
        assert_eq!((r.last_seq, r.head_seq), (6, None));
    }
}
