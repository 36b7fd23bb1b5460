//! The admin protocol between vtpmd's admin socket (`--admin path=SOCK`)
//! and vtpmctl, defined once: typed requests, typed replies, the envelope
//! and a client.
//!
//! ```text
//! request:  one JSON object per line, tagged by "op"
//!           {"op":"outgoing","peer_key":"-----BEGIN PUBLIC KEY-----...","migration_id":"ab12..."}
//! reply:    {"ok":true,"result":{...}}   or   {"ok":false,"error":"what went wrong and the fix"}
//! ```
//!
//! | op | arguments | result |
//! |---|---|---|
//! | `status` | | [`Status`] |
//! | `incoming-info` | | [`IncomingInfo`] |
//! | `incoming-key` | `wrapped_key` (hex) | [`KeysPreloaded`] |
//! | `outgoing` | `peer_key` (PEM), `migration_id` (hex) | [`Prepared`] |
//! | `abort` | | [`Status`] |
//! | `receipt` | | [`Receipt`] |
//! | `complete` | `receipt` ([`Receipt`]) | [`Tombstone`] |
//! | `saves` | | [`SaveStatus`] |
//! | `rollback-policy` | `policy` (`allow` \| `refuse`) | [`SaveStatus`] |
//! | `allow-rollback` | `generation` | [`SaveStatus`] |

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Longest request line the daemon accepts.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest reply line the client accepts.
pub const MAX_REPLY: usize = 1024 * 1024;

/// One admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Lifecycle state, migration id and digest.
    Status,
    /// Destination: issue a fresh single-use migration id.
    IncomingInfo,
    /// Destination: unwrap the migration's keys ahead of the stream.
    IncomingKey { wrapped_key: String },
    /// Source: prepare a migration to the destination that issued the id.
    Outgoing {
        peer_key: String,
        migration_id: String,
    },
    /// Source: abandon a prepared or exported migration.
    Abort,
    /// Destination: the signed receipt of the completed migration.
    Receipt,
    /// Source: check the receipt, then erase the local copy.
    Complete { receipt: Receipt },
    /// The instance id, save generation and rollback policy.
    Saves,
    /// Sets what a restore of an older save does.
    RollbackPolicy {
        policy: crate::statedir::RollbackPolicy,
    },
    /// Allows one restore of an older save (policy `refuse`).
    AllowRollback { generation: u64 },
}

impl Request {
    /// The op name, as it appears on the wire and in logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::IncomingInfo => "incoming-info",
            Request::IncomingKey { .. } => "incoming-key",
            Request::Outgoing { .. } => "outgoing",
            Request::Abort => "abort",
            Request::Receipt => "receipt",
            Request::Complete { .. } => "complete",
            Request::Saves => "saves",
            Request::RollbackPolicy { .. } => "rollback-policy",
            Request::AllowRollback { .. } => "allow-rollback",
        }
    }

    /// Parses one request line; the error says what a valid one looks like.
    pub fn parse(line: &str) -> Result<Request, String> {
        serde_json::from_str(line).map_err(|e| {
            format!(
                "bad request ({e}); expected {{\"op\": \"status\" | \"incoming-info\" | \
                 \"incoming-key\" | \"outgoing\" | \"abort\" | \"receipt\" | \"complete\" | \
                 \"saves\" | \"rollback-policy\" | \"allow-rollback\", ...}}"
            )
        })
    }
}

/// The lifecycle states of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Running,
    Prepared,
    SourceLocked,
    Exported,
    MigratedOut,
    DestinationLocked,
    /// A source whose process stopped with a migration unresolved: the
    /// TPM does not start until `vtpmctl complete` or `vtpmctl abort`.
    AwaitingReceipt,
}

/// `status` and `abort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: Phase,
    pub migration_id: Option<String>,
    pub digest: Option<String>,
    pub peer_key: Option<String>,
    pub host_key: Option<String>,
    /// Whether the TPM is powered on (false once migrated out).
    pub tpm_running: bool,
}

/// `incoming-info`: what the source's operator needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingInfo {
    pub migration_id: String,
    /// This host's public key, PEM (SubjectPublicKeyInfo).
    pub public_key: String,
    pub key_fingerprint: String,
}

/// `incoming-key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeysPreloaded {
    pub state: Phase,
    pub migration_id: String,
    /// Always "unwrapped".
    pub keys: String,
}

/// `outgoing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    pub state: Phase,
    pub migration_id: String,
    /// Fingerprint of the destination's key.
    pub peer_key: String,
    /// The instance keys wrapped to the destination, hex; not a secret.
    pub wrapped_key: String,
}

/// The destination's signed acknowledgement of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub migration_id: String,
    pub digest: String,
    pub destination_key: String,
    pub signature: String,
}

/// What a source leaves in its state directory after the hand-over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub migrated_out: bool,
    pub migration_id: String,
    pub destination_key: String,
    pub digest: String,
    /// "receipt" (the destination's signed receipt was checked).
    pub confirmed_by: String,
    pub unix_time: u64,
}

/// `saves`, `rollback-policy`, `allow-rollback`: what restores of this
/// TPM's saves are bound to and what an older one does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveStatus {
    /// None until the first save.
    pub instance_id: Option<String>,
    pub generation: u64,
    pub rollback: crate::statedir::RollbackPolicy,
    /// The older generation the operator allowed, if any.
    pub allowed_generation: Option<u64>,
    /// Restores of older saves so far (the record's lines).
    pub rollbacks: usize,
    /// Fingerprint of the key saves are sealed to (None: saves refused).
    pub host_key: Option<String>,
}

/// A successful reply's result, whichever request it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Status),
    IncomingInfo(IncomingInfo),
    KeysPreloaded(KeysPreloaded),
    Prepared(Prepared),
    Receipt(Receipt),
    Tombstone(Tombstone),
    SaveStatus(SaveStatus),
}

/// The reply envelope on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The reply line (without its newline) for `r`.
pub fn encode_reply(r: Result<Reply, String>) -> String {
    let env = match r {
        Ok(v) => Envelope {
            ok: true,
            result: Some(v),
            error: None,
        },
        Err(e) => Envelope {
            ok: false,
            result: None,
            error: Some(e),
        },
    };
    serde_json::to_string(&env).unwrap_or_else(|_| {
        "{\"ok\":false,\"error\":\"internal: reply not serialisable\"}".to_string()
    })
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach the admin socket {path}: {source} (is vtpmd running with --admin path={path}?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{path} did not answer in the admin protocol (is it the control socket? vtpmctl needs the socket given to vtpmd --admin path=...): {reply}")]
    NotAdmin { path: String, reply: String },
    #[error("{0}")]
    Refused(String),
}

/// A connection to one vtpmd admin socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Client {
            path: path.to_path_buf(),
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends `req` and decodes the result as `T`.
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ClientError> {
        let line = serde_json::to_string(req).map_err(|e| ClientError::Refused(e.to_string()))?;
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        // An admin reply starts with '{'. Anything else (vtpmd's control
        // socket answers a 4-byte result and waits) is not worth waiting
        // for a newline that never comes.
        let first = self.reader.fill_buf()?.first().copied();
        if first != Some(b'{') {
            return Err(ClientError::NotAdmin {
                path: self.path.display().to_string(),
                reply: format!("{:02x?}", self.reader.buffer()),
            });
        }
        let mut reply = String::new();
        (&mut self.reader)
            .take(MAX_REPLY as u64)
            .read_line(&mut reply)?;
        let not_admin = || ClientError::NotAdmin {
            path: self.path.display().to_string(),
            reply: reply.chars().take(80).collect::<String>(),
        };
        let env: Envelope<serde_json::Value> =
            serde_json::from_str(reply.trim()).map_err(|_| not_admin())?;
        match env {
            Envelope {
                ok: true,
                result: Some(v),
                ..
            } => serde_json::from_value(v).map_err(|_| not_admin()),
            Envelope {
                ok: false, error, ..
            } => Err(ClientError::Refused(
                error.unwrap_or_else(|| "refused without a reason".into()),
            )),
            _ => Err(not_admin()),
        }
    }
}

/// Connects, sends one request and returns its result.
pub fn call<T: DeserializeOwned>(path: &Path, req: &Request) -> Result<T, ClientError> {
    Client::connect(path)?.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_on_the_wire() {
        let r = Request::parse(r#"{"op":"outgoing","peer_key":"P","migration_id":"00"}"#).unwrap();
        assert_eq!(
            r,
            Request::Outgoing {
                peer_key: "P".into(),
                migration_id: "00".into()
            }
        );
        assert_eq!(r.op(), "outgoing");
        assert_eq!(
            serde_json::to_string(&Request::IncomingInfo).unwrap(),
            r#"{"op":"incoming-info"}"#
        );
        for bad in [
            "not json",
            "{}",
            r#"{"op": 5}"#,
            r#"{"op": "explode"}"#,
            r#"{"op": "outgoing"}"#,
            "[1,2]",
            "",
        ] {
            let e = Request::parse(bad).unwrap_err();
            assert!(e.contains("expected {\"op\""), "{bad}: {e}");
        }
    }

    #[test]
    fn a_socket_that_is_not_the_admin_socket_is_named_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctrl.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed2 = closed.clone();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4];
            std::io::Read::read_exact(&mut s, &mut b).unwrap();
            s.write_all(&[0, 0, 0, 0x0a]).unwrap();
            // Keeps the connection open, as vtpmd's control socket does,
            // until the client has given up (or 30 s have passed).
            let _ = wait.recv_timeout(std::time::Duration::from_secs(30));
            closed2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let e = call::<Status>(&path, &Request::Status).unwrap_err();
        assert!(
            !closed.load(std::sync::atomic::Ordering::SeqCst),
            "the client waited for the server to hang up"
        );
        assert!(matches!(e, ClientError::NotAdmin { .. }), "{e}");
        assert!(e.to_string().contains("control socket"), "{e}");
        done.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn replies_on_the_wire() {
        let t = Tombstone {
            migrated_out: true,
            migration_id: "aa".into(),
            destination_key: "bb".into(),
            digest: "cc".into(),
            confirmed_by: "receipt".into(),
            unix_time: 1,
        };
        let line = encode_reply(Ok(Reply::Tombstone(t.clone())));
        let env: Envelope<Tombstone> = serde_json::from_str(&line).unwrap();
        assert!(env.ok);
        assert_eq!(env.result, Some(t));
        let line = encode_reply(Err("no".into()));
        assert_eq!(line, r#"{"ok":false,"error":"no"}"#);
        let s: Status = serde_json::from_str(
            r#"{"state":"migrated-out","migration_id":null,"digest":null,"peer_key":null,"host_key":null,"tpm_running":false}"#,
        )
        .unwrap();
        assert_eq!(s.state, Phase::MigratedOut);
    }
}
