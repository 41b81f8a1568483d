//! `tandem`: the command-line client of tandemd.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};
use tandem_engine::runtime::log_store::DEFAULT_LOG_SIZE_BYTES;
use tandem_tools::api::{call, CallError, Request, ResponseBody, VolumeArg};
use tandem_tools::config::DEFAULT_API_SOCKET;
use tandem_tools::size::parse_size;

#[path = "tandem/print.rs"]
mod print;
use print::{paths, print_groups, print_message};

/// Manage Tandem replication groups on this node.
#[derive(Parser)]
#[command(name = "tandem", version)]
struct Cli {
    /// Management socket of tandemd.
    #[arg(long, global = true, default_value = DEFAULT_API_SOCKET)]
    api: PathBuf,
    /// This node's configuration: probes of another daemon (bench --transport, topology test,
    /// tune --transport) authenticate with its [tls] when it has one.
    #[arg(long, global = true, default_value = "/etc/tandem/tandem.toml")]
    node_config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, show, delete, move and promote replication groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Create, show, change, verify and remove partnerships (replication between two nodes).
    #[command(subcommand)]
    Partnership(PartnershipCommand),
    /// Two nodes on loopback replicating a workload, with live status and a
    /// final byte-for-byte check (no root, no configuration).
    Demo {
        /// sync or async.
        #[arg(long, default_value = "sync")]
        mode: String,
        /// Size of the replicated volume.
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Seconds of writes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Writes in flight.
        #[arg(long, default_value_t = 8)]
        queue_depth: usize,
        /// Bytes per write.
        #[arg(long, default_value = "4KiB", value_parser = parse_size)]
        block_size: u64,
        /// Keep the temporary directory (volumes, logs, daemon logs).
        #[arg(long)]
        keep: bool,
    },
    /// Print shell completions for tandem: `tandem completions bash > /etc/bash_completion.d/tandem`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages of tandem (one per subcommand) and tandemd under a man directory.
    Man {
        /// Man directory (man1/ and man8/ are created in it), e.g. /usr/local/share/man.
        #[arg(long)]
        out: PathBuf,
    },
    /// Numbered events (docs/events.md): partnerships, initial copy, peer lost and regained, RPO, recovery.
    Events {
        /// Keep waiting for new events.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark an NBD export, a local file or block device, or the transport to a daemon: IOPS, MiB/s, latency percentiles, CPU per I/O.
    Bench(tandem_tools::bench_cli::BenchArgs),
    /// Let other users manage (operator) or read (viewer) a group: grant, revoke, list.
    #[command(subcommand)]
    Delegation(DelegationCommand),
    /// Node certificates for mutual TLS: a cluster CA, and a certificate per node.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Check a planned partnership's requirements and measure its workload (Test-SRTopology).
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Sweep a group's group-commit limits or a transport's channels and socket buffers; recommend (and --apply) the best.
    Tune(tandem_tools::tune::TuneArgs),
    /// Performance counters of every volume, log and partnership (Storage Replica's names).
    Counters {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print again every this many seconds until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<u64>,
    },
    /// Status of every group: LSNs, log use, volumes, write counts and latency.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a cluster CA in DIR (ca.pem, and ca.key readable by its owner only).
    InitCa {
        dir: std::path::PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "tandem-cluster-ca")]
        name: String,
        #[arg(long, default_value_t = tandem_crypto::identity::DEFAULT_CA_VALID_DAYS)]
        valid_days: u32,
    },
    /// Issue a certificate for node NAME from the CA in --ca, into --out
    /// (node.pem, node.key, ca.pem: the files [tls] names).
    Issue {
        #[arg(long)]
        ca: std::path::PathBuf,
        /// The node's name (node.name in its configuration).
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = tandem_crypto::identity::DEFAULT_NODE_VALID_DAYS)]
        valid_days: u32,
    },
}

#[derive(Subcommand)]
enum DelegationCommand {
    /// Give USER a role on GROUP (run as root or as a member of group tandem-admin).
    Grant {
        #[arg(long)]
        user: String,
        #[arg(long)]
        group: String,
        /// operator: manage the group's partnership; viewer: read its status and events.
        #[arg(long, value_enum)]
        role: tandem_tools::delegation::Role,
    },
    /// Take back USER's role on GROUP.
    Revoke {
        #[arg(long)]
        user: String,
        #[arg(long)]
        group: String,
    },
    /// List every grant.
    List,
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Requirements (each with its measured value, limit and fix), then the workload and the path for --duration; writes an HTML report.
    Test(tandem_tools::topology::TopologyTestArgs),
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Format a log and register a group of volumes served over NBD as GROUP/VOLUME.
    Create {
        /// Group name (letters, digits, - _ .).
        #[arg(long)]
        name: String,
        /// Log file (created) or block device; put it on the fastest storage.
        #[arg(long)]
        log: PathBuf,
        /// Size of a file log, e.g. 8GiB (minimum 128MiB); a device log uses the whole device.
        #[arg(long, value_parser = parse_size)]
        log_size: Option<u64>,
        /// A volume: PATH or NAME=PATH (the name defaults to the file name). Repeat for more.
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
    },
    /// List the groups of this node.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one group.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Drain a group, checkpoint its volumes and release its log.
    Delete { name: String },
    /// Make a destination whose source is lost serve writes (unplanned failover); reports the RPO.
    Promote { name: String },
    /// On a destination: `start` exports a writable copy-on-write snapshot of its volumes as
    /// NBD exports GROUP@test/VOLUME while replication goes on; `stop` discards it.
    TestFailover {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        name: String,
    },
    /// Consistent snapshots: `create` writes a barrier into the group's log, and this node and its
    /// destination each take a read-only copy-on-write snapshot at exactly that LSN (byte-identical),
    /// exported over NBD as GROUP@NAME/VOLUME.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Serve a group from another core thread: its clients reconnect, a partnership resumes.
    Move {
        name: String,
        /// Index into the daemon's node.cores (0 is the first CPU listed).
        #[arg(long)]
        core: usize,
    },
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot of GROUP (on a source: its destination takes the same one).
    Create {
        group: String,
        /// Snapshot name: 1 to 64 letters, digits, '.', '_' or '-'.
        #[arg(long)]
        name: String,
    },
    /// List the snapshots of GROUP on this node.
    List {
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot of GROUP on this node (its partner's copy stays).
    Delete {
        group: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum PartnershipCommand {
    /// Replicate a group of this node to a group of another node (run on the source node).
    Create {
        /// The group on this node whose writes are replicated.
        #[arg(long)]
        source_group: String,
        /// The destination node's replication address, HOST[:PORT] (port 5445 by default).
        #[arg(long)]
        destination: String,
        /// The group on the destination node that receives them (same volume sizes).
        #[arg(long)]
        destination_group: String,
        /// sync: a write is acknowledged once both logs hold it; async: once this log holds it.
        #[arg(long, default_value = "sync")]
        mode: String,
        /// Data channels (TCP connections) the replication stream is striped over, 1 to 16
        /// [default: replication.channels of the daemon's config, 2 unless set].
        #[arg(long)]
        channels: Option<u32>,
        /// The destination already holds an older copy (restored from a backup, a shipped
        /// disk): refused if its volumes hold no data. Either way the initial sync compares
        /// block checksums and sends only the differing blocks.
        #[arg(long)]
        seeded: bool,
        /// Replication on this node uses only this interface or local address (bind / SO_BINDTODEVICE).
        #[arg(long, value_name = "INTERFACE_OR_ADDRESS")]
        source_network: Option<String>,
        /// The destination accepts this partnership's connections only on this interface or address.
        #[arg(long, value_name = "INTERFACE_OR_ADDRESS")]
        destination_network: Option<String>,
        /// Protection of every replication frame: aes-128-gcm (encrypted and authenticated),
        /// sign (authenticated) or none; needs [tls] on both nodes unless none, and must match
        /// the destination's replication.encryption [default: replication.encryption, aes-128-gcm].
        #[arg(long, value_parser = ["aes-128-gcm", "sign", "none"])]
        encryption: Option<String>,
        /// The node name the destination's certificate must carry (with TLS; without it any
        /// node of the cluster CA is accepted and its name kept for every reconnection).
        #[arg(long)]
        destination_node: Option<String>,
        /// The data channels' transport: rdma (RoCE, iWARP or InfiniBand queue pairs, one per
        /// channel), tcp, or auto (rdma when both nodes have an active RDMA device on the path).
        #[arg(long, value_parser = ["rdma", "tcp", "auto"], default_value = "auto")]
        transport: String,
    },
    /// Show the partnerships of this node (or of one group).
    Show {
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        json: bool,
        /// Follow the initial sync with a progress bar, refreshed every this many seconds, until it is done.
        #[arg(long, value_name = "SECONDS", conflicts_with = "json")]
        watch: Option<u64>,
    },
    /// Planned switch (run on either node): the source stops taking writes and drains, then
    /// NODE/GROUP (its destination) becomes the source and replication runs the other way.
    Switch {
        /// The current destination that becomes the source, NODE/GROUP.
        #[arg(long, value_name = "NODE/GROUP")]
        new_source: String,
    },
    /// On an old source fenced because its destination was promoted: become that group's
    /// destination; the compared resync overwrites only the blocks that differ.
    Failback {
        #[arg(long)]
        group: String,
        /// Save the diverged ranges (what this group wrote after the promotion) into DIR first,
        /// one file per range and an index, diverged.json.
        #[arg(long, value_name = "DIR")]
        preserve_diverged: Option<PathBuf>,
    },
    /// Split brain (both sides wrote after a promotion; run on the fenced old source): the side
    /// named survives, the other becomes its destination and is overwritten where it differs.
    Resolve {
        #[arg(long)]
        group: String,
        /// NODE/GROUP to keep: this group, or the promoted one (then this is a failback).
        #[arg(long, value_name = "NODE/GROUP")]
        keep: String,
        /// Keeping the promoted side: save this side's diverged ranges into DIR first.
        #[arg(long, value_name = "DIR")]
        preserve_diverged: Option<PathBuf>,
    },
    /// Change a running partnership's mode (run on the source): sync or async.
    Set {
        #[arg(long)]
        group: String,
        /// sync: writes wait for both logs; async: for this log only.
        #[arg(long, value_parser = ["sync", "async"])]
        mode: String,
    },
    /// Compare the destination with this source while replication runs; report (and --repair) out-of-sync ranges.
    Verify {
        /// The source group.
        #[arg(long)]
        group: String,
        /// Bytes read per second on each side [default: replication.verify_rate_bytes_per_s, 100MiB].
        #[arg(long, value_parser = parse_size)]
        rate: Option<u64>,
        /// Send the chunks found different again.
        #[arg(long)]
        repair: bool,
        /// Start the pass and return (follow it with `tandem partnership show`).
        #[arg(long)]
        no_wait: bool,
    },
    /// End a group's partnership (on the source, the destination is told too).
    Remove {
        #[arg(long)]
        group: String,
    },
}

fn main() {
    // `tandem status | head` ends quietly when the reader goes away, as
    // command-line tools do, instead of panicking on a broken pipe.
    // SAFETY: restoring the default action of a signal before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    tandem_tools::probe::set_node_config(&cli.node_config);
    match run(&cli) {
        Ok(()) => {}
        Err(CallError::NotRunning(message)) => {
            eprintln!("tandem: {message}");
            std::process::exit(3);
        }
        Err(CallError::Refused(message)) => {
            eprintln!("tandem: {message}");
            std::process::exit(1);
        }
    }
}

fn run(cli: &Cli) -> Result<(), CallError> {
    match &cli.command {
        Command::Bench(args) => args.run().map_err(CallError::Refused)?,
        Command::Cert(CertCommand::InitCa { dir, name, valid_days }) => {
            let files = tandem_crypto::identity::init_ca(dir, name, *valid_days).map_err(CallError::Refused)?;
            println!("cluster CA created: {}", paths(&files));
            println!(
                "keep ca.key offline; issue node certificates with `tandem cert issue --ca {} --node NAME --out DIR`",
                dir.display()
            );
        }
        Command::Cert(CertCommand::Issue { ca, node, out, valid_days }) => {
            let files = tandem_crypto::identity::issue(ca, node, out, *valid_days).map_err(CallError::Refused)?;
            println!("certificate for node {node} issued, valid {valid_days} days: {}", paths(&files));
            println!(
                "on {node}, add to tandem.toml:\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/node.pem\"\nkey = \"{0}/node.key\"",
                out.display()
            );
        }
        Command::Tune(args) => args.run(&cli.api).map_err(CallError::Refused)?,
        Command::Delegation(DelegationCommand::Grant { user, group, role }) => print_message(&call(
            &cli.api,
            &Request::DelegationGrant { user: user.clone(), group: group.clone(), role: *role },
        )?),
        Command::Delegation(DelegationCommand::Revoke { user, group }) => {
            print_message(&call(&cli.api, &Request::DelegationRevoke { user: user.clone(), group: group.clone() })?)
        }
        Command::Delegation(DelegationCommand::List) => {
            if let ResponseBody::Delegations(all) = call(&cli.api, &Request::DelegationList)? {
                if all.is_empty() {
                    println!("no delegations: only root and members of group tandem-admin manage this node");
                }
                for d in all {
                    println!("{:<16} uid {:<6} {:<10} {:?}", d.user, d.uid, d.group, d.role);
                }
            }
        }
        Command::Topology(TopologyCommand::Test(args)) => args.run(&cli.api).map_err(CallError::Refused)?,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "tandem", &mut std::io::stdout());
        }
        Command::Man { out } => {
            let tandemd = tandem_tools::daemon_args::DaemonArgs::command();
            let written =
                tandem_tools::manpages::write_all(&Cli::command(), &tandemd, out).map_err(CallError::Refused)?;
            println!("{} man pages written to {}", written.len(), out.display());
        }
        Command::Demo { mode, size, seconds, queue_depth, block_size, keep } => {
            let block_bytes = u32::try_from(*block_size)
                .ok()
                .filter(|b| b.is_power_of_two() && (512..=(4 << 20)).contains(b))
                .ok_or_else(|| {
                    CallError::Refused("--block-size must be a power of two from 512B to 4MiB".to_owned())
                })?;
            if mode != "sync" && mode != "async" {
                return Err(CallError::Refused(format!("--mode {mode}: use sync or async")));
            }
            let options = tandem_tools::demo::DemoOptions {
                mode: mode.clone(),
                volume_bytes: *size,
                seconds: *seconds,
                queue_depth: (*queue_depth).max(1),
                block_bytes,
                keep: *keep,
            };
            let summary = tandem_tools::demo::run(&options).map_err(CallError::Refused)?;
            println!("{summary}");
        }
        Command::Status { json } => print_groups(&call(&cli.api, &Request::Status)?, *json, true),
        Command::Counters { json, watch } => loop {
            let ResponseBody::Groups(groups) = call(&cli.api, &Request::Status)? else {
                return Err(CallError::Refused("tandemd answered without groups".to_owned()));
            };
            let counters = tandem_tools::counters_view::collect(&groups);
            if *json {
                println!("{}", serde_json::to_string_pretty(&counters).expect("counters serialize"));
            } else {
                print!("{}", tandem_tools::counters_view::render(&counters));
            }
            match watch {
                Some(seconds) => std::thread::sleep(std::time::Duration::from_secs((*seconds).max(1))),
                None => break,
            }
        },
        Command::Events { follow, json } => {
            let mut since = 0;
            loop {
                let wait_ms = if *follow { 10_000 } else { 0 };
                let ResponseBody::Events(events) = call(&cli.api, &Request::Events { since, wait_ms })? else {
                    return Err(CallError::Refused("tandemd answered without events".to_owned()));
                };
                for event in &events {
                    if *json {
                        println!("{}", serde_json::to_string(event).expect("events serialize"));
                    } else {
                        println!(
                            "{} {:>4} {:<7} {:<12} {}",
                            event.time, event.id, event.severity, event.group, event.message
                        );
                    }
                    since = event.seq;
                }
                if !*follow {
                    break;
                }
            }
        }
        Command::Partnership(PartnershipCommand::Create {
            source_group,
            destination,
            destination_group,
            mode,
            channels,
            seeded,
            source_network,
            destination_network,
            encryption,
            destination_node,
            transport,
        }) => {
            let request = Request::PartnershipCreate {
                source_group: source_group.clone(),
                destination: destination.clone(),
                destination_group: destination_group.clone(),
                mode: mode.clone(),
                channels: *channels,
                seeded: *seeded,
                source_network: source_network.clone(),
                destination_network: destination_network.clone(),
                encryption: encryption.clone(),
                destination_node: destination_node.clone(),
                transport: transport.clone(),
            };
            print_message(&call(&cli.api, &request)?);
        }
        Command::Partnership(PartnershipCommand::Show { group, json, watch }) => match watch {
            Some(seconds) => tandem_tools::partnership_view::watch(&cli.api, group.as_deref(), *seconds)?,
            None => {
                let body = call(&cli.api, &Request::PartnershipShow { group: group.clone() })?;
                tandem_tools::partnership_view::print_partnerships(&body, *json);
            }
        },
        Command::Partnership(PartnershipCommand::Set { group, mode }) => {
            print_message(&call(&cli.api, &Request::PartnershipSet { group: group.clone(), mode: mode.clone() })?);
        }
        Command::Partnership(PartnershipCommand::Failback { group, preserve_diverged }) => {
            let request =
                Request::PartnershipFailback { group: group.clone(), preserve_diverged: preserve_diverged.clone() };
            print_message(&call(&cli.api, &request)?);
        }
        Command::Partnership(PartnershipCommand::Resolve { group, keep, preserve_diverged }) => {
            let request = Request::PartnershipResolve {
                group: group.clone(),
                keep: keep.clone(),
                preserve_diverged: preserve_diverged.clone(),
            };
            print_message(&call(&cli.api, &request)?);
        }
        Command::Partnership(PartnershipCommand::Switch { new_source }) => {
            print_message(&call(&cli.api, &Request::PartnershipSwitch { new_source: new_source.clone() })?);
        }
        Command::Partnership(PartnershipCommand::Verify { group, rate, repair, no_wait }) => {
            let request = Request::PartnershipVerify { group: group.clone(), rate_bytes_per_s: *rate, repair: *repair };
            print_message(&call(&cli.api, &request)?);
            if !*no_wait {
                tandem_tools::partnership_view::wait_for_verify(&cli.api, group)?;
            }
        }
        Command::Partnership(PartnershipCommand::Remove { group }) => {
            print_message(&call(&cli.api, &Request::PartnershipRemove { group: group.clone() })?);
        }
        Command::Group(GroupCommand::List { json }) => {
            print_groups(&call(&cli.api, &Request::GroupList)?, *json, false)
        }
        Command::Group(GroupCommand::Show { name, json }) => {
            print_groups(&call(&cli.api, &Request::GroupShow { name: name.clone() })?, *json, true);
        }
        Command::Group(GroupCommand::Delete { name }) => {
            print_message(&call(&cli.api, &Request::GroupDelete { name: name.clone() })?)
        }
        Command::Group(GroupCommand::TestFailover { action, name }) => {
            let request = Request::TestFailover { name: name.clone(), start: action == "start" };
            print_message(&call(&cli.api, &request)?);
        }
        Command::Group(GroupCommand::Snapshot(command)) => run_snapshot(&cli.api, command)?,
        Command::Group(GroupCommand::Promote { name }) => {
            print_message(&call(&cli.api, &Request::GroupPromote { name: name.clone() })?)
        }
        Command::Group(GroupCommand::Move { name, core }) => {
            print_message(&call(&cli.api, &Request::GroupMove { name: name.clone(), core: *core })?)
        }
        Command::Group(GroupCommand::Create { name, log, log_size, volumes }) => {
            let volumes =
                volumes.iter().map(|v| parse_volume(v)).collect::<Result<Vec<_>, _>>().map_err(CallError::Refused)?;
            let request = Request::GroupCreate {
                name: name.clone(),
                log: absolute(log),
                log_size_bytes: log_size.unwrap_or(DEFAULT_LOG_SIZE_BYTES),
                volumes,
            };
            print_message(&call(&cli.api, &request)?);
        }
    }
    Ok(())
}

/// `NAME=PATH` or `PATH` (named after the file).
fn parse_volume(text: &str) -> Result<VolumeArg, String> {
    let (name, path) = match text.split_once('=') {
        Some((name, path)) => (name.to_owned(), PathBuf::from(path)),
        None => {
            let path = PathBuf::from(text);
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("--volume {text}: cannot name a volume after this path; use NAME=PATH"))?
                .to_owned();
            (name, path)
        }
    };
    Ok(VolumeArg { name, path: absolute(&path) })
}

/// The daemon runs elsewhere: relative paths are resolved here.
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_or_else(|_| path.to_owned(), |cwd| cwd.join(path))
    }
}

fn run_snapshot(api: &std::path::Path, command: &SnapshotCommand) -> Result<(), CallError> {
    let request = match command {
        SnapshotCommand::Create { group, name } => Request::SnapshotCreate { group: group.clone(), name: name.clone() },
        SnapshotCommand::Delete { group, name } => Request::SnapshotDelete { group: group.clone(), name: name.clone() },
        SnapshotCommand::List { group, json } => {
            if let ResponseBody::Groups(groups) = call(api, &Request::GroupShow { name: group.clone() })? {
                groups.iter().for_each(|g| tandem_tools::snapshot::print_list(g, *json));
            }
            return Ok(());
        }
    };
    print_message(&call(api, &request)?);
    Ok(())
}
