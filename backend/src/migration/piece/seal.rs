//! The source side: fresh instance keys per migration, wrapped to the
//! destination, and the sealed blobs built piece by piece.

use super::{
    chain_start, fold_digest, id_hex, BlobHeader, MigrationId, PieceError, Purpose, CHUNK,
    FLAG_LAST_IN_BLOB, KIND_FINAL, KIND_PERMANENT, KIND_VOLATILE, VERSION,
};
use rsa::RsaPublicKey;
use vtpm_common::aead::AeadKey;
use vtpm_common::hostkey::{fingerprint_bytes, wrap_key};

/// The source side of one migration.
pub struct Exporter {
    purpose: Purpose,
    keys: AeadKey,
    id: MigrationId,
    wrapped: Vec<u8>,
    dest_fpr: [u8; 32],
    seq: u32,
    chain: [u8; 32],
    digest: [u8; 32],
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Exporter(migration {}, piece {})",
            id_hex(&self.id),
            self.seq
        )
    }
}

impl Exporter {
    /// Fresh instance keys for migration (or save) `id`, wrapped to `peer`.
    pub fn new(
        id: MigrationId,
        peer: &RsaPublicKey,
        purpose: Purpose,
    ) -> Result<Exporter, PieceError> {
        let keys = AeadKey::random()?;
        let wrapped = wrap_key(peer, &keys.to_bytes())?;
        let dest_fpr = fingerprint_bytes(peer);
        let chain = chain_start(purpose, &keys, &id, &wrapped, &dest_fpr);
        Ok(Exporter {
            purpose,
            keys,
            id,
            wrapped,
            dest_fpr,
            seq: 0,
            chain,
            digest: [0; 32],
        })
    }

    /// The instance keys wrapped to the destination, as blob 1 carries them.
    pub fn wrapped_key(&self) -> &[u8] {
        &self.wrapped
    }

    /// The running migration digest (final once blob 3 is sealed).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    fn header(&self, blob_type: u8, with_key: bool, pieces: usize) -> Vec<u8> {
        BlobHeader {
            purpose: self.purpose,
            version: VERSION,
            blob_type,
            id: self.id,
            dest_fpr: self.dest_fpr,
            wrapped: if with_key { &self.wrapped } else { &[] },
            pieces: pieces as u16,
        }
        .encode()
    }

    fn piece(
        &mut self,
        out: &mut Vec<u8>,
        blob_type: u8,
        kind: u8,
        flags: u8,
        plain: &[u8],
    ) -> Result<(), PieceError> {
        let (iv, ct) = self.keys.encrypt(plain)?;
        let start = out.len();
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&(ct.len() as u32).to_be_bytes());
        out.extend_from_slice(&ct);
        self.chain = self
            .keys
            .tag(&[&self.chain, &self.id, &[blob_type], &out[start..]]);
        out.extend_from_slice(&self.chain);
        if kind != KIND_FINAL {
            fold_digest(&mut self.digest, self.seq, kind, plain);
        }
        self.seq += 1;
        Ok(())
    }

    /// Seals one state blob (PERMANENT = 1 carries the wrapped key).
    pub fn seal_state(&mut self, blob_type: u8, state: &[u8]) -> Result<Vec<u8>, PieceError> {
        let kind = if blob_type == 1 {
            KIND_PERMANENT
        } else {
            KIND_VOLATILE
        };
        let chunks: Vec<&[u8]> = if state.is_empty() {
            vec![&[][..]]
        } else {
            state.chunks(CHUNK).collect()
        };
        let mut out = self.header(blob_type, blob_type == 1, chunks.len());
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let flags = if i + 1 == n { FLAG_LAST_IN_BLOB } else { 0 };
            self.piece(&mut out, blob_type, kind, flags, c)?;
        }
        Ok(out)
    }

    /// Seals the final blob (type 3): the migration digest and piece count.
    pub fn seal_final(&mut self) -> Result<Vec<u8>, PieceError> {
        let mut plain = self.digest.to_vec();
        plain.extend_from_slice(&self.seq.to_be_bytes());
        let mut out = self.header(3, false, 1);
        self.piece(&mut out, 3, KIND_FINAL, FLAG_LAST_IN_BLOB, &plain)?;
        Ok(out)
    }
}
