//! Why `up` should stop early: a signal (Ctrl-C, SIGTERM, SIGHUP) or a
//! panic on any thread. Both arrive as a [`Stop`] on one channel that the
//! main thread watches while it waits, so teardown always runs on the main
//! thread, in order, through the mesh guard.

use std::sync::OnceLock;
use std::sync::mpsc::{self, Receiver, Sender};

use anyhow::Context;

/// A request to stop, saying why.
#[derive(Debug)]
pub struct Stop(pub String);

static STOP: OnceLock<Sender<Stop>> = OnceLock::new();

/// Installs the signal handlers and the panic hook; returns the channel
/// the main thread watches. Returns only once the handlers are in place,
/// so no signal between here and teardown is lost.
pub fn install() -> anyhow::Result<Receiver<Stop>> {
    let (tx, rx) = mpsc::channel();
    STOP.set(tx.clone())
        .map_err(|_| anyhow::anyhow!("stop events installed twice"))?;
    let (ready_tx, ready) = mpsc::channel::<std::io::Result<()>>();
    std::thread::Builder::new()
        .name("up-signals".into())
        .spawn(move || watch_signals(tx, ready_tx))?;
    ready
        .recv()
        .context("signal thread died")?
        .context("cannot install signal handlers")?;
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        // The main thread tears down: on its own panic through unwinding
        // (the guard's Drop), on another thread's through this message.
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        if let Some(tx) = STOP.get() {
            let _ = tx.send(Stop(format!("panic in thread {thread}")));
        }
    }));
    Ok(rx)
}

fn watch_signals(tx: Sender<Stop>, ready: Sender<std::io::Result<()>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(async move {
        let handlers = (|| {
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
                signal(SignalKind::hangup())?,
            ))
        })();
        let (mut int, mut term, mut hup) = match handlers {
            Ok(h) => {
                let _ = ready.send(Ok(()));
                h
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        loop {
            let why = tokio::select! {
                _ = int.recv() => "interrupted (SIGINT)",
                _ = term.recv() => "terminated (SIGTERM)",
                _ = hup.recv() => "hung up (SIGHUP)",
            };
            // Later signals are ignored while teardown runs: it is bounded
            // and a second Ctrl-C must not leave half a mesh behind.
            if tx.send(Stop(why.to_string())).is_err() {
                return;
            }
        }
    });
}
