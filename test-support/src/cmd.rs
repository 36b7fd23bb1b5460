//! Raw TPM 2.0 commands built by hand (empty password authorisation,
//! objects marked noDA so no dictionary-attack retries), shared by the
//! integration tests and the benchmark.

fn finish(tag: u16, cc: u32, body: &[u8]) -> Vec<u8> {
    let mut v = tag.to_be_bytes().to_vec();
    v.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    v.extend_from_slice(&cc.to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn pw_auth(b: &mut Vec<u8>) {
    b.extend_from_slice(&9u32.to_be_bytes());
    b.extend_from_slice(&0x4000_0009u32.to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, 0, 0]);
}

pub fn rc(resp: &[u8]) -> u32 {
    u32::from_be_bytes([resp[6], resp[7], resp[8], resp[9]])
}

pub fn startup_clear() -> Vec<u8> {
    finish(0x8001, 0x144, &[0, 0])
}

pub fn startup_state() -> Vec<u8> {
    finish(0x8001, 0x144, &[0, 1])
}

pub fn shutdown_state() -> Vec<u8> {
    finish(0x8001, 0x145, &[0, 1])
}

pub fn get_random(n: u16) -> Vec<u8> {
    finish(0x8001, 0x17b, &n.to_be_bytes())
}

pub fn pcr_read(pcr: u32) -> Vec<u8> {
    let mut sel = [0u8; 3];
    sel[(pcr / 8) as usize] = 1 << (pcr % 8);
    let mut b = 1u32.to_be_bytes().to_vec();
    b.extend_from_slice(&[0, 0x0b, 3]);
    b.extend_from_slice(&sel);
    finish(0x8001, 0x17e, &b)
}

/// The SHA-256 digest from a PCR_Read response for one PCR.
pub fn pcr_value(resp: &[u8]) -> [u8; 32] {
    resp[30..62].try_into().unwrap()
}

pub fn pcr_extend(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    let mut b = pcr.to_be_bytes().to_vec();
    pw_auth(&mut b);
    b.extend_from_slice(&1u32.to_be_bytes());
    b.extend_from_slice(&[0, 0x0b]);
    b.extend_from_slice(digest);
    finish(0x8002, 0x182, &b)
}

/// TPM2_Hash of `data` with SHA-256, no ticket.
pub fn hash(data: &[u8]) -> Vec<u8> {
    let mut b = (data.len() as u16).to_be_bytes().to_vec();
    b.extend_from_slice(data);
    b.extend_from_slice(&[0, 0x0b]);
    b.extend_from_slice(&0x4000_0007u32.to_be_bytes());
    finish(0x8001, 0x17d, &b)
}

pub fn nv_define(index: u32, size: u16) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    pw_auth(&mut b);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&14u16.to_be_bytes());
    b.extend_from_slice(&index.to_be_bytes());
    b.extend_from_slice(&[0, 0x0b]);
    b.extend_from_slice(&(0x0000_0004u32 | 0x0004_0000 | 0x0200_0000).to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&size.to_be_bytes());
    finish(0x8002, 0x12a, &b)
}

pub fn nv_write(index: u32, data: &[u8]) -> Vec<u8> {
    let mut b = index.to_be_bytes().to_vec();
    b.extend_from_slice(&index.to_be_bytes());
    pw_auth(&mut b);
    b.extend_from_slice(&(data.len() as u16).to_be_bytes());
    b.extend_from_slice(data);
    b.extend_from_slice(&[0, 0]);
    finish(0x8002, 0x137, &b)
}

pub fn nv_read(index: u32, size: u16) -> Vec<u8> {
    let mut b = index.to_be_bytes().to_vec();
    b.extend_from_slice(&index.to_be_bytes());
    pw_auth(&mut b);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    finish(0x8002, 0x14e, &b)
}

/// The data bytes of an NV_Read response.
pub fn nv_data(resp: &[u8]) -> Vec<u8> {
    let n = u16::from_be_bytes([resp[14], resp[15]]) as usize;
    resp[16..16 + n].to_vec()
}

/// CreatePrimary under the owner: an ECC P-256 or RSA-2048 storage key, or
/// an unrestricted ECDSA-SHA256 signing key.
pub fn create_primary(kind: &str, unique: u8) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    pw_auth(&mut b);
    b.extend_from_slice(&[0, 4, 0, 0, 0, 0]);
    let mut p = Vec::new();
    // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|noDA
    let base = 0x0000_0472u32;
    match kind {
        "rsa" => {
            p.extend_from_slice(&[0, 1, 0, 0x0b]);
            p.extend_from_slice(&(base | 0x0003_0000).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6, 0, 128, 0, 0x43, 0, 0x10]);
            p.extend_from_slice(&2048u16.to_be_bytes());
            p.extend_from_slice(&0u32.to_be_bytes());
            p.extend_from_slice(&[0, 1, unique]);
        }
        "ecc" => {
            p.extend_from_slice(&[0, 0x23, 0, 0x0b]);
            p.extend_from_slice(&(base | 0x0003_0000).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6, 0, 128, 0, 0x43, 0, 0x10, 0, 3, 0, 0x10]);
            p.extend_from_slice(&[0, 1, unique, 0, 1, unique]);
        }
        _ => {
            // ECDSA signing key: sign (bit 18), scheme ECDSA/SHA-256.
            p.extend_from_slice(&[0, 0x23, 0, 0x0b]);
            p.extend_from_slice(&(base | 0x0004_0000).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0x10, 0, 0x18, 0, 0x0b, 0, 3, 0, 0x10]);
            p.extend_from_slice(&[0, 1, unique, 0, 1, unique]);
        }
    }
    b.extend_from_slice(&(p.len() as u16).to_be_bytes());
    b.extend_from_slice(&p);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    finish(0x8002, 0x131, &b)
}

/// The object handle a CreatePrimary response returned.
pub fn handle(resp: &[u8]) -> u32 {
    u32::from_be_bytes([resp[10], resp[11], resp[12], resp[13]])
}

pub fn flush(handle: u32) -> Vec<u8> {
    finish(0x8001, 0x165, &handle.to_be_bytes())
}

pub fn sign_ecdsa(key: u32) -> Vec<u8> {
    let mut b = key.to_be_bytes().to_vec();
    pw_auth(&mut b);
    b.extend_from_slice(&32u16.to_be_bytes());
    b.extend_from_slice(&[0x5a; 32]);
    b.extend_from_slice(&[0, 0x18, 0, 0x0b]);
    b.extend_from_slice(&[0x80, 0x24]);
    b.extend_from_slice(&0x4000_0007u32.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    finish(0x8002, 0x15d, &b)
}

/// An unbound, unsalted HMAC session with SHA-256.
pub fn start_auth_session() -> Vec<u8> {
    let mut b = 0x4000_0007u32.to_be_bytes().to_vec();
    b.extend_from_slice(&0x4000_0007u32.to_be_bytes());
    b.extend_from_slice(&16u16.to_be_bytes());
    b.extend_from_slice(&[0x11; 16]);
    b.extend_from_slice(&[0, 0, 0, 0, 0x10, 0, 0x0b]);
    finish(0x8001, 0x176, &b)
}

/// EvictControl: makes the loaded `object` persistent at `persistent`
/// (owner authorisation).
pub fn evict_control(object: u32, persistent: u32) -> Vec<u8> {
    let mut b = 0x4000_0001u32.to_be_bytes().to_vec();
    b.extend_from_slice(&object.to_be_bytes());
    pw_auth(&mut b);
    b.extend_from_slice(&persistent.to_be_bytes());
    finish(0x8002, 0x120, &b)
}

/// ReadPublic: the response carries the public area and the name.
pub fn read_public(handle: u32) -> Vec<u8> {
    finish(0x8001, 0x173, &handle.to_be_bytes())
}
