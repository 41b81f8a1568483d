//! A small NBD client that drives a workload against an export: fixed
//! newstyle handshake with NBD_OPT_GO, then random writes of one size with a
//! queue depth, latency recorded per request. Used by `tandem demo`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

/// A connection past its handshake.
pub struct NbdConnection {
    stream: TcpStream,
    pub size_bytes: u64,
}

impl NbdConnection {
    /// Connects to `export` at `address` (`HOST:PORT`).
    pub fn connect(address: &str, export: &str) -> io::Result<Self> {
        let mut stream = TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        // Fixed newstyle, no zeroes.
        stream.write_all(&3u32.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option)?;
        let mut size_bytes = 0;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            let reply = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
            let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
            let mut data = vec![0u8; length];
            stream.read_exact(&mut data)?;
            match reply {
                REP_ACK => break,
                REP_INFO if data.len() >= 10 && data[..2] == [0, 0] => {
                    size_bytes = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                REP_INFO => {}
                _ => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(io::Error::other(format!("export {export} refused: {message}")));
                }
            }
        }
        Ok(Self { stream, size_bytes })
    }

    /// Sends a read request (the reply carries `length` bytes of data).
    pub(crate) fn send_read(&mut self, cookie: u64, offset: u64, length: u32) -> io::Result<()> {
        let mut request = Vec::with_capacity(28);
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&CMD_READ.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&request)
    }

    /// Reads the data of a successful read's reply into `buf`.
    pub(crate) fn read_data(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.stream.read_exact(buf)
    }

    pub(crate) fn send_write(&mut self, cookie: u64, offset: u64, payload: &[u8]) -> io::Result<()> {
        let mut request = Vec::with_capacity(28 + payload.len());
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&CMD_WRITE.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        request.extend_from_slice(payload);
        self.stream.write_all(&request)
    }

    pub(crate) fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().expect("4 bytes"));
        if magic != REPLY_MAGIC {
            return Err(io::Error::other(format!("bad NBD reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4 bytes"));
        Ok((error, u64::from_be_bytes(reply[8..16].try_into().expect("8 bytes"))))
    }

    pub(crate) fn disconnect(mut self) {
        let mut request = Vec::with_capacity(28);
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&CMD_DISC.to_be_bytes());
        request.extend_from_slice(&[0u8; 20]);
        let _ = self.stream.write_all(&request);
    }
}

/// A random-write workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub block_bytes: u32,
    pub queue_depth: usize,
    pub duration: Duration,
}

/// What one interval (or the whole run) measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub writes: u64,
    pub elapsed: Duration,
    pub latency_us: Histogram<u64>,
}

impl LoadReport {
    fn new() -> Self {
        Self {
            writes: 0,
            elapsed: Duration::ZERO,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
        }
    }

    #[must_use]
    pub fn iops(&self) -> f64 {
        self.writes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `workload` on `connection`; `on_interval` hears every second's numbers.
pub fn run_random_writes(
    mut connection: NbdConnection,
    workload: &Workload,
    mut on_interval: impl FnMut(&LoadReport),
) -> io::Result<LoadReport> {
    let mut rng = rand::rng();
    let blocks = connection.size_bytes / u64::from(workload.block_bytes);
    let mut payload = vec![0u8; workload.block_bytes as usize];
    let (mut total, mut interval) = (LoadReport::new(), LoadReport::new());
    let started = Instant::now();
    let mut interval_started = started;
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut cookie = 0u64;
    loop {
        let running = started.elapsed() < workload.duration;
        while running && in_flight.len() < workload.queue_depth {
            cookie += 1;
            rng.fill(&mut payload[..]);
            let offset = rng.random_range(0..blocks) * u64::from(workload.block_bytes);
            connection.send_write(cookie, offset, &payload)?;
            in_flight.insert(cookie, Instant::now());
        }
        if in_flight.is_empty() {
            break;
        }
        let (error, done) = connection.reply()?;
        if error != 0 {
            return Err(io::Error::other(format!("write failed with NBD error {error}")));
        }
        let sent = in_flight.remove(&done).ok_or_else(|| io::Error::other("reply for an unknown request"))?;
        let latency_us = sent.elapsed().as_micros().max(1) as u64;
        for report in [&mut total, &mut interval] {
            report.writes += 1;
            let _ = report.latency_us.record(latency_us);
        }
        if interval_started.elapsed() >= Duration::from_secs(1) {
            interval.elapsed = interval_started.elapsed();
            on_interval(&interval);
            interval = LoadReport::new();
            interval_started = Instant::now();
        }
    }
    total.elapsed = started.elapsed();
    connection.disconnect();
    Ok(total)
}
