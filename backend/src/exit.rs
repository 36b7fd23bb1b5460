//! Why the process stops, and the channel frontends report it on. Lives
//! below the frontends (they only send) and beside the daemon (which waits).
//!
//! A report also writes one byte to the daemon's wake-up socket, so the
//! thread that waits (the main thread, which also accepts connections and
//! sees signals) wakes up for it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Why the daemon stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// CMD_SHUTDOWN was answered.
    Shutdown,
    /// The data client went away and `--terminate` was given.
    DataClosed,
    /// The control client went away and `--ctrl ...,terminate` was given.
    CtrlClosed,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// A frontend failed and cannot serve any more (the report says why).
    Failed(String),
}

/// Where frontends report that the process should stop.
#[derive(Debug, Clone)]
pub struct ExitTx {
    tx: Sender<Exit>,
    /// Non-blocking write end of the waiter's wake-up socket.
    wake: Arc<UnixStream>,
}

impl ExitTx {
    pub fn new(tx: Sender<Exit>, wake: Arc<UnixStream>) -> ExitTx {
        ExitTx { tx, wake }
    }

    /// The write end of the waiter's wake-up socket.
    pub fn wake_socket(&self) -> Arc<UnixStream> {
        self.wake.clone()
    }
}

/// Reports `why`; a daemon already stopping is not waiting any more,
/// which is fine. (A full wake-up socket already wakes the waiter.)
pub fn report(tx: &ExitTx, why: Exit) {
    let _ = tx.tx.send(why);
    let _ = (&*tx.wake).write(&[1]);
}
