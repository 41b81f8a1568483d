//! Garbage and out-of-range NBD requests: each gets the NBD error reply or a
//! clean disconnect with a log line, and other clients keep working.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use tandem_tests::nbd_client::{NbdClient, CMD_READ, CMD_WRITE};
use tandem_tests::pattern::block_content;
use tandem_tests::{require_tool, run_ok, Node};

const VOLUME_BYTES: u64 = 16 << 20;

/// True when the server closed the connection (EOF or reset) within 10 s.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut,
        }
    }
}

fn assert_still_serving(good: &mut NbdClient, round: u64) {
    let data = block_content(round, round);
    assert_eq!(good.write(round * 4096, &data).unwrap(), 0, "the well-behaved client can still write");
    assert_eq!(good.read(round * 4096, 4096).unwrap().unwrap(), data, "and read back");
}

#[test]
fn bad_requests_get_errors_or_clean_disconnects_and_others_keep_working() {
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", VOLUME_BYTES)]);
    let mut good = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    assert_eq!(good.size_bytes, VOLUME_BYTES);
    assert_still_serving(&mut good, 1);

    // Requests answered with an error; the connection goes on.
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    assert_eq!(client.read(VOLUME_BYTES - 512, 4096).unwrap(), Err(22), "read past the end: EINVAL");
    assert_eq!(client.read(u64::MAX - 10, 4096).unwrap(), Err(22), "offset overflow: EINVAL");
    assert_eq!(client.write(VOLUME_BYTES - 4096, &[7u8; 8192]).unwrap(), 28, "write past the end: ENOSPC");
    client.send(0, 99, 5, 0, 0, &[]).unwrap();
    assert_eq!(client.reply().unwrap(), (22, 5), "unknown command: EINVAL");
    client.send(0x80, CMD_WRITE, 6, 0, 512, &[1u8; 512]).unwrap();
    assert_eq!(client.reply().unwrap(), (22, 6), "unknown flag on a write: EINVAL, payload skipped");
    client.send(0, CMD_READ, 7, 0, 0, &[]).unwrap();
    assert_eq!(client.reply().unwrap(), (22, 7), "zero-length read: EINVAL");
    let data = block_content(9, 2);
    assert_eq!(client.write(2 * 4096, &data).unwrap(), 0, "the same connection still works");
    assert_eq!(client.read(2 * 4096, 4096).unwrap().unwrap(), data);
    assert_still_serving(&mut good, 3);

    // Garbage after the handshake: clean disconnect with a log line.
    let mut garbage = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    garbage.stream.write_all(&[0xde; 100]).unwrap();
    assert!(closed_by_server(&mut garbage.stream), "garbage request closes the connection");
    assert!(node.log().contains("bad request magic"), "the disconnect is logged");

    // A write larger than the advertised maximum cannot be skipped: disconnect.
    let mut huge = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    huge.send(0, CMD_WRITE, 1, 0, 64 << 20, &[]).unwrap();
    assert!(closed_by_server(&mut huge.stream), "oversized write closes the connection");

    // Half a request, then the client vanishes.
    let mut half = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    half.stream.write_all(&[0x25, 0x60, 0x95, 0x13, 0, 0]).unwrap();
    drop(half);
    // A write whose payload never fully arrives.
    let mut partial = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    partial.send(0, CMD_WRITE, 1, 0, 65536, &[5u8; 1000]).unwrap();
    drop(partial);

    // Garbage during the handshake, and connections that say nothing.
    let mut raw = TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    raw.write_all(&[0xff; 200]).unwrap();
    assert!(closed_by_server(&mut raw), "garbage handshake closes the connection");
    drop(TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap());
    let mut unknown = TcpStream::connect(("127.0.0.1", node.nbd_port)).unwrap();
    unknown.read_exact(&mut greeting).unwrap();
    unknown.write_all(&3u32.to_be_bytes()).unwrap();
    let mut option = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    option.extend_from_slice(&1u32.to_be_bytes());
    option.extend_from_slice(&7u32.to_be_bytes());
    option.extend_from_slice(b"nothing");
    unknown.write_all(&option).unwrap();
    assert!(closed_by_server(&mut unknown), "EXPORT_NAME of an unknown export closes the connection");
    assert!(NbdClient::connect(node.nbd_port, "rg01/missing").unwrap_err().to_string().contains("no export named"));

    assert_still_serving(&mut good, 4);
    require_tool("qemu-io", "qemu-utils");
    let output = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"])
            .arg(node.nbd_uri("rg01", "data")),
    );
    assert!(!output.contains("failed"), "{output}");
    let status = node.group_status("rg01");
    assert!(status["state"] == "Online", "the group is unharmed: {status}");
}

/// A client may pipeline far beyond the per-connection limits (512 requests,
/// 64 MiB pending) and only then read: every request is still answered.
#[test]
fn pipelines_beyond_the_connection_limits_are_all_answered() {
    let node = Node::start("");
    node.create_group("rg01", "128MiB", &[("data", VOLUME_BYTES)]);
    let mut client = NbdClient::connect(node.nbd_port, "rg01/data").unwrap();
    let data = block_content(77, 0);
    assert_eq!(client.write(0, &data).unwrap(), 0);

    // 1500 small reads: three times the request limit.
    let small = 1500u64;
    for cookie in 0..small {
        client.send(0, CMD_READ, cookie, 0, 4096, &[]).unwrap();
    }
    // 40 reads of 4 MiB: 160 MiB, well past the byte budget.
    let large = 40u64;
    for cookie in small..small + large {
        client.send(0, CMD_READ, cookie, (cookie % 3) * (4 << 20), 4 << 20, &[]).unwrap();
    }
    let mut answered = std::collections::HashSet::new();
    for _ in 0..small + large {
        let (error, cookie) = client.reply().unwrap();
        assert_eq!(error, 0);
        let length = if cookie < small { 4096 } else { 4 << 20 };
        let mut payload = vec![0u8; length];
        client.stream.read_exact(&mut payload).unwrap();
        if cookie < small {
            assert_eq!(payload, data);
        }
        assert!(answered.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(answered.len() as u64, small + large);
}
