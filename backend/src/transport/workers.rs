//! The threads that serve connections handed off by the accept loop.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a connection thread waits for the next connection after its
/// own ended, before it exits.
pub const LINGER: Duration = Duration::from_millis(250);

type Job = Box<dyn FnOnce() + Send>;

/// The threads that serve one kind of connection. A thread whose
/// connection ended waits [`LINGER`] for the next one before it exits, so
/// a client that opens a connection per command (tpm2-tss) does not pay
/// for a new thread each time, while an idle daemon goes back to its one
/// thread.
#[derive(Debug)]
pub struct Workers {
    name: &'static str,
    /// Threads waiting for a connection, by id, each with its job inbox.
    idle: Mutex<Vec<(u64, std::sync::mpsc::Sender<Job>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Workers {
    pub fn new(name: &'static str) -> Arc<Workers> {
        Arc::new(Workers {
            name,
            idle: Mutex::new(Vec::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(u64, std::sync::mpsc::Sender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on a waiting thread, or on a new one.
    pub fn run(self: &Arc<Self>, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut job: Job = Box::new(job);
        {
            let mut idle = self.idle();
            // Handed over under the lock: a thread finds its inbox gone
            // from the list only once its next job is already in it.
            while let Some((_, inbox)) = idle.pop() {
                match inbox.send(job) {
                    Ok(()) => return Ok(()),
                    Err(back) => job = back.0,
                }
            }
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || me.serve(job))
            .map(drop)
    }

    fn serve(&self, mut job: Job) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, inbox) = std::sync::mpsc::channel();
        loop {
            job();
            self.idle().push((id, tx.clone()));
            job = match inbox.recv_timeout(LINGER) {
                Ok(next) => next,
                Err(_) => {
                    let mut idle = self.idle();
                    match idle.iter().position(|(i, _)| *i == id) {
                        Some(at) => {
                            idle.swap_remove(at);
                            return;
                        }
                        // Taken just now: the job is in the inbox.
                        None => match inbox.try_recv() {
                            Ok(next) => next,
                            Err(_) => return,
                        },
                    }
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_worker_serves_the_next_job_then_leaves_when_idle() {
        use std::sync::mpsc::channel;
        let w = Workers::new("test");
        let (tx, rx) = channel();
        let t = tx.clone();
        w.run(move || t.send(std::thread::current().id()).unwrap())
            .unwrap();
        let first = rx.recv().unwrap();
        // Wait until the thread is back in the idle list, then the next job
        // goes to it instead of a new thread.
        while w.idle().is_empty() {
            std::thread::yield_now();
        }
        let t = tx.clone();
        w.run(move || t.send(std::thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), first, "the waiting thread took the job");
        // Two jobs at once get two threads.
        let gate = Arc::new(std::sync::Barrier::new(2));
        for _ in 0..2 {
            let (t, g) = (tx.clone(), gate.clone());
            w.run(move || {
                g.wait();
                t.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
        }
        assert_ne!(rx.recv().unwrap(), rx.recv().unwrap());
        // Idle past LINGER, every thread has left.
        let start = Instant::now();
        while !w.idle().is_empty() {
            assert!(start.elapsed() < LINGER * 40, "threads did not leave");
            std::thread::sleep(LINGER / 4);
        }
    }
}
