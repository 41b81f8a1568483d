//! The daemon's listeners: the management API on a unix socket and the NBD
//! listener, whose handshakes run here before the connection moves to the core
//! that owns the export's group.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::runtime::CoreMsg;
use tandem_frontend::nbd::{handshake, HandshakeOutcome};

use crate::api::{Request, Response};
use crate::daemon::Daemon;

/// Most handshakes in progress at once; more connections are closed at once
/// so that a flood cannot exhaust threads.
const MAX_CONCURRENT_HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest API request line accepted.
const MAX_API_REQUEST_BYTES: u64 = 64 * 1024;

/// Binds the management socket, refusing to steal it from a live daemon.
pub fn bind_api(path: &Path) -> Result<UnixListener, String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!("another tandemd already answers on {}; stop it first", path.display()));
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Anyone may connect: every request is checked against its caller's
    // credentials (SO_PEERCRED) and delegations (delegation.rs).
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| format!("cannot open {} to delegated users: {e}", path.display()))?;
    Ok(listener)
}

/// Serves the management API, one thread per client connection.
pub fn serve_api(daemon: Arc<Daemon>, listener: UnixListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let daemon = Arc::clone(&daemon);
        let spawned = std::thread::Builder::new().name("tandem-api".into()).spawn(move || answer_api(&daemon, stream));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an API thread");
        }
    }
}

fn answer_api(daemon: &Daemon, stream: UnixStream) {
    let mut line = String::new();
    let mut reader = BufReader::new((&stream).take(MAX_API_REQUEST_BYTES));
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let response = match (serde_json::from_str::<Request>(&line), crate::delegation::caller_of(&stream)) {
        (Ok(request), Ok(caller)) => {
            tracing::debug!(?request, uid = caller.uid, "API request");
            match daemon.handle_as(&caller, request) {
                Ok(body) => Response::success(body),
                Err(error) => Response::failure(error),
            }
        }
        (Err(e), _) => Response::failure(format!("malformed API request: {e}")),
        (_, Err(e)) => Response::failure(e),
    };
    let mut text = serde_json::to_string(&response).expect("responses serialize");
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

/// Accepts NBD clients and runs each handshake on a short-lived thread.
pub fn serve_nbd(daemon: Arc<Daemon>, listener: TcpListener) {
    let in_progress = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if in_progress.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT_HANDSHAKES {
            in_progress.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(peer = ?stream.peer_addr().ok(), "too many NBD handshakes in progress; connection closed");
            continue;
        }
        let daemon = Arc::clone(&daemon);
        let counter = Arc::clone(&in_progress);
        let spawned = std::thread::Builder::new().name("tandem-nbd-handshake".into()).spawn(move || {
            negotiate(&daemon, stream);
            counter.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            in_progress.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start an NBD handshake thread");
        }
    }
}

fn negotiate(daemon: &Daemon, mut stream: TcpStream) {
    let peer = stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let find = |name: &str| daemon.find_export(name).map(|(export, _, _)| export);
    let list = || daemon.list_exports();
    match handshake(&mut stream, &peer, &find, &list) {
        Ok(HandshakeOutcome::Transmission { export, session }) => {
            // The export may have been deleted since the option was answered.
            let Some((_, core, volume_index)) = daemon.find_export(&export.name) else {
                tracing::warn!(%peer, export = %export.name, "export disappeared during the handshake");
                return;
            };
            let _ = stream.set_read_timeout(None);
            let _ = stream.set_write_timeout(None);
            if let Some(target) = crate::test_failover::SnapshotExport::of(&export.name) {
                crate::test_failover::serve(daemon, stream, session, target, volume_index);
                return;
            }
            let group = export.name.split_once('/').map(|(g, _)| g.to_owned()).expect("exports are GROUP/VOLUME");
            let msg = CoreMsg::AttachConnection { group, volume_index, stream, session: Box::new(session) };
            daemon.attach_connection(core, msg);
        }
        Ok(HandshakeOutcome::Ended) => tracing::debug!(%peer, "NBD client ended the handshake"),
        Err(e) => tracing::warn!(%peer, error = %e, "NBD handshake failed; connection closed"),
    }
}
