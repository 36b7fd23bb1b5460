//! The connections one channel serves on threads at once, and which one
//! makes room when all are taken (see the fairness rules in [`super`]).

use super::{Stream, IDLE_TIMEOUT, WRITE_TIMEOUT};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Entry {
    id: u64,
    last_active: Instant,
    busy: bool,
    pinned: bool,
    closer: Stream,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    live: Vec<Entry>,
}

/// The connections one channel serves at once (see the module rules).
#[derive(Debug)]
pub struct Slots {
    name: &'static str,
    max: usize,
    table: Mutex<Table>,
}

/// One admitted connection; leaving drops its slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
}

impl Slots {
    pub fn new(name: &'static str, max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            name,
            max,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections now held.
    pub fn len(&self) -> usize {
        self.table().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a slot for `s`. When all are taken, the connection idle the
    /// longest that is neither pinned nor in the middle of a request is
    /// closed to make room; if every one is busy or pinned, `s` is refused.
    pub fn admit(self: &Arc<Self>, s: &Stream) -> Option<Slot> {
        let closer = s.try_clone().ok()?;
        s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
        let mut t = self.table();
        if t.live.len() >= self.max {
            let victim = t
                .live
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.pinned && !e.busy)
                .min_by_key(|(_, e)| e.last_active)
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    let e = t.live.swap_remove(i);
                    log::warn!(
                        "{}: {} connections open; closing the one idle longest ({:?})",
                        self.name,
                        self.max,
                        e.last_active.elapsed()
                    );
                    e.closer.shutdown();
                }
                None => {
                    log::warn!(
                        "{}: refusing a connection, all {} are busy or pinned",
                        self.name,
                        self.max
                    );
                    return None;
                }
            }
        }
        t.next_id += 1;
        let id = t.next_id;
        t.live.push(Entry {
            id,
            last_active: Instant::now(),
            busy: false,
            pinned: false,
            closer,
        });
        Some(Slot {
            slots: self.clone(),
            id,
        })
    }

    fn with(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.table().live.iter_mut().find(|e| e.id == id) {
            f(e);
        }
    }
}

impl Slot {
    /// A request started (`true`) or was answered (`false`).
    pub fn busy(&self, on: bool) {
        self.slots.with(self.id, |e| {
            e.busy = on;
            e.last_active = Instant::now();
        });
    }

    /// Pins this connection (the VMM's), unpinning any other of the
    /// channel: it is never closed for being idle or to make room.
    pub fn pin(&self) {
        for e in self.slots.table().live.iter_mut() {
            e.pinned = e.id == self.id;
            let t = if e.pinned { None } else { Some(WRITE_TIMEOUT) };
            let _ = e.closer.set_write_timeout(t);
        }
    }

    pub fn is_pinned(&self) -> bool {
        self.slots
            .table()
            .live
            .iter()
            .any(|e| e.id == self.id && e.pinned)
    }

    /// How long to wait for the next request on this connection.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (!self.is_pinned()).then_some(IDLE_TIMEOUT)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().live.retain(|e| e.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), b)
    }

    #[test]
    fn full_house_closes_the_longest_idle_unpinned_connection() {
        let slots = Slots::new("test", 2);
        let (a, _pa) = pair();
        let (b, _pb) = pair();
        let (c, _pc) = pair();
        let (d, _pd) = pair();
        let sa = slots.admit(&a).unwrap();
        let sb = slots.admit(&b).unwrap();
        sa.pin();
        sb.busy(true);
        // a is pinned, b is mid-request: nothing may be closed.
        assert!(slots.admit(&c).is_none());
        sb.busy(false);
        let _sc = slots.admit(&c).unwrap();
        // b was closed to make room: its reader sees end of stream.
        let mut b = b;
        let mut buf = [0u8; 1];
        assert_eq!(b.read(&mut buf).unwrap(), 0);
        assert_eq!(slots.len(), 2);
        assert!(sa.is_pinned() && sa.idle_timeout().is_none());
        drop(sb);
        assert_eq!(slots.len(), 2, "b's slot was already given up");
        drop(sa);
        let sd = slots.admit(&d).unwrap();
        assert_eq!(sd.idle_timeout(), Some(IDLE_TIMEOUT));
    }
}
