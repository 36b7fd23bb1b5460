//! A minimal vhost-user VMM for tests: the `vhost` crate's frontend, guest
//! memory in a memfd shared with the device process, one split virtqueue
//! driven by hand, and kick/call eventfds. It plays the guest driver too:
//! it places TPM commands in guest memory and reads responses back.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserHeaderFlag,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 1 << 20;
pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Where commands go.
pub const CMD_BUF: u64 = 0x10000;
/// Where responses go.
pub const RSP_BUF: u64 = 0x20000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// One descriptor of a chain the test builds.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

pub fn readable(addr: u64, len: usize) -> Desc {
    Desc {
        addr,
        len: len as u32,
        writable: false,
    }
}

pub fn writable(addr: u64, len: usize) -> Desc {
    Desc {
        addr,
        len: len as u32,
        writable: true,
    }
}

/// A connected frontend with its guest memory and ring.
pub struct TestVmm {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    next_used: u16,
    pub protocol: VhostUserProtocolFeatures,
    #[allow(dead_code)]
    features: u64,
}

impl TestVmm {
    /// Connects and negotiates features; asks for RESET_DEVICE only if
    /// `with_reset`. Memory and ring are not set up yet.
    pub fn connect(path: &Path, with_reset: bool) -> TestVmm {
        Self::connect_with(path, with_reset, false)
    }

    /// As [`connect`](Self::connect), optionally negotiating
    /// VIRTIO_RING_F_EVENT_IDX (the driver then publishes used_event).
    pub fn connect_with(path: &Path, with_reset: bool, event_idx: bool) -> TestVmm {
        let mut fe = Frontend::connect(path, 1).expect("connect to the vhost-user socket");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let features = fe.get_features().expect("GET_FEATURES");
        let mut want = VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        assert_eq!(features & want, want, "device features {features:#x}");
        fe.set_features(want).expect("SET_FEATURES");
        let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut protocol = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::DEVICE_STATE;
        if with_reset {
            protocol |= VhostUserProtocolFeatures::RESET_DEVICE;
        }
        assert!(offered.contains(protocol), "offered {offered:?}");
        fe.set_protocol_features(protocol)
            .expect("SET_PROTOCOL_FEATURES");
        assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 1);
        fe.set_owner().expect("SET_OWNER");

        let memfd = nix::sys::memfd::memfd_create(
            c"guest-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .expect("memfd_create");
        let file = File::from(memfd);
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("map guest memory");
        let region = mem.find_region(GuestAddress(0)).unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
            .expect("SET_MEM_TABLE");
        TestVmm {
            fe,
            mem,
            kick: EventFd::new(0).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_avail: 0,
            next_used: 0,
            protocol,
            features: want,
        }
    }

    /// Connects, then starts the request queue.
    pub fn start(path: &Path) -> TestVmm {
        let mut v = Self::connect(path, false);
        v.start_ring();
        v
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    /// Lays out an empty ring and hands it to the device.
    pub fn start_ring(&mut self) {
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(0))
            .unwrap();
        self.next_avail = 0;
        self.next_used = 0;
        self.program_ring(0);
    }

    /// Restarts a stopped ring where it stood (SET_VRING_BASE with the
    /// next index), as QEMU does on `cont` or when a migration fails and
    /// the source resumes. [`TestVmm::start_ring`] instead lays out a fresh
    /// ring at 0, which is what a guest reboot looks like.
    pub fn resume_ring(&mut self) {
        self.program_ring(self.next_avail);
    }

    /// Hands the ring in guest memory to the device, starting at `base`.
    fn program_ring(&mut self, base: u16) {
        self.fe.set_vring_num(0, QUEUE_SIZE).expect("SET_VRING_NUM");
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host(DESC_TABLE),
            used_ring_addr: self.host(USED_RING),
            avail_ring_addr: self.host(AVAIL_RING),
            log_addr: None,
        };
        self.fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(0, base).expect("SET_VRING_BASE");
        self.fe
            .set_vring_call(0, &self.call)
            .expect("SET_VRING_CALL");
        self.fe
            .set_vring_kick(0, &self.kick)
            .expect("SET_VRING_KICK");
        self.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    }

    /// After RESET_DEVICE the device forgets the acked features and
    /// disables the ring: negotiate again and restart it.
    pub fn start_ring_after_reset(&mut self) {
        let want = VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.fe
            .set_features(want)
            .expect("SET_FEATURES after reset");
        self.start_ring();
    }

    /// VHOST_USER_RESET_DEVICE (needs `connect(.., true)`).
    pub fn reset_device(&mut self) {
        self.fe.reset_device().expect("RESET_DEVICE");
    }

    /// Writes guest memory.
    pub fn mem_write(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    /// Stops the ring (GET_VRING_BASE), as a VMM does before saving state.
    pub fn stop_ring(&mut self) -> u32 {
        self.fe.get_vring_base(0).expect("GET_VRING_BASE")
    }

    /// Puts one chain in the ring (descriptors 0..n) and kicks.
    pub fn submit(&mut self, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.writable { F_WRITE } else { 0 };
            let next = if i + 1 < descs.len() {
                flags |= F_NEXT;
                i as u16 + 1
            } else {
                0
            };
            let at = GuestAddress(DESC_TABLE + 16 * i as u64);
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, at).unwrap();
        }
        // used_event: with EVENT_IDX, ask for a call when this request is
        // used (ignored by the device otherwise).
        let used_event = AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem
            .write_obj(self.next_used.to_le(), GuestAddress(used_event))
            .unwrap();
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.mem
            .write_obj(0u16.to_le(), GuestAddress(slot))
            .unwrap();
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail.to_le(), GuestAddress(AVAIL_RING + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Waits for the device to return the chain; (head, used length).
    pub fn wait_used(&mut self) -> (u32, u32) {
        let start = Instant::now();
        let mut called = false;
        loop {
            fence(Ordering::SeqCst);
            let idx: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            if u16::from_le(idx) != self.next_used {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the device did not return the request within 60 s"
            );
            // The call eventfd is non-blocking: consume a signal if there
            // is one, otherwise nap briefly and look at the ring again.
            if self.call.read().is_ok() {
                called = true;
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Every request must be followed by a call (used_event asks for
        // one too when EVENT_IDX is on): a driver waiting for it would hang.
        while !called {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the device used the request but never signalled the call eventfd"
            );
            called = self.call.read().is_ok();
            if !called {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let elem = USED_RING + 4 + 8 * u64::from(self.next_used % QUEUE_SIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        self.next_used = self.next_used.wrapping_add(1);
        (u32::from_le(id), u32::from_le(len))
    }

    /// Sends `descs`, returns the used length and that many bytes from
    /// RSP_BUF.
    pub fn request(&mut self, descs: &[Desc]) -> (u32, Vec<u8>) {
        self.submit(descs);
        let (head, len) = self.wait_used();
        assert_eq!(head, 0, "the device returned another chain");
        let mut out = vec![0u8; (len as usize).min(8192)];
        self.mem
            .read_slice(&mut out, GuestAddress(RSP_BUF))
            .unwrap();
        (len, out)
    }

    /// The ordinary layout: the command in one readable descriptor, 4096
    /// writable bytes for the response.
    pub fn tpm(&mut self, cmd: &[u8]) -> Vec<u8> {
        self.mem.write_slice(cmd, GuestAddress(CMD_BUF)).unwrap();
        let (len, rsp) = self.request(&[readable(CMD_BUF, cmd.len()), writable(RSP_BUF, 4096)]);
        assert!(len >= 10, "used length {len} for a well-formed request");
        rsp
    }

    /// SET_DEVICE_STATE_FD(SAVE) + read to EOF + CHECK_DEVICE_STATE, as
    /// cloud-hypervisor does. The ring must be stopped first.
    pub fn save_state(&mut self) -> (Vec<u8>, bool) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let reply = self
            .fe
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(theirs),
            )
            .expect("SET_DEVICE_STATE_FD(SAVE)");
        assert!(reply.is_none(), "the device should use our channel");
        let mut bytes = Vec::new();
        (&ours).read_to_end(&mut bytes).unwrap();
        let ok = self.fe.check_device_state().is_ok();
        (bytes, ok)
    }

    /// SET_DEVICE_STATE_FD(LOAD) + write + close + CHECK_DEVICE_STATE.
    pub fn load_state(&mut self, bytes: &[u8]) -> bool {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let reply = self
            .fe
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(theirs),
            )
            .expect("SET_DEVICE_STATE_FD(LOAD)");
        assert!(reply.is_none(), "the device should use our channel");
        // The device may stop reading early on a bad stream.
        let _ = ours.write_all(bytes);
        drop(ours);
        self.fe.check_device_state().is_ok()
    }
}
