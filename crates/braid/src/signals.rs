//! `SIGTERM` and `SIGINT` (SPEC §6 "Running live"): the first asks the run to stop
//! cleanly (a final checkpoint, all output committed, exit 0); a second aborts at once.

use std::sync::atomic::{AtomicUsize, Ordering};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    // Only async-signal-safe calls here: an atomic, and _exit.
    if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
        unsafe { libc::_exit(1) };
    }
}

/// Installs the handlers; until then a signal kills the process as usual.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches an atomic and calls _exit.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    SIGNALS.load(Ordering::Relaxed) > 0
}
