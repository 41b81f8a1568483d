//! The command line of `tandemd`, here so that `tandem man` documents it too.

use std::path::PathBuf;

use clap::Parser;

/// The Tandem daemon: serves replication groups' volumes over NBD, every write
/// durable in the group's write-ahead log before it is acknowledged, and
/// replicates groups to other nodes.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version)]
pub struct DaemonArgs {
    /// Configuration file.
    #[arg(long, default_value = "/etc/tandem/tandem.toml")]
    pub config: PathBuf,
}
