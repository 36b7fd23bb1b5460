//! Why the process stops, and the channel frontends report it on. Lives
//! below the frontends (they only send) and beside the daemon (which waits).

use std::sync::mpsc::Sender;

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
pub type ExitTx = Sender<Exit>;

/// Reports `why`; a daemon already stopping is not waiting any more,
/// which is fine.
pub fn report(tx: &ExitTx, why: Exit) {
    let _ = tx.send(why);
}
