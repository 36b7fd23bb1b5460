//! One virtio-tpm request: a descriptor chain whose device-readable
//! descriptors hold a TPM command and whose device-writable descriptors that
//! follow receive the response (crosvm's layout, device id 62).
//!
//! Every chain gets a defined result, and the queue keeps going:
//! * a well-formed chain: the TPM's response, used length = its size;
//! * a command whose size field disagrees with the bytes sent, or longer
//!   than [`MAX_MESSAGE`]: a 10-byte TPM_RC_COMMAND_SIZE response, nothing
//!   executed;
//! * a chain that cannot carry a response (no writable descriptor, fewer
//!   than 10 writable bytes, a readable descriptor after a writable one, or
//!   buffers outside guest memory): used length 0, nothing executed;
//! * a response longer than the writable space: used length 0. The command
//!   did run, as it would on a hardware TPM whose driver gave too small a
//!   buffer; the error is logged.

use crate::engine::tpm2;
use crate::instance::Vtpm;
use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Largest command and response (Linux's TPM_BUFSIZE; crosvm's limit).
pub const MAX_MESSAGE: usize = 4096;

/// Why a chain gets used length 0.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("the chain has no device-writable descriptor for the response")]
    NoWritable,
    #[error("a device-readable descriptor follows a device-writable one")]
    Misordered,
    #[error("only {0} writable bytes: not even a TPM response header fits")]
    TooSmall(usize),
    #[error("{0}-byte response does not fit the {1} writable bytes (the command was executed; its response is dropped)")]
    ResponseTooLarge(usize, usize),
    #[error("descriptor buffer {addr:#x}+{len} is not in guest memory")]
    BadAddress { addr: u64, len: u32 },
}

/// The buffers of one chain, split by direction.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    readable: Vec<(GuestAddress, u32)>,
    writable: Vec<(GuestAddress, u32)>,
}

impl Buffers {
    /// Sorts `descs` into readable then writable buffers, in chain order.
    pub fn split(descs: impl IntoIterator<Item = Descriptor>) -> Result<Buffers, ChainError> {
        let mut b = Buffers::default();
        for d in descs {
            if d.is_write_only() {
                b.writable.push((d.addr(), d.len()));
            } else if b.writable.is_empty() {
                b.readable.push((d.addr(), d.len()));
            } else {
                return Err(ChainError::Misordered);
            }
        }
        let space = b.writable_len();
        if b.writable.is_empty() {
            return Err(ChainError::NoWritable);
        }
        if space < tpm2::HEADER_LEN {
            return Err(ChainError::TooSmall(space));
        }
        Ok(b)
    }

    fn readable_len(&self) -> usize {
        self.readable.iter().map(|(_, l)| *l as usize).sum()
    }

    fn writable_len(&self) -> usize {
        self.writable.iter().map(|(_, l)| *l as usize).sum()
    }

    /// Gathers the command, or None if it is over [`MAX_MESSAGE`].
    fn read_command<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<Option<Vec<u8>>, ChainError> {
        let total = self.readable_len();
        if total > MAX_MESSAGE {
            return Ok(None);
        }
        let mut cmd = vec![0u8; total];
        let mut at = 0;
        for &(addr, len) in &self.readable {
            let end = at + len as usize;
            mem.read_slice(&mut cmd[at..end], addr)
                .map_err(|_| ChainError::BadAddress { addr: addr.0, len })?;
            at = end;
        }
        Ok(Some(cmd))
    }

    /// Scatters `data` over the writable buffers.
    fn write_response<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        data: &[u8],
    ) -> Result<(), ChainError> {
        if data.len() > self.writable_len() {
            return Err(ChainError::ResponseTooLarge(
                data.len(),
                self.writable_len(),
            ));
        }
        let mut rest = data;
        for &(addr, len) in &self.writable {
            if rest.is_empty() {
                break;
            }
            let n = rest.len().min(len as usize);
            mem.write_slice(&rest[..n], addr)
                .map_err(|_| ChainError::BadAddress { addr: addr.0, len })?;
            rest = &rest[n..];
        }
        Ok(())
    }
}

/// Serves one chain; returns the used length to report.
pub fn serve<M: GuestMemory + ?Sized>(
    vtpm: &Vtpm,
    mem: &M,
    descs: impl IntoIterator<Item = Descriptor>,
    out: &mut Vec<u8>,
) -> Result<u32, ChainError> {
    let bufs = Buffers::split(descs)?;
    match bufs.read_command(mem)? {
        Some(cmd) if tpm2::command_frame_ok(&cmd, vtpm.io_size() as usize) => {
            log::trace!(
                "virtio-tpm: command {:#x}, {} bytes",
                tpm2::command_code(&cmd).unwrap_or(0),
                cmd.len()
            );
            vtpm.process(&cmd, out);
        }
        Some(cmd) => {
            log::warn!(
                "virtio-tpm: {} command bytes but the header announces {}; answering TPM_RC_COMMAND_SIZE",
                cmd.len(),
                tpm2::Header::parse(&cmd).map_or(0, |h| h.size)
            );
            out.clear();
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_COMMAND_SIZE));
        }
        None => {
            log::warn!(
                "virtio-tpm: {}-byte command is over the {MAX_MESSAGE}-byte limit; answering TPM_RC_COMMAND_SIZE",
                bufs.readable_len()
            );
            out.clear();
            out.extend_from_slice(&tpm2::error_response(tpm2::RC_COMMAND_SIZE));
        }
    }
    bufs.write_response(mem, out)?;
    Ok(out.len() as u32)
}

/// Serves every chain available on `queue`, in order. Returns each
/// chain's head index and used length (0 for a chain that got no
/// response); the caller publishes them and signals the driver.
pub fn serve_available<M>(
    vtpm: &Vtpm,
    mem: M,
    queue: &mut Queue,
    out: &mut Vec<u8>,
) -> Result<Vec<(u16, u32)>, virtio_queue::Error>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let chains: Vec<_> = queue.iter(mem.clone())?.collect();
    Ok(chains
        .into_iter()
        .map(|chain| {
            let head = chain.head_index();
            let used = serve(vtpm, &*mem, chain, out).unwrap_or_else(|e| {
                log::warn!("virtio-tpm: request {head} gets no response: {e}");
                0
            });
            (head, used)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const F_WRITE: u16 = 2;

    fn d(addr: u64, len: u32, write: bool) -> Descriptor {
        Descriptor::new(addr, len, if write { F_WRITE } else { 0 }, 0)
    }

    #[test]
    fn split_sorts_and_checks_order() {
        let b = Buffers::split([d(0, 4, false), d(8, 6, false), d(16, 20, true)]).unwrap();
        assert_eq!(b.readable_len(), 10);
        assert_eq!(b.writable_len(), 20);
        assert_eq!(
            Buffers::split([d(16, 20, true), d(0, 10, false)]),
            Err(ChainError::Misordered)
        );
        assert_eq!(
            Buffers::split([d(0, 10, false)]),
            Err(ChainError::NoWritable)
        );
        assert_eq!(Buffers::split([]), Err(ChainError::NoWritable));
        assert_eq!(
            Buffers::split([d(0, 10, false), d(16, 9, true)]),
            Err(ChainError::TooSmall(9))
        );
    }

    #[test]
    fn gather_and_scatter_across_descriptors() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x100)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(0x200)).unwrap();
        let b = Buffers::split([
            d(0x100, 3, false),
            d(0x200, 2, false),
            d(0x300, 4, true),
            d(0x400, 8, true),
        ])
        .unwrap();
        assert_eq!(b.read_command(&mem).unwrap().unwrap(), vec![1, 2, 3, 4, 5]);
        b.write_response(&mem, &[9; 10]).unwrap();
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0x400)).unwrap();
        assert_eq!(got, [9, 9, 9, 9, 9, 9, 0, 0]);
        assert_eq!(
            b.write_response(&mem, &[0; 13]),
            Err(ChainError::ResponseTooLarge(13, 12))
        );
    }

    #[test]
    fn buffers_outside_memory_and_oversized_commands() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let b = Buffers::split([d(0xfff0, 0x20, false), d(0, 16, true)]).unwrap();
        assert!(matches!(
            b.read_command(&mem),
            Err(ChainError::BadAddress { .. })
        ));
        let b =
            Buffers::split([d(0, 4000, false), d(0x2000, 97, false), d(0x3000, 16, true)]).unwrap();
        assert_eq!(b.read_command(&mem).unwrap(), None);
        let b = Buffers::split([d(0, 10, false), d(0xfffc, 16, true)]).unwrap();
        assert!(matches!(
            b.write_response(&mem, &[0; 10]),
            Err(ChainError::BadAddress { .. })
        ));
    }

    mod on_a_mock_queue {
        //! Whole requests through virtio-queue's mock split queue, served by
        //! an instance on the fake engine.

        use super::super::*;
        use crate::engine::fake::FakeEngine;
        use crate::instance::{Options, Vtpm};
        use crate::migration::session::Session;
        use crate::storage::StateDir;
        use std::sync::Arc;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

        const W: u16 = 2;
        const CMD: u64 = 0x10_0000;
        const RSP: u64 = 0x11_0000;

        fn running_vtpm() -> (tempfile::TempDir, Vtpm) {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(StateDir::open(dir.path(), 0o600, None).unwrap());
            let (engine, _) = FakeEngine::new(store.clone());
            let v = Vtpm::new(
                Box::new(engine),
                store,
                Options::default(),
                Session::new(None, None, false, false),
            )
            .unwrap();
            v.start(Some(crate::engine::tpm2::StartupType::Clear))
                .unwrap();
            (dir, v)
        }

        fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
        }

        fn serve_chains(
            v: &Vtpm,
            mem: &GuestMemoryMmap,
            descs: &[RawDescriptor],
        ) -> Vec<(u16, u32)> {
            let q = MockSplitQueue::new(mem, 16);
            q.add_desc_chains(descs, 0).unwrap();
            let mut queue: Queue = q.create_queue().unwrap();
            let mut out = Vec::new();
            serve_available(v, mem, &mut queue, &mut out).unwrap()
        }

        #[test]
        fn good_and_bad_chains_in_one_kick() {
            let (_d, v) = running_vtpm();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let su = tpm2::startup_command(tpm2::SU_CLEAR);
            let getrandom = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];
            mem.write_slice(&su, GuestAddress(CMD)).unwrap();
            mem.write_slice(&getrandom, GuestAddress(CMD + 0x100))
                .unwrap();
            const NEXT: u16 = 1;
            let used = serve_chains(
                &v,
                &mem,
                &[
                    // 0: a command split over two descriptors, one response buffer.
                    raw(CMD + 0x100, 6, NEXT, 1),
                    raw(CMD + 0x106, 6, NEXT, 2),
                    raw(RSP, 64, W, 0),
                    // 3: no writable descriptor: no response.
                    raw(CMD, su.len() as u32, 0, 0),
                    // 4: a writable buffer too small for any response.
                    raw(CMD, su.len() as u32, NEXT, 5),
                    raw(RSP + 0x100, 4, W, 0),
                    // 6: a size field that disagrees with the bytes sent.
                    raw(CMD, 11, NEXT, 7),
                    raw(RSP + 0x200, 64, W, 0),
                ],
            );
            assert_eq!(used, vec![(0, 10), (3, 0), (4, 0), (6, 10)]);
            let mut rsp = [0u8; 10];
            mem.read_slice(&mut rsp, GuestAddress(RSP)).unwrap();
            assert_eq!(tpm2::response_code(&rsp), tpm2::RC_SUCCESS, "GetRandom");
            mem.read_slice(&mut rsp, GuestAddress(RSP + 0x200)).unwrap();
            assert_eq!(tpm2::response_code(&rsp), tpm2::RC_COMMAND_SIZE);
        }

        #[test]
        fn oversized_command_and_foreign_address() {
            let (_d, v) = running_vtpm();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let used = serve_chains(
                &v,
                &mem,
                &[
                    // 0: 5000 readable bytes: over the 4096-byte limit.
                    raw(CMD, 5000, 1, 1),
                    raw(RSP, 64, W, 0),
                    // 2: a response buffer outside guest memory.
                    raw(CMD, 12, 1, 3),
                    raw(0x4000_0000, 64, W, 0),
                ],
            );
            assert_eq!(used, vec![(0, 10), (2, 0)]);
            let mut rsp = [0u8; 10];
            mem.read_slice(&mut rsp, GuestAddress(RSP)).unwrap();
            assert_eq!(tpm2::response_code(&rsp), tpm2::RC_COMMAND_SIZE);
        }

        #[test]
        fn stopped_tpm_answers_failure() {
            let (_d, v) = running_vtpm();
            v.power_off();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
            let su = tpm2::startup_command(tpm2::SU_CLEAR);
            mem.write_slice(&su, GuestAddress(CMD)).unwrap();
            let used = serve_chains(
                &v,
                &mem,
                &[raw(CMD, su.len() as u32, 1, 1), raw(RSP, 64, W, 0)],
            );
            assert_eq!(used, vec![(0, 10)]);
            let mut rsp = [0u8; 10];
            mem.read_slice(&mut rsp, GuestAddress(RSP)).unwrap();
            assert_eq!(tpm2::response_code(&rsp), tpm2::RC_FAILURE);
        }
    }
}
