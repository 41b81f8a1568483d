//! Two network namespaces joined by a veth pair: two "hosts" on this machine
//! for replication tests. Addresses are private (10.231.X.1 and .2) and exist
//! only inside the namespaces; nothing leaves them.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

/// Two namespaces `ns[0]`, `ns[1]` with addresses `addr[0]`, `addr[1]`.
pub struct NetPair {
    pub ns: [String; 2],
    pub addr: [String; 2],
    /// The veth interface of each side (inside its namespace).
    pub veth: [String; 2],
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

impl NetPair {
    /// Creates the pair, or says why namespaces are unavailable here.
    pub fn create() -> Result<Self, String> {
        let index = NEXT_PAIR.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{index}", std::process::id() % 100_000);
        let subnet = (std::process::id() * 7 + index * 13) % 250 + 1;
        let pair = Self {
            ns: [format!("tnd{id}a"), format!("tnd{id}b")],
            addr: [format!("10.231.{subnet}.1"), format!("10.231.{subnet}.2")],
            veth: [format!("tv{id}a"), format!("tv{id}b")],
        };
        for ns in &pair.ns {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["link", "add", &pair.veth[0], "type", "veth", "peer", "name", &pair.veth[1]])?;
        for side in 0..2 {
            ip(&["link", "set", &pair.veth[side], "netns", &pair.ns[side]])?;
            ip(&["-n", &pair.ns[side], "addr", "add", &format!("{}/24", pair.addr[side]), "dev", &pair.veth[side]])?;
            ip(&["-n", &pair.ns[side], "link", "set", &pair.veth[side], "up"])?;
        }
        Ok(pair)
    }

    /// Cuts the link (both ends down) or restores it.
    pub fn set_link(&self, up: bool) {
        for side in 0..2 {
            let state = if up { "up" } else { "down" };
            ip(&["-n", &self.ns[side], "link", "set", &self.veth[side], state]).expect("change link state");
        }
    }

    /// Moves the calling thread into namespace `side` (only this thread:
    /// setns changes the network namespace of one thread).
    pub fn enter(&self, side: usize) {
        let path = format!("/var/run/netns/{}", self.ns[side]);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace file descriptor we hold open.
        let result = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(result, 0, "setns into {path}: {}", std::io::Error::last_os_error());
    }

    /// A command run inside namespace `side`.
    #[must_use]
    pub fn command(&self, side: usize, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns[side], program]);
        command
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
