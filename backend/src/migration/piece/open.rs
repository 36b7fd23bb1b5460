//! The destination side: each incoming blob goes through three steps.
//!
//! ```text
//!  bytes ──parse──▶ BlobHeader + RawPiece*      (layout only, bounds-checked)
//!        ──verify─▶ right migration, host, order; MAC chain per piece
//!        ──apply──▶ decrypt, fold into the digest, collect the state
//! ```
//!
//! Any failure poisons the import: nothing more is accepted and what was
//! collected is wiped.

use super::{
    chain_start, fold_digest, id_hex, open_wrapped, BlobHeader, MigrationId, PieceError, Purpose,
    RawPiece, FLAG_LAST_IN_BLOB, KIND_FINAL, KIND_PERMANENT, KIND_VOLATILE,
};
use vtpm_common::aead::AeadKey;
use vtpm_common::hex;
use vtpm_common::hostkey::HostKey;
use vtpm_common::reader::ByteReader;
use zeroize::Zeroizing;

/// Instance keys the destination unwrapped before the stream arrived
/// (`vtpmctl incoming-key`, with the wrapped key `vtpmctl outgoing`
/// printed), so no RSA work is left for the VM's downtime. They are used
/// only if blob 1 carries exactly this wrapped key; otherwise blob 1's own
/// key is unwrapped as usual.
pub struct PreloadedKeys {
    wrapped: Vec<u8>,
    keys: AeadKey,
}

impl std::fmt::Debug for PreloadedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreloadedKeys")
    }
}

impl PreloadedKeys {
    pub fn open(host: &HostKey, wrapped: &[u8]) -> Result<PreloadedKeys, PieceError> {
        Ok(PreloadedKeys {
            wrapped: wrapped.to_vec(),
            keys: open_wrapped(host, wrapped)?,
        })
    }
}

/// The destination side of one migration.
pub struct Importer {
    purpose: Purpose,
    id: MigrationId,
    keys: Option<AeadKey>,
    dest_fpr: [u8; 32],
    next_blob: u8,
    seq: u32,
    chain: [u8; 32],
    digest: [u8; 32],
    poisoned: bool,
    preloaded: Option<PreloadedKeys>,
    pub permanent: Zeroizing<Vec<u8>>,
    pub volatile: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Importer(migration {}, next blob {})",
            id_hex(&self.id),
            self.next_blob
        )
    }
}

/// A blob after parsing: its header and pieces.
struct Parsed<'a> {
    header: BlobHeader<'a>,
    pieces: Vec<RawPiece<'a>>,
}

/// Step 1: the layout, with nothing trusted yet.
fn parse(blob: &[u8]) -> Result<Parsed<'_>, PieceError> {
    let mut r = ByteReader::new(blob);
    let header = BlobHeader::parse(&mut r)?;
    let mut pieces = Vec::new();
    for _ in 0..header.pieces {
        pieces.push(RawPiece::parse(blob, &mut r)?);
    }
    if !r.is_empty() {
        return Err(PieceError::Malformed("trailing bytes"));
    }
    Ok(Parsed { header, pieces })
}

impl Importer {
    /// Expects migration `id` (the one this destination issued), or the
    /// save `id`.
    pub fn new(id: MigrationId, purpose: Purpose) -> Importer {
        Importer {
            purpose,
            id,
            keys: None,
            dest_fpr: [0; 32],
            next_blob: 1,
            seq: 0,
            chain: [0; 32],
            digest: [0; 32],
            poisoned: false,
            preloaded: None,
            permanent: Zeroizing::new(Vec::new()),
            volatile: Zeroizing::new(Vec::new()),
        }
    }

    /// As [`new`](Self::new), with keys unwrapped ahead of time.
    pub fn with_keys(
        id: MigrationId,
        purpose: Purpose,
        preloaded: Option<PreloadedKeys>,
    ) -> Importer {
        Importer {
            preloaded,
            ..Importer::new(id, purpose)
        }
    }

    /// True once the final blob verified.
    pub fn complete(&self) -> bool {
        self.next_blob == 4 && !self.poisoned
    }

    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Verifies and opens one blob; any failure poisons the import.
    pub fn accept(
        &mut self,
        blob_type: u32,
        blob: &[u8],
        host: &HostKey,
    ) -> Result<(), PieceError> {
        if self.poisoned {
            return Err(PieceError::Poisoned);
        }
        let r = parse(blob).and_then(|p| {
            self.verify_header(blob_type, &p.header, host)?;
            self.apply(&p)
        });
        if r.is_err() {
            self.poisoned = true;
            self.permanent = Zeroizing::new(Vec::new());
            self.volatile = Zeroizing::new(Vec::new());
        }
        r
    }

    /// Step 2a: this migration, this host, the expected blob; blob 1's
    /// wrapped key opened and the MAC chain started.
    fn verify_header(
        &mut self,
        blob_type: u32,
        h: &BlobHeader<'_>,
        host: &HostKey,
    ) -> Result<(), PieceError> {
        if h.purpose != self.purpose {
            return Err(PieceError::WrongPurpose {
                got: h.purpose,
                want: self.purpose,
            });
        }
        let declared = h.blob_type;
        if u32::from(declared) != blob_type || declared != self.next_blob {
            return Err(PieceError::Order {
                got: declared,
                want: self.next_blob,
            });
        }
        if h.id != self.id {
            return Err(PieceError::WrongMigration {
                got: id_hex(&h.id),
                want: id_hex(&self.id),
            });
        }
        if declared == 1 {
            if h.dest_fpr != vtpm_common::hostkey::fingerprint_bytes(host.public()) {
                return Err(PieceError::WrongHost {
                    got: hex::encode(&h.dest_fpr),
                    want: host.fingerprint(),
                });
            }
            let k = match self.preloaded.take() {
                Some(p) if p.wrapped == h.wrapped => {
                    log::info!(
                        "migration {}: instance keys were unwrapped ahead of time",
                        id_hex(&h.id)
                    );
                    p.keys
                }
                Some(_) => {
                    log::warn!("migration {}: the stream's wrapped key is not the one given ahead of time (incoming-key, or left with the reservation); unwrapping it now", id_hex(&h.id));
                    open_wrapped(host, h.wrapped)?
                }
                None => open_wrapped(host, h.wrapped)?,
            };
            self.chain = chain_start(self.purpose, &k, &h.id, h.wrapped, &h.dest_fpr);
            self.keys = Some(k);
            self.dest_fpr = h.dest_fpr;
        } else if !h.wrapped.is_empty() {
            return Err(PieceError::Malformed("wrapped key outside blob 1"));
        } else if h.dest_fpr != self.dest_fpr {
            return Err(PieceError::WrongHost {
                got: hex::encode(&h.dest_fpr),
                want: hex::encode(&self.dest_fpr),
            });
        }
        if self.keys.is_none() {
            return Err(PieceError::Order {
                got: declared,
                want: 1,
            });
        }
        if h.pieces == 0 || (declared == 3 && h.pieces != 1) {
            return Err(PieceError::Malformed("piece count"));
        }
        Ok(())
    }

    /// Step 2b and 3, piece by piece: MAC chain, sequence, kind; then
    /// decrypt, fold into the digest and collect.
    fn apply(&mut self, p: &Parsed<'_>) -> Result<(), PieceError> {
        let declared = p.header.blob_type;
        let keys = self.keys.as_ref().ok_or(PieceError::Order {
            got: declared,
            want: 1,
        })?;
        let want_kind = [KIND_PERMANENT, KIND_VOLATILE, KIND_FINAL][usize::from(declared - 1)];
        let count = p.pieces.len();
        for (i, piece) in p.pieces.iter().enumerate() {
            let seq = piece.seq;
            keys.verify(&[&self.chain, &self.id, &[declared], piece.body], piece.mac)
                .map_err(|_| PieceError::BadMac(seq))?;
            self.chain.copy_from_slice(piece.mac);
            if seq != self.seq {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "out of sequence",
                });
            }
            let last = i + 1 == count;
            if piece.kind != want_kind || (piece.flags & FLAG_LAST_IN_BLOB != 0) != last {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "kind or flags do not fit the blob",
                });
            }
            let plain = keys
                .decrypt(&piece.iv, piece.ct)
                .map_err(|_| PieceError::BadPiece {
                    seq,
                    why: "bad padding",
                })?;
            if plain.len() != piece.plain_len {
                return Err(PieceError::BadPiece {
                    seq,
                    why: "length mismatch",
                });
            }
            match piece.kind {
                KIND_FINAL => {
                    let mut r = ByteReader::new(&plain);
                    let (Ok(digest), Ok(carried_count), true) =
                        (r.array::<32>("digest"), r.u32("count"), plain.len() == 36)
                    else {
                        return Err(PieceError::BadPiece {
                            seq,
                            why: "final piece size",
                        });
                    };
                    if digest != self.digest || carried_count != self.seq {
                        return Err(PieceError::Digest);
                    }
                }
                KIND_PERMANENT => {
                    fold_digest(&mut self.digest, seq, piece.kind, &plain);
                    self.permanent.extend_from_slice(&plain);
                }
                _ => {
                    fold_digest(&mut self.digest, seq, piece.kind, &plain);
                    self.volatile.extend_from_slice(&plain);
                }
            }
            self.seq += 1;
        }
        self.next_blob += 1;
        Ok(())
    }
}
