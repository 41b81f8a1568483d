//! A small NBD client for workloads (`tandem bench`, `tandem demo`): fixed
//! newstyle handshake with NBD_OPT_GO, then pipelined reads and writes with
//! simple replies.

use std::io::{self, Read, Write};
use std::net::TcpStream;

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
