//! The virtio-tpm device behind one vhost-user connection: feature
//! negotiation, the request queue, device reset and device-state transfer.
//!
//! The TPM itself is the process's [`Vtpm`], shared with the admin socket
//! and outliving connections; a new `TpmDevice` is made for each frontend.

use super::request::{self, MAX_MESSAGE};
use crate::instance::Vtpm;
use crate::migration::stream;
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
use virtio_queue::QueueOwnedT;
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
    Transfer(&'static str, String),
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
        })
    }

    /// Serves every available chain, then tells the driver.
    fn process_queue(&self, vring: &VringRwLock) -> Result<(), DeviceError> {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(guard.clone())
            .map_err(DeviceError::Queue)?
            .collect();
        if chains.is_empty() {
            return Ok(());
        }
        let mut out = Vec::with_capacity(MAX_MESSAGE);
        for chain in chains {
            let head = chain.head_index();
            let used = match request::serve(&self.vtpm, &*guard, chain, &mut out) {
                Ok(n) => n,
                Err(e) => {
                    log::warn!("virtio-tpm: request {head} gets no response: {e}");
                    0
                }
            };
            vring.add_used(head, used).map_err(DeviceError::Queue)?;
        }
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
            .map_err(|e| DeviceError::Transfer(name, e.to_string()))?;
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
        handle
            .join()
            .unwrap_or_else(|_| Err(DeviceError::Transfer("transfer", "worker panicked".into())))
    }
}

/// SAVE: the sealed (or, if allowed, plaintext) state blobs as one stream;
/// closing `file` tells the frontend it has everything.
fn save_state(vtpm: &Vtpm, mut file: File) -> Result<(), DeviceError> {
    let bytes = vtpm
        .export_state_stream()
        .map_err(|e| DeviceError::Transfer("save", e))?;
    file.write_all(&bytes)
        .map_err(|e| DeviceError::Transfer("save", e.to_string()))?;
    log::info!("device state saved ({} bytes)", bytes.len());
    Ok(())
}

/// LOAD: reads to end of stream (at most [`stream::MAX_STREAM`] bytes) and
/// hands the blobs to the instance, which unlocks only on a verified state.
fn load_state(vtpm: &Vtpm, file: File) -> Result<(), DeviceError> {
    let mut bytes = Vec::new();
    let limit = stream::MAX_STREAM as u64 + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| DeviceError::Transfer("load", e.to_string()))?;
    if bytes.len() as u64 == limit {
        return Err(DeviceError::Transfer(
            "load",
            format!("stream is over {} bytes", stream::MAX_STREAM),
        ));
    }
    vtpm.import_state_stream(&bytes)
        .map_err(|e| DeviceError::Transfer("load", e))?;
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

    fn reset_device(&self) {
        log::info!("virtio-tpm: device reset: power-cycling the TPM");
        self.vtpm.reset();
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
