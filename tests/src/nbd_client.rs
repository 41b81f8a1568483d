//! A small NBD client for tests: fixed newstyle handshake with NBD_OPT_GO,
//! simple replies, pipelined requests, and raw bytes for malformed input.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const FLAG_FUA: u16 = 1;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

/// A connection in the transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    pub stream: TcpStream,
    pub size_bytes: u64,
}

impl NbdClient {
    /// Connects to `export` on 127.0.0.1:`port`.
    pub fn connect(port: u16, export: &str) -> io::Result<Self> {
        Self::connect_to("127.0.0.1", port, export)
    }

    /// Connects to `export` on `host`:`port`.
    pub fn connect_to(host: &str, port: u16, export: &str) -> io::Result<Self> {
        let mut stream = TcpStream::connect((host, port))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        stream.write_all(&3u32.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&7u32.to_be_bytes());
        option.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option)?;
        let mut size_bytes = 0;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            let reply_type = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
            let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes")) as usize;
            let mut data = vec![0u8; length];
            stream.read_exact(&mut data)?;
            match reply_type {
                1 => break,
                3 if data.len() >= 10 && data[..2] == [0, 0] => {
                    size_bytes = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                3 => {}
                error => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(io::Error::other(format!("NBD_OPT_GO refused ({error:#x}): {message}")));
                }
            }
        }
        Ok(Self { stream, size_bytes })
    }

    /// Sends one request (and the payload of a write).
    pub fn send(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut request = Vec::with_capacity(28 + payload.len());
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&flags.to_be_bytes());
        request.extend_from_slice(&command.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        request.extend_from_slice(payload);
        self.stream.write_all(&request)
    }

    /// Reads one simple reply header: (error, cookie).
    pub fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header)?;
        let magic = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        if magic != REPLY_MAGIC {
            return Err(io::Error::other(format!("bad reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        Ok((error, u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"))))
    }

    /// Writes and waits for the answer; returns the NBD error (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.send(0, CMD_WRITE, 1, offset, data.len() as u32, data)?;
        Ok(self.reply()?.0)
    }

    /// Reads `length` bytes, or returns the NBD error.
    pub fn read(&mut self, offset: u64, length: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.send(0, CMD_READ, 2, offset, length, &[])?;
        let (error, _) = self.reply()?;
        if error != 0 {
            return Ok(Err(error));
        }
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(Ok(data))
    }
}
