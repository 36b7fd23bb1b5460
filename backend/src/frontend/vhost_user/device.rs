//! The virtio-tpm device behind one vhost-user connection: feature
//! negotiation, the request queue, device reset and device-state transfer.
//!
//! The TPM itself is the process's [`Vtpm`], shared with the admin socket
//! and outliving connections; a new `TpmDevice` is made for each frontend.

use super::request::{self, MAX_MESSAGE};
use crate::instance::{BlobKind, InstanceError, Vtpm};
use crate::migration::stream::{self, StreamError};
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// crosvm's private virtio device id for a TPM (no VIRTIO spec id exists).
pub const VIRTIO_ID_TPM: u32 = 62;
/// One request queue.
pub const NUM_QUEUES: usize = 1;
/// crosvm uses 2; frontends may choose any size up to this.
pub const MAX_QUEUE_SIZE: usize = 64;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("event {0} is not the request queue's")]
    UnknownEvent(u16),
    #[error("only kicks (EPOLLIN) are expected, got {0:?}")]
    UnexpectedEvents(EventSet),
    #[error("the request queue is broken: {0}")]
    Queue(virtio_queue::Error),
    #[error("cannot signal the frontend: {0}")]
    Signal(io::Error),
    #[error("device state can only be transferred while the device is stopped")]
    Phase,
    #[error("a device-state transfer is still running")]
    Busy,
    #[error("CHECK_DEVICE_STATE without a transfer")]
    NoTransfer,
    #[error("device state {0} failed: {1}")]
    Io(&'static str, #[source] io::Error),
    #[error("device state {0} refused: {1}")]
    Instance(&'static str, #[source] InstanceError),
    #[error("device state load: {0}")]
    Stream(#[from] StreamError),
    #[error("device state load: the stream is over {} bytes", stream::MAX_STREAM)]
    TooLong,
    #[error("the device-state worker panicked")]
    Panicked,
}

impl From<DeviceError> for io::Error {
    fn from(e: DeviceError) -> io::Error {
        io::Error::other(e)
    }
}

/// The device served to one frontend connection.
pub struct TpmDevice {
    vtpm: Arc<Vtpm>,
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    exit: (EventConsumer, EventNotifier),
    transfer: Mutex<Option<JoinHandle<Result<(), DeviceError>>>>,
    /// The ring was stopped (GET_VRING_BASE) since the last request.
    ring_stopped: AtomicBool,
    /// The queue's next available index after the last request served.
    last_avail: Mutex<Option<u16>>,
}

/// Whether a ring that restarts at `base`, after last standing at `last`,
/// was reset by the guest rather than paused and resumed. A resume
/// restarts where the ring stood; a device reset (a guest reboot) restarts
/// it at 0. QEMU (up to 11.1 at least) sends no RESET_DEVICE for a generic
/// vhost-user device, so this is how a reboot is seen. A ring that stood
/// exactly at 0 (unused, or wrapped to 0) cannot be told apart and is
/// taken as a resume.
pub fn ring_restart_is_reset(last: Option<u16>, base: u16) -> bool {
    base == 0 && last.is_some_and(|l| l != 0)
}

impl std::fmt::Debug for TpmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmDevice").finish_non_exhaustive()
    }
}

impl TpmDevice {
    pub fn new(vtpm: Arc<Vtpm>) -> io::Result<TpmDevice> {
        Ok(TpmDevice {
            vtpm,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            transfer: Mutex::new(None),
            ring_stopped: AtomicBool::new(false),
            last_avail: Mutex::new(None),
        })
    }

    /// Serves every available chain, then tells the driver.
    fn process_queue(&self, vring: &VringRwLock) -> Result<(), DeviceError> {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let mut last = self.last_avail.lock().unwrap_or_else(|e| e.into_inner());
        if self.ring_stopped.swap(false, Ordering::SeqCst) {
            let base = vring.queue_next_avail();
            if ring_restart_is_reset(*last, base) {
                log::info!(
                    "virtio-tpm: the ring restarted at 0 (it stood at {}): the guest reset the device; power-cycling the TPM",
                    last.unwrap_or(0)
                );
                if let Err(e) = self.vtpm.reset() {
                    log::error!("virtio-tpm: device reset: {e}");
                }
            }
        }
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        let used = request::serve_available(
            &self.vtpm,
            guard.clone(),
            vring.get_mut().get_queue_mut(),
            &mut out,
        )
        .map_err(DeviceError::Queue)?;
        if used.is_empty() {
            return Ok(());
        }
        for (head, used) in used {
            vring.add_used(head, used).map_err(DeviceError::Queue)?;
        }
        *last = Some(vring.queue_next_avail());
        let notify = !self.event_idx.load(Ordering::Relaxed)
            || vring.needs_notification().map_err(DeviceError::Queue)?;
        if notify {
            vring.signal_used_queue().map_err(DeviceError::Signal)?;
        }
        Ok(())
    }

    fn start_transfer(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> Result<(), DeviceError> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(DeviceError::Phase);
        }
        let mut slot = self.transfer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(DeviceError::Busy);
        }
        let vtpm = self.vtpm.clone();
        let save = direction == VhostTransferStateDirection::SAVE;
        if !save {
            // A loaded state replaces the ring's history too: however the
            // ring restarts after it, that is not a guest reset.
            *self.last_avail.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let name = if save { "state-save" } else { "state-load" };
        let work = move || {
            if save {
                save_state(&vtpm, file)
            } else {
                load_state(&vtpm, file)
            }
        };
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(work)
            .map_err(|e| DeviceError::Io(name, e))?;
        *slot = Some(handle);
        Ok(())
    }

    fn finish_transfer(&self) -> Result<(), DeviceError> {
        let handle = self
            .transfer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or(DeviceError::NoTransfer)?;
        handle.join().unwrap_or(Err(DeviceError::Panicked))
    }
}

/// SAVE: the sealed (or, if allowed, plaintext) state blobs as one stream;
/// closing `file` tells the frontend it has everything.
fn save_state(vtpm: &Vtpm, mut file: File) -> Result<(), DeviceError> {
    let blobs = vtpm
        .export_all()
        .map_err(|e| DeviceError::Instance("save", e))?;
    let framed: Vec<(u32, Vec<u8>)> = blobs.into_iter().map(|(k, b)| (k.number(), b)).collect();
    let bytes = stream::encode(&framed);
    file.write_all(&bytes)
        .map_err(|e| DeviceError::Io("save", e))?;
    log::info!("device state saved ({} bytes)", bytes.len());
    Ok(())
}

/// LOAD: reads to end of stream (at most [`stream::MAX_STREAM`] bytes) and
/// hands the blobs to the instance, which unlocks only on a verified state.
fn load_state(vtpm: &Vtpm, file: File) -> Result<(), DeviceError> {
    let r = read_and_load(vtpm, file);
    if let Err(DeviceError::Stream(_) | DeviceError::TooLong | DeviceError::Io(..)) = &r {
        // Nothing reached the instance: it forgets the migration id as a
        // failed import does, so a retry needs a fresh one.
        vtpm.abandon_import();
    }
    r
}

fn read_and_load(vtpm: &Vtpm, file: File) -> Result<(), DeviceError> {
    let mut bytes = Vec::new();
    let limit = stream::MAX_STREAM as u64 + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| DeviceError::Io("load", e))?;
    if bytes.len() as u64 == limit {
        return Err(DeviceError::TooLong);
    }
    let blobs = stream::decode(&bytes)?
        .into_iter()
        .map(|(n, b)| Ok((BlobKind::from_number(n).ok_or(StreamError::BadType(n))?, b)))
        .collect::<Result<Vec<_>, StreamError>>()?;
    vtpm.import_all(&blobs)
        .map_err(|e| DeviceError::Instance("load", e))?;
    log::info!("device state loaded ({} bytes)", bytes.len());
    Ok(())
}

/// Logs what the frontend cannot see: it only learns pass or fail.
fn logged<T>(what: &str, r: Result<T, DeviceError>) -> io::Result<T> {
    r.map_err(|e| {
        log::error!("{what}: {e}");
        e.into()
    })
}

impl VhostUserBackend for TpmDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.ring_stopped.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn reset_device(&self) {
        log::info!("virtio-tpm: device reset: power-cycling the TPM");
        if let Err(e) = self.vtpm.reset() {
            log::error!("virtio-tpm: device reset: {e}");
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return logged("virtio-tpm", Err(DeviceError::UnexpectedEvents(evset)));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return logged("virtio-tpm", Err(DeviceError::UnknownEvent(device_event)));
        };
        if !self.event_idx.load(Ordering::Relaxed) {
            return logged("virtio-tpm", self.process_queue(vring));
        }
        // With EVENT_IDX, loop until no buffer arrived while notifications
        // were off.
        loop {
            logged(
                "virtio-tpm",
                vring.disable_notification().map_err(DeviceError::Queue),
            )?;
            logged("virtio-tpm", self.process_queue(vring))?;
            let more = logged(
                "virtio-tpm",
                vring.enable_notification().map_err(DeviceError::Queue),
            )?;
            if !more {
                return Ok(());
            }
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        logged(
            "SET_DEVICE_STATE_FD",
            self.start_transfer(direction, phase, file),
        )?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        logged("CHECK_DEVICE_STATE", self.finish_transfer())
    }
}

#[cfg(test)]
mod tests {
    use super::ring_restart_is_reset;

    #[test]
    fn reset_is_a_restart_at_zero_of_a_used_ring() {
        assert!(ring_restart_is_reset(Some(17), 0), "guest reboot");
        assert!(!ring_restart_is_reset(Some(17), 17), "pause and resume");
        assert!(!ring_restart_is_reset(None, 0), "first start");
        assert!(
            !ring_restart_is_reset(Some(0), 0),
            "wrapped to 0: taken as a resume"
        );
        assert!(!ring_restart_is_reset(Some(65535), 3), "resume elsewhere");
    }
}
