//! `tandemd`: the Tandem daemon.

use std::net::TcpListener;
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tandem_tools::config::Config;
use tandem_tools::daemon::Daemon;
use tandem_tools::daemon_args::DaemonArgs;
use tandem_tools::serve;

fn main() {
    let args = DaemonArgs::parse();
    if let Err(message) = run(&args) {
        eprintln!("tandemd: {message}");
        std::process::exit(1);
    }
}

fn run(args: &DaemonArgs) -> Result<(), String> {
    let config = Config::load(&args.config)?;
    let log_filter = init_logging(&config.node.log_level);
    let api = serve::bind_api(&config.node.api_socket)?;
    let nbd = TcpListener::bind(config.node.nbd_listen)
        .map_err(|e| format!("cannot listen for NBD on {}: {e}", config.node.nbd_listen))?;
    let replication = TcpListener::bind(config.node.replication_listen).map_err(|e| {
        format!(
            "cannot listen for replication on {}: {e} (set node.replication_listen)",
            config.node.replication_listen
        )
    })?;
    let metrics = match config.node.metrics_listen {
        Some(address) => Some(TcpListener::bind(address).map_err(|e| {
            format!("cannot listen for metrics on {address}: {e} (change or remove node.metrics_listen)")
        })?),
        None => None,
    };
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let api_path = config.node.api_socket.clone();
    let daemon = Arc::new(Daemon::start(config)?);
    tracing::info!(
        node = %daemon.config.node.name,
        nbd = %daemon.config.node.nbd_listen,
        replication = %daemon.config.node.replication_listen,
        api = %api_path.display(),
        cores = ?daemon.config.node.cores,
        "tandemd ready"
    );
    let api_daemon = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("tandem-api-accept".into())
        .spawn(move || serve::serve_api(api_daemon, api))
        .map_err(|e| e.to_string())?;
    let nbd_daemon = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("tandem-nbd-accept".into())
        .spawn(move || serve::serve_nbd(nbd_daemon, nbd))
        .map_err(|e| e.to_string())?;
    let replication_daemon = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("tandem-repl-accept".into())
        .spawn(move || tandem_tools::replication_dest::serve(replication_daemon, replication))
        .map_err(|e| e.to_string())?;
    if let Some(listener) = metrics {
        let metrics_daemon = Arc::clone(&daemon);
        std::thread::Builder::new()
            .name("tandem-metrics".into())
            .spawn(move || tandem_tools::metrics::serve(metrics_daemon, listener))
            .map_err(|e| e.to_string())?;
    }
    let connector_daemon = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("tandem-repl-connect".into())
        .spawn(move || tandem_tools::replication::run_connector(connector_daemon))
        .map_err(|e| e.to_string())?;
    let fallback_daemon = Arc::clone(&daemon);
    std::thread::Builder::new()
        .name("tandem-rdma-return".into())
        .spawn(move || tandem_tools::rdma_fallback::run_return_checks(fallback_daemon))
        .map_err(|e| e.to_string())?;
    // Under systemd (Type=notify) the unit is started once every listener is
    // up and every group is open; elsewhere NOTIFY_SOCKET is unset and this
    // does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that tandemd is ready");
    }
    let signal = signals.forever().find(|&signal| {
        if signal == SIGHUP {
            reload(&args.config, &daemon.config, &log_filter);
        }
        signal != SIGHUP
    });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!(?signal, "stopping: draining groups and checkpointing volumes");
    let _ = std::fs::remove_file(&api_path);
    daemon.shutdown();
    tracing::info!("tandemd stopped");
    Ok(())
}

/// Changes the log level live (`RUST_LOG`, when set, stays in force).
type LogFilter = tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// SIGHUP: reads the configuration again, applies what can change live (the
/// log level) and names every other change, which needs a restart. A file
/// that does not load changes nothing.
fn reload(path: &std::path::Path, running: &Config, log_filter: &LogFilter) {
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(reason) => {
            tracing::error!(%reason, "configuration not reloaded; tandemd goes on with the running one");
            return;
        }
    };
    for setting in running.changes_needing_restart(&new) {
        tracing::warn!(setting, "{setting} changed in {}; restart tandemd to apply it", path.display());
    }
    if std::env::var_os("RUST_LOG").is_none() {
        tracing::info!(log_level = %new.node.log_level, "configuration reloaded");
        if let Err(e) = log_filter.reload(tracing_subscriber::EnvFilter::new(&new.node.log_level)) {
            tracing::error!(error = %e, "cannot change the log level");
        }
    }
}

/// Logs (and the numbered events, with their `ID` and `GROUP` fields) go to
/// journald when systemd connected the output to the journal
/// (`JOURNAL_STREAM`), else to stderr as text.
fn init_logging(log_level: &str) -> LogFilter {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| log_level.to_owned());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(filter));
    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_journald::layer()
            .map(|layer| layer.with_syslog_identifier("tandemd".to_owned()))
            .map_err(|e| {
                eprintln!("tandemd: journald is not reachable ({e}); logging to stderr");
            })
            .ok()
    } else {
        None
    };
    // Colours only on a terminal: logs in files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text =
        journald.is_none().then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
    tracing_subscriber::registry().with(filter).with(journald).with(text).init();
    handle
}
