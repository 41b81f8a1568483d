//! Measures the RDMA channel the way perftest measures verbs, for the
//! side-by-side in `scripts/bench-rdma` (run in the soft-RoCE lab guest):
//!
//!   rdma-perf ping-pong ADDRESS:PORT SIZE COUNT   # round trip of SIZE-byte messages
//!   rdma-perf stream ADDRESS:PORT SIZE SECONDS    # one-way bandwidth of SIZE-byte messages
//!
//! Both ends run in this process (two threads), each busy-polling the
//! non-blocking stream API the replication core uses (`try_send`,
//! `poll_into`), as ib_send_lat and ib_write_bw busy-poll.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_transport_rdma::{ChannelConfig, RdmaChannel, RdmaListener};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: rdma-perf ping-pong|stream ADDRESS:PORT SIZE COUNT|SECONDS");
        std::process::exit(2);
    }
    let address: SocketAddr = args[2].parse().expect("ADDRESS:PORT");
    let size: usize = args[3].parse().expect("SIZE in bytes");
    let amount: u64 = args[4].parse().expect("COUNT or SECONDS");
    let config = ChannelConfig { message_bytes: size, window: 32, timeout: Duration::from_secs(20) };
    let mut listener = RdmaListener::bind(address, config).unwrap_or_else(|e| panic!("{e}"));
    let pattern = args[1].clone();
    let server = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        if pattern == "ping-pong" {
            echo(&mut channel, size, amount);
        } else {
            sink(&mut channel, Duration::from_secs(amount + 5));
        }
    });
    let mut client = RdmaChannel::connect(address, config).unwrap_or_else(|e| panic!("{e}"));
    match args[1].as_str() {
        "ping-pong" => ping_pong(&mut client, size, amount),
        "stream" => stream(&mut client, size, Duration::from_secs(amount)),
        other => panic!("unknown pattern {other}"),
    }
    drop(client);
    let _ = server.join();
}

/// Sends `bytes` whole, polling until flow control takes it.
fn send_all(channel: &mut RdmaChannel, bytes: &[u8]) {
    let mut sent = 0;
    while sent < bytes.len() {
        sent += channel.try_send(&[&bytes[sent..]]).unwrap_or_else(|e| panic!("{e}"));
        if sent < bytes.len() {
            channel.poll_into(&mut []).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Receives exactly `into.len()` bytes.
fn receive_all(channel: &mut RdmaChannel, into: &mut [u8]) {
    let mut got = 0;
    while got < into.len() {
        got += channel.poll_into(&mut into[got..]).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn echo(channel: &mut RdmaChannel, size: usize, count: u64) {
    let mut buf = vec![0u8; size];
    for _ in 0..count + count / 10 {
        receive_all(channel, &mut buf);
        send_all(channel, &buf);
    }
}

fn ping_pong(channel: &mut RdmaChannel, size: usize, count: u64) {
    let message: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut back = vec![0u8; size];
    let warmup = count / 10;
    let mut samples = Vec::with_capacity(count as usize);
    for n in 0..count + warmup {
        let started = Instant::now();
        send_all(channel, &message);
        receive_all(channel, &mut back);
        if n >= warmup {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        assert_eq!(back, message, "the echo carries the message");
    }
    samples.sort_by(f64::total_cmp);
    let average = samples.iter().sum::<f64>() / samples.len() as f64;
    println!(
        "rdma channel ping-pong {size} B: round trip avg {average:.2} us, p50 {:.2} us, p99 {:.2} us ({count} round trips)",
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100]
    );
}

/// Takes what arrives for `duration` (a peer's disconnect does not break
/// this side's queue pair: it would poll forever).
fn sink(channel: &mut RdmaChannel, duration: Duration) {
    let mut buf = vec![0u8; 1 << 20];
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && channel.poll_into(&mut buf).is_ok() {}
}

fn stream(channel: &mut RdmaChannel, size: usize, duration: Duration) {
    let message = vec![7u8; size];
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        send_all(channel, &message);
        bytes += size as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "rdma channel stream {size} B: {:.1} MB/s ({:.0} messages/s)",
        bytes as f64 / seconds / 1e6,
        bytes as f64 / size as f64 / seconds
    );
}
