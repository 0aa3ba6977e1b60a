//! `delay-proxy`: a TCP forwarder that holds every chunk for `--delay-us` before passing it on, in
//! each direction, so a server on this machine behaves as if it were across a network (the kernel
//! here has no netem). 250 µs each way makes the 0.5 ms round trip of a typical same-zone link.
//!
//! Each direction of each connection is a reader thread that stamps every chunk with its due time and
//! a writer thread that sleeps until then and writes it, so chunks keep their order and a chunk read
//! while an earlier one waits is not held up further. Threads sleep on the operating system's clock,
//! which is finer than an async runtime's millisecond timers; the delay added is at least
//! `--delay-us`, plus the scheduler's wake-up time.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::opts::ProxyOpts;

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// Forwards connections until the process is stopped.
pub fn run(opts: &ProxyOpts) -> Result<(), String> {
    let listener = TcpListener::bind(&opts.listen)
        .map_err(|e| format!("listening on {}: {e}", opts.listen))?;
    let delay = Duration::from_micros(opts.delay_us);
    eprintln!(
        "delay-proxy: {} -> {}, +{} µs each way",
        opts.listen, opts.to, opts.delay_us
    );
    // Directions still forwarding: two per connection.
    let active = Arc::new(AtomicU64::new(0));
    for accepted in listener.incoming() {
        let client = match accepted {
            Ok(client) => client,
            Err(e) => {
                eprintln!("delay-proxy: accept: {e}");
                continue;
            }
        };
        if active.load(Ordering::Relaxed) / 2 >= opts.max_connections {
            // Past the limit the connection is closed at once: the client sees it end.
            continue;
        }
        let server = match TcpStream::connect(&opts.to) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("delay-proxy: connecting to {}: {e}", opts.to);
                continue;
            }
        };
        if let Err(e) = forward(client, server, delay, active.clone()) {
            eprintln!("delay-proxy: {e}");
        }
    }
    Ok(())
}

/// Starts both directions of one connection.
fn forward(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    active: Arc<AtomicU64>,
) -> Result<(), String> {
    let setup = |e: std::io::Error| format!("setting up a connection: {e}");
    client.set_nodelay(true).map_err(setup)?;
    server.set_nodelay(true).map_err(setup)?;
    let (client2, server2) = (
        client.try_clone().map_err(setup)?,
        server.try_clone().map_err(setup)?,
    );
    active.fetch_add(2, Ordering::Relaxed);
    direction(client, server, delay, active.clone());
    direction(server2, client2, delay, active);
    Ok(())
}

/// Copies `from` to `to`, each chunk held until `delay` after it was read.
fn direction(mut from: TcpStream, mut to: TcpStream, delay: Duration, active: Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        // The writer sees the channel close, passes the end on and stops.
        let _ = from.shutdown(Shutdown::Read);
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        active.fetch_sub(1, Ordering::Relaxed);
    });
}
