//! Socket settings shared by replication connections and the transport probe.

use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Send and receive buffer size of replication sockets: large enough to keep
/// a long-distance link full (bandwidth × round trip).
pub const DEFAULT_SOCKET_BUFFER_BYTES: u32 = 4 << 20;

/// Asks the kernel for `bytes` of send and receive buffer on `stream` (it
/// caps the request at net.core.wmem_max / rmem_max).
pub fn set_socket_buffers(stream: &TcpStream, bytes: u32) {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a valid int on a socket we own.
        unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
