//! A fault-injecting TCP proxy between two daemons (test equipment).
//!
//! Every connection is forwarded both ways. On the data channels of a
//! session (connections that start with a handshake line in clear and then
//! carry frames sealed with `sign`, whose headers travel in clear), the
//! proxy parses frames and applies the next fault of its plan to one frame:
//! a flipped bit in the header, the header's tag, the payload or the
//! payload's tag, a replayed frame, or two frames swapped. Connections that
//! begin with TLS pass untouched unless the plan asks to alter the first
//! TLS record the client sends after its handshake (a downgrade attempt).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use tandem_proto::{FrameHeader, RecordHeader, FRAME_MAGIC, RECORD_HEADER_BYTES, RECORD_MAGIC};

const TAG_BYTES: usize = 16;
/// The client's application-data record that carries its handshake line:
/// rustls sends its certificate, signature and Finished in the first.
const HELLO_RECORD: usize = 2;

/// One fault, applied to one data-channel frame that has a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    FlipHeader,
    FlipHeaderTag,
    FlipPayload,
    FlipPayloadTag,
    Replay,
    Swap,
    /// Flip a bit of the first application-data record a TLS client sends
    /// (its handshake line with the offered encryption).
    AlterTlsHello,
}

/// The proxy; faults still planned and faults applied are shared with the test.
pub struct FaultProxy {
    pub address: SocketAddr,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    pub applied: Arc<Mutex<Vec<Fault>>>,
    /// Every byte the clients sent, up to 256 MiB.
    pub captured: Arc<Mutex<Vec<u8>>>,
    /// While set, new connections are closed at once (connections already
    /// open keep working): a peer that became unreachable for new sessions.
    pub refuse_new: Arc<std::sync::atomic::AtomicBool>,
}

const CAPTURE_LIMIT_BYTES: usize = 256 << 20;

type Capture = Arc<Mutex<Vec<u8>>>;

impl FaultProxy {
    /// Forwards connections to `target`, applying `plan` in order.
    #[must_use]
    pub fn start(target: SocketAddr, plan: &[Fault]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let address = listener.local_addr().expect("proxy address");
        let plan = Arc::new(Mutex::new(plan.iter().copied().collect::<VecDeque<_>>()));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let captured: Capture = Arc::new(Mutex::new(Vec::new()));
        let (thread_plan, thread_applied, thread_captured) =
            (Arc::clone(&plan), Arc::clone(&applied), Arc::clone(&captured));
        let refuse_new = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread_refuse = Arc::clone(&refuse_new);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if thread_refuse.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else { continue };
                let (plan, applied) = (Arc::clone(&thread_plan), Arc::clone(&thread_applied));
                let capture = Arc::clone(&thread_captured);
                let (client_reader, server_writer) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || forward_client(client_reader, server_writer, &plan, &applied, &capture));
                std::thread::spawn(move || pipe(server, client, None));
            }
        });
        Self { address, plan, applied, captured, refuse_new }
    }

    /// Faults not applied yet.
    #[must_use]
    pub fn remaining(&self) -> usize {
        self.plan.lock().unwrap().len()
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, capture: Option<&Capture>) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if let Some(capture) = capture {
            let mut captured = capture.lock().unwrap();
            if captured.len() + n <= CAPTURE_LIMIT_BYTES {
                captured.extend_from_slice(&buf[..n]);
            }
        }
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn take_fault(plan: &Mutex<VecDeque<Fault>>, tls: bool) -> Option<Fault> {
    let mut plan = plan.lock().unwrap();
    let next = *plan.front()?;
    ((next == Fault::AlterTlsHello) == tls).then(|| plan.pop_front().expect("front"))
}

/// Source to destination: a TLS connection passes through (but for a
/// planned hello alteration); a data channel is parsed frame by frame.
fn forward_client(
    mut from: TcpStream,
    mut to: TcpStream,
    plan: &Mutex<VecDeque<Fault>>,
    applied: &Mutex<Vec<Fault>>,
    capture: &Capture,
) {
    let mut first = [0u8; 1];
    if from.peek(&mut first).unwrap_or(0) == 0 {
        return pipe(from, to, Some(capture));
    }
    let planned = plan.lock().unwrap().front().copied();
    if first[0] == 0x16 || !matches!(planned, Some(f) if f != Fault::AlterTlsHello) {
        if first[0] == 0x16 {
            if let Some(fault) = take_fault(plan, true) {
                alter_tls_hello(&mut from, &mut to);
                applied.lock().unwrap().push(fault);
            }
        }
        return pipe(from, to, Some(capture));
    }
    let Some(line) = read_line(&mut from) else { return pipe(from, to, None) };
    if to.write_all(&line).is_err() {
        return;
    }
    let mut with_payload = 0;
    while let Some(frame) = read_sealed_frame(&mut from) {
        if frame.payload_bytes > 0 {
            with_payload += 1;
        }
        // The third payload frame of a channel: well inside the stream.
        let fault = if with_payload == 3 && frame.payload_bytes > 0 { take_fault(plan, false) } else { None };
        let out = match fault {
            Some(fault) => {
                applied.lock().unwrap().push(fault);
                apply(fault, frame, &mut from)
            }
            None => frame.bytes,
        };
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

struct SealedFrame {
    bytes: Vec<u8>,
    payload_bytes: usize,
}

fn read_line(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while from.read_exact(&mut byte).is_ok() {
        line.push(byte[0]);
        if byte[0] == b'\n' {
            return Some(line);
        }
    }
    None
}

/// A frame sealed with `sign`: header in clear, its tag, payload, its tag.
fn read_sealed_frame(from: &mut TcpStream) -> Option<SealedFrame> {
    let mut bytes = vec![0u8; RECORD_HEADER_BYTES + TAG_BYTES];
    from.read_exact(&mut bytes).ok()?;
    let header = &bytes[..RECORD_HEADER_BYTES];
    let magic = u32::from_le_bytes(header[..4].try_into().unwrap());
    let payload_bytes = match magic {
        RECORD_MAGIC => RecordHeader::decode(header).ok()?.payload_bytes() as usize,
        FRAME_MAGIC => FrameHeader::decode(header).ok()?.payload_bytes() as usize,
        _ => return None,
    };
    if payload_bytes > 0 {
        let start = bytes.len();
        bytes.resize(start + payload_bytes + TAG_BYTES, 0);
        from.read_exact(&mut bytes[start..]).ok()?;
    }
    Some(SealedFrame { bytes, payload_bytes })
}

fn apply(fault: Fault, frame: SealedFrame, from: &mut TcpStream) -> Vec<u8> {
    let mut bytes = frame.bytes;
    let payload_at = RECORD_HEADER_BYTES + TAG_BYTES;
    match fault {
        Fault::FlipHeader => bytes[40] ^= 0x04,
        Fault::FlipHeaderTag => bytes[RECORD_HEADER_BYTES + 3] ^= 0x01,
        Fault::FlipPayload => bytes[payload_at + frame.payload_bytes / 2] ^= 0x80,
        Fault::FlipPayloadTag => {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x10;
        }
        Fault::Replay => {
            let copy = bytes.clone();
            bytes.extend_from_slice(&copy);
        }
        Fault::Swap => {
            if let Some(next) = read_sealed_frame(from) {
                let mut swapped = next.bytes;
                swapped.extend_from_slice(&bytes);
                bytes = swapped;
            }
        }
        Fault::AlterTlsHello => unreachable!("applied to TLS connections"),
    }
    bytes
}

/// Forwards TLS records until the first application-data record (type 23)
/// the client sends, flips a bit in its body, and forwards it.
fn alter_tls_hello(from: &mut TcpStream, to: &mut TcpStream) {
    let mut seen_application_data = 0;
    loop {
        let mut header = [0u8; 5];
        if from.read_exact(&mut header).is_err() {
            return;
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut body = vec![0u8; length];
        if from.read_exact(&mut body).is_err() {
            return;
        }
        // TLS 1.3 hides the client's certificate, signature and Finished in
        // application-data records too: the handshake line (with the offered
        // encryption) comes in the record after them.
        if header[0] == 23 {
            seen_application_data += 1;
            if seen_application_data == HELLO_RECORD {
                body[length / 2] ^= 0x01;
            }
        }
        if to.write_all(&header).and_then(|()| to.write_all(&body)).is_err() || seen_application_data == HELLO_RECORD {
            return;
        }
    }
}
