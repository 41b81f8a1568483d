//! What `tandem bench` drives: an NBD export, a local file or block device
//! (io_uring, O_DIRECT), or the transport between this node and a daemon
//! (probe frames on its replication listener). Each job opens its own
//! connection or ring; a file is opened and claimed once for all jobs.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use rand::Rng;
use tandem_engine::runtime::buf::AlignedBuf;
use tandem_engine::runtime::device::{open_device, Device, OpenMode};

use crate::nbd_load::NbdConnection;
use crate::probe::{ProbeClient, ProbeOp};

/// How a transport target is exercised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Every request's payload comes back (round trip of a block each way).
    PingPong,
    /// Payloads go one way, a 16-byte answer comes back (bandwidth).
    Stream,
}

/// A parsed target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// `nbd://HOST[:PORT]/EXPORT`: (address, export).
    Nbd(String, String),
    /// An absolute path (or `file:PATH`).
    File(PathBuf),
    /// `tandem://HOST[:PORT]`: a daemon's replication listener.
    Transport(String),
}

impl TargetSpec {
    /// Parses `nbd://HOST[:PORT]/EXPORT`, `tandem://HOST[:PORT]`, `file:PATH` or `/PATH`.
    pub fn parse(target: &str) -> Result<Self, String> {
        if target.starts_with("nbd://") {
            let (address, export) = crate::bench::parse_nbd_uri(target)?;
            return Ok(Self::Nbd(address, export));
        }
        if let Some(address) = target.strip_prefix("tandem://") {
            let address = address.trim_end_matches('/');
            if address.is_empty() {
                return Err(format!("{target}: a transport target is tandem://HOST[:PORT] (port 5445 by default)"));
            }
            return Ok(Self::Transport(address.to_owned()));
        }
        let path = target.strip_prefix("file:").unwrap_or(target);
        if path.starts_with('/') {
            return Ok(Self::File(PathBuf::from(path)));
        }
        Err(format!(
            "{target}: a target is nbd://HOST[:PORT]/EXPORT, tandem://HOST[:PORT] (a daemon's replication port) or an absolute path of a file or block device"
        ))
    }
}

/// One job's connection or ring.
pub trait Target: Send {
    /// Bytes addressable (offsets are below this).
    fn size_bytes(&self) -> u64;
    /// Queues one request of the job's block size.
    fn submit(&mut self, id: u64, read: bool, offset: u64, rng: &mut rand::rngs::ThreadRng) -> Result<(), String>;
    /// Waits for one request to finish; returns its id.
    fn complete(&mut self) -> Result<u64, String>;
    /// Ends the job cleanly (NBD disconnect).
    fn finish(self: Box<Self>) {}
}

/// A target made ready for its jobs (a file is opened and claimed here).
pub struct Prepared {
    spec: TargetSpec,
    file: Option<Arc<Device>>,
    block_bytes: u32,
    queue_depth: usize,
    pattern: Pattern,
    socket_buffer_bytes: u32,
}

impl Prepared {
    /// Checks the target against the options; writes to a block device need
    /// `destroy_data`.
    pub fn new(spec: TargetSpec, options: &crate::bench::BenchOptions) -> Result<Self, String> {
        let file = match &spec {
            TargetSpec::File(path) => {
                let device = open_device(path, OpenMode::VolumeBuffered).map_err(|e| e.to_string())?;
                check_file_target(path, &device, options)?;
                Some(Arc::new(device))
            }
            TargetSpec::Nbd(..) | TargetSpec::Transport(_) => None,
        };
        Ok(Self {
            spec,
            file,
            block_bytes: options.block_bytes,
            queue_depth: options.queue_depth,
            pattern: options.pattern,
            socket_buffer_bytes: options.socket_buffer_bytes,
        })
    }

    /// A connection or ring for one job.
    pub fn open_job(&self) -> Result<Box<dyn Target>, String> {
        match &self.spec {
            TargetSpec::Nbd(address, export) => {
                let connection =
                    NbdConnection::connect(address, export).map_err(|e| format!("nbd://{address}/{export}: {e}"))?;
                if connection.size_bytes < u64::from(self.block_bytes) {
                    return Err(format!(
                        "nbd://{address}/{export} is {} bytes, smaller than one {}-byte block",
                        connection.size_bytes, self.block_bytes
                    ));
                }
                Ok(Box::new(NbdTarget {
                    connection,
                    payload: vec![0xa5; self.block_bytes as usize],
                    scratch: vec![0; self.block_bytes as usize],
                    reads: HashMap::new(),
                }))
            }
            TargetSpec::File(_) => {
                let device = Arc::clone(self.file.as_ref().expect("files are opened in new()"));
                Ok(Box::new(FileTarget::new(device, self.block_bytes, self.queue_depth)?))
            }
            TargetSpec::Transport(address) => {
                let (client, _) = ProbeClient::connect(address, None, false, self.socket_buffer_bytes)?;
                let op = if self.pattern == Pattern::PingPong { ProbeOp::Echo } else { ProbeOp::Sink };
                Ok(Box::new(TransportTarget { client, op, block_bytes: self.block_bytes }))
            }
        }
    }
}

fn check_file_target(
    path: &std::path::Path,
    device: &Device,
    options: &crate::bench::BenchOptions,
) -> Result<(), String> {
    let shown = path.display();
    if !options.block_bytes.is_multiple_of(device.sector_bytes) {
        return Err(format!(
            "--block-size {} is not a multiple of {shown}'s {}-byte sectors (direct I/O needs whole sectors)",
            options.block_bytes, device.sector_bytes
        ));
    }
    if device.size_bytes < u64::from(options.block_bytes) {
        return Err(format!(
            "{shown} is {} bytes, smaller than one {}-byte block; grow it first (e.g. truncate -s 1G {shown})",
            device.size_bytes, options.block_bytes
        ));
    }
    if device.is_block && options.read_percent < 100 && !options.destroy_data {
        return Err(format!(
            "writing to {shown} destroys the data on it; add --destroy-data to confirm, or use --read-percent 100"
        ));
    }
    Ok(())
}

struct NbdTarget {
    connection: NbdConnection,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    /// Request id → is a read (its reply carries data).
    reads: HashMap<u64, bool>,
}

impl Target for NbdTarget {
    fn size_bytes(&self) -> u64 {
        self.connection.size_bytes
    }

    fn submit(&mut self, id: u64, read: bool, offset: u64, rng: &mut rand::rngs::ThreadRng) -> Result<(), String> {
        let sent = if read {
            self.connection.send_read(id, offset, self.scratch.len() as u32)
        } else {
            // Fresh bytes in every write keep compressing or deduplicating
            // storage honest.
            let stamp = 64.min(self.payload.len());
            rng.fill(&mut self.payload[..stamp]);
            self.connection.send_write(id, offset, &self.payload)
        };
        sent.map_err(|e| format!("sending a request failed: {e}"))?;
        self.reads.insert(id, read);
        Ok(())
    }

    fn complete(&mut self) -> Result<u64, String> {
        let (error, id) = self.connection.reply().map_err(|e| format!("reading a reply failed: {e}"))?;
        let read = self.reads.remove(&id).ok_or_else(|| format!("the server answered unknown request {id}"))?;
        if error != 0 {
            return Err(format!("the server failed a {} with NBD error {error}", if read { "read" } else { "write" }));
        }
        if read {
            self.connection.read_data(&mut self.scratch).map_err(|e| format!("reading data failed: {e}"))?;
        }
        Ok(id)
    }

    fn finish(self: Box<Self>) {
        self.connection.disconnect();
    }
}

/// Direct I/O through a ring of `queue_depth` entries, one aligned buffer
/// per request in flight.
struct FileTarget {
    device: Arc<Device>,
    ring: IoUring,
    buffers: Vec<AlignedBuf>,
    free_slots: Vec<usize>,
    slot_ids: Vec<u64>,
    in_flight: usize,
}

impl FileTarget {
    fn new(device: Arc<Device>, block_bytes: u32, queue_depth: usize) -> Result<Self, String> {
        let entries = queue_depth.next_power_of_two().max(2) as u32;
        let ring = IoUring::new(entries).map_err(|e| format!("cannot set up io_uring ({entries} entries): {e}"))?;
        let mut buffers: Vec<AlignedBuf> = (0..queue_depth).map(|_| AlignedBuf::zeroed(block_bytes as usize)).collect();
        for buffer in &mut buffers {
            rand::rng().fill(&mut buffer[..]);
        }
        Ok(Self {
            device,
            ring,
            buffers,
            free_slots: (0..queue_depth).rev().collect(),
            slot_ids: vec![0; queue_depth],
            in_flight: 0,
        })
    }

    fn fd(&self) -> i32 {
        self.device.direct_file.as_ref().unwrap_or(&self.device.file).as_raw_fd()
    }
}

impl Target for FileTarget {
    fn size_bytes(&self) -> u64 {
        self.device.size_bytes
    }

    fn submit(&mut self, id: u64, read: bool, offset: u64, rng: &mut rand::rngs::ThreadRng) -> Result<(), String> {
        let slot = self.free_slots.pop().expect("no more requests in flight than buffers");
        self.slot_ids[slot] = id;
        let fd = types::Fd(self.fd());
        let buffer = &mut self.buffers[slot];
        let length = buffer.len() as u32;
        let entry = if read {
            opcode::Read::new(fd, buffer.as_mut_ptr(), length).offset(offset).build()
        } else {
            let stamp = 64.min(buffer.len());
            rng.fill(&mut buffer[..stamp]);
            opcode::Write::new(fd, buffer.as_ptr(), length).offset(offset).build()
        };
        // SAFETY: the buffer stays in self.buffers, untouched, until this
        // slot's completion is reaped in complete().
        unsafe { self.ring.submission().push(&entry.user_data(slot as u64)) }
            .map_err(|_| "the io_uring submission queue is full".to_owned())?;
        self.ring.submit().map_err(|e| format!("io_uring submit failed: {e}"))?;
        self.in_flight += 1;
        Ok(())
    }

    fn complete(&mut self) -> Result<u64, String> {
        assert!(self.in_flight > 0, "complete() waits only for submitted requests");
        loop {
            if let Some(entry) = self.ring.completion().next() {
                let slot = entry.user_data() as usize;
                let expected = self.buffers[slot].len() as i32;
                self.free_slots.push(slot);
                self.in_flight -= 1;
                if entry.result() != expected {
                    let cause = if entry.result() < 0 {
                        std::io::Error::from_raw_os_error(-entry.result()).to_string()
                    } else {
                        format!("{} of {expected} bytes", entry.result())
                    };
                    return Err(format!("direct I/O on the target failed: {cause}"));
                }
                return Ok(self.slot_ids[slot]);
            }
            self.ring.submit_and_wait(1).map_err(|e| format!("io_uring wait failed: {e}"))?;
        }
    }
}

struct TransportTarget {
    client: ProbeClient,
    op: ProbeOp,
    block_bytes: u32,
}

impl Target for TransportTarget {
    fn size_bytes(&self) -> u64 {
        u64::MAX
    }

    fn submit(&mut self, id: u64, _read: bool, _offset: u64, _rng: &mut rand::rngs::ThreadRng) -> Result<(), String> {
        self.client.send(self.op, id, self.block_bytes)
    }

    fn complete(&mut self) -> Result<u64, String> {
        self.client.receive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_name_the_forms() {
        assert_eq!(TargetSpec::parse("nbd://h/x").unwrap(), TargetSpec::Nbd("h:10809".into(), "x".into()));
        assert_eq!(TargetSpec::parse("/dev/sdb").unwrap(), TargetSpec::File("/dev/sdb".into()));
        assert_eq!(TargetSpec::parse("file:/tmp/f").unwrap(), TargetSpec::File("/tmp/f".into()));
        assert_eq!(TargetSpec::parse("tandem://10.0.0.2:5445").unwrap(), TargetSpec::Transport("10.0.0.2:5445".into()));
        assert!(TargetSpec::parse("disk.img").unwrap_err().contains("absolute path"));
        assert!(TargetSpec::parse("tandem://").unwrap_err().contains("tandem://HOST[:PORT]"));
    }
}
