//! Measures the RDMA channel the way perftest measures verbs, for the
//! side-by-side in `scripts/bench-rdma` (run in the soft-RoCE lab guest):
//!
//!   rdma-perf ping-pong ADDRESS:PORT SIZE COUNT   # round trip of SIZE-byte messages sent from
//!                                                 # registered memory (as the core sends arena buffers)
//!   rdma-perf ping-pong-copied ADDRESS:PORT SIZE COUNT  # the same, copied into send slots
//!   rdma-perf stream ADDRESS:PORT SIZE SECONDS    # one-way bandwidth of SIZE-byte messages
//!   rdma-perf stream-lent ADDRESS:PORT SIZE SECONDS  # the same payloads lent (RDMA READ), not copied
//!
//! Both ends run in this process (two threads), each driving the
//! non-blocking stream API the replication core uses (`try_send`,
//! `poll_into`, and for lent payloads `poll_into_landing` into buffers in
//! turn, as a destination core lets record payloads land). Ping-pong
//! busy-polls, as ib_send_lat does; the streams wait as a core does: a
//! side that can move nothing polls for a short budget, then sleeps on its
//! completion channel (two sides busy-polling for good would take both
//! CPUs of a small machine from the soft-RoCE driver's own work, where
//! ib_write_bw's receiving side does not run at all).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tandem_transport_rdma::{ChannelConfig, LendRegion, RdmaChannel, RdmaListener};

/// Payload buffers the lending sender rotates through.
const LENT_BUFFERS: usize = 32;
/// Buffers the receiver of lent payloads lets them land in, in turn.
const LANDING_BUFFERS: usize = 16;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: rdma-perf ping-pong|ping-pong-copied|stream|stream-lent ADDRESS:PORT SIZE COUNT|SECONDS");
        std::process::exit(2);
    }
    let address: SocketAddr = args[2].parse().expect("ADDRESS:PORT");
    let size: usize = args[3].parse().expect("SIZE in bytes");
    let amount: u64 = args[4].parse().expect("COUNT or SECONDS");
    let config = ChannelConfig { message_bytes: size, window: 32, timeout: Duration::from_secs(20), lend: None };
    // Each end sends from (and receives into) a region of its own: lent
    // payloads are read by the peer's adapter (descriptors are small
    // messages); a registered ping-pong message is gathered by the local
    // adapter (never lent: the threshold is out of reach).
    let (server_memory, server_region) = region(size, LANDING_BUFFERS);
    let (client_memory, client_region) = region(size, LENT_BUFFERS);
    let (server_config, client_config) = match args[1].as_str() {
        "stream-lent" => {
            let server = ChannelConfig { message_bytes: 4096, lend: Some(server_region), ..config };
            (server, ChannelConfig { lend: Some(client_region), ..server })
        }
        "ping-pong" => {
            let never_lent = |region: LendRegion| Some(LendRegion { threshold_bytes: usize::MAX, ..region });
            (
                ChannelConfig { lend: never_lent(server_region), ..config },
                ChannelConfig { lend: never_lent(client_region), ..config },
            )
        }
        _ => (config, config),
    };
    let mut listener = RdmaListener::bind(address, server_config).unwrap_or_else(|e| panic!("{e}"));
    let pattern = args[1].clone();
    let server = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        match pattern.as_str() {
            "ping-pong" => echo(&mut channel, &mut server_memory[..size], amount),
            "ping-pong-copied" => echo(&mut channel, &mut vec![0u8; size], amount),
            "stream-lent" => sink_landing(&mut channel, server_memory, size, Duration::from_secs(amount + 5)),
            _ => sink(&mut channel, &mut vec![0u8; 1 << 20], Duration::from_secs(amount + 5)),
        }
    });
    let mut client = RdmaChannel::connect(address, client_config).unwrap_or_else(|e| panic!("{e}"));
    match args[1].as_str() {
        "ping-pong" => ping_pong(&mut client, &mut client_memory[..size], amount, 2),
        "ping-pong-copied" => ping_pong(&mut client, &mut vec![0u8; size], amount, 4),
        "stream" => stream(&mut client, size, Duration::from_secs(amount)),
        "stream-lent" => stream_lent(&mut client, client_memory, size, Duration::from_secs(amount)),
        other => panic!("unknown pattern {other}"),
    }
    drop(client);
    let _ = server.join();
}

/// Sends `bytes` whole, polling until flow control takes it. From a
/// channel's registered region they are gathered by the adapter, not
/// copied: the token to wait for before `bytes` change.
fn send_all(channel: &mut RdmaChannel, bytes: &[u8]) -> Option<u64> {
    let (mut sent, mut token) = (0, None);
    while sent < bytes.len() {
        let (count, lent) = channel.try_send_or_lend(&[&bytes[sent..]]).unwrap_or_else(|e| panic!("{e}"));
        sent += count;
        token = token.or(lent);
        if sent < bytes.len() {
            channel.poll_into(&mut []).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    token
}

/// Polls until the send of `token` (if any) completed.
fn wait_released(channel: &mut RdmaChannel, token: Option<u64>) {
    let Some(token) = token else { return };
    loop {
        if let Some(released) = channel.take_released() {
            assert_eq!(released, token, "one send in flight");
            return;
        }
        channel.poll_into(&mut []).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Receives exactly `into.len()` bytes.
fn receive_all(channel: &mut RdmaChannel, into: &mut [u8]) {
    let mut got = 0;
    while got < into.len() {
        got += channel.poll_into(&mut into[got..]).unwrap_or_else(|e| panic!("{e}"));
    }
}

fn echo(channel: &mut RdmaChannel, buf: &mut [u8], count: u64) {
    for _ in 0..count + count / 10 {
        receive_all(channel, buf);
        let token = send_all(channel, buf);
        wait_released(channel, token);
    }
}

/// `copies`: of the message per round trip (out of receive slots, and into
/// send slots unless the message is registered).
fn ping_pong(channel: &mut RdmaChannel, message: &mut [u8], count: u64, copies: u32) {
    let size = message.len();
    assert!(size >= 8, "ping-pong messages carry an 8-byte sequence number");
    message.iter_mut().enumerate().for_each(|(i, byte)| *byte = i as u8);
    let mut back = vec![0u8; size];
    let warmup = count / 10;
    let mut samples = Vec::with_capacity(count as usize);
    let mut started = Instant::now();
    for n in 0..count + warmup {
        // Each message carries its number, which the echo must bring back.
        message[..8].copy_from_slice(&n.to_le_bytes());
        let token = send_all(channel, message);
        receive_all(channel, &mut back);
        let now = Instant::now();
        if n >= warmup {
            samples.push((now - started).as_secs_f64() * 1e6);
        }
        started = now;
        assert_eq!(back[..8], message[..8], "the echo of message {n} carries its number");
        wait_released(channel, token);
    }
    assert_eq!(back, message, "the echo carries the message");
    samples.sort_by(f64::total_cmp);
    let average = samples.iter().sum::<f64>() / samples.len() as f64;
    println!(
        "rdma channel ping-pong {size} B: round trip avg {average:.2} us, p50 {:.2} us, p99 {:.2} us, min {:.2} us ({count} round trips); \
         its {copies} copies of {size} B take {:.2} us on this CPU",
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        samples[0],
        copy_cost_us(size) * f64::from(copies)
    );
}

/// What copying `size` bytes costs here, in microseconds (the emulated
/// guest copies far slower than hardware, which weighs on the ratio).
fn copy_cost_us(size: usize) -> f64 {
    let from = vec![5u8; size];
    let mut to = vec![0u8; size];
    let rounds = 2000;
    let started = Instant::now();
    for _ in 0..rounds {
        to.copy_from_slice(std::hint::black_box(&from));
        std::hint::black_box(&mut to);
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// `count` buffers of `size` bytes in memory that lives as long as the process.
fn region(size: usize, count: usize) -> (&'static mut [u8], LendRegion) {
    let memory: &'static mut [u8] = Box::leak(vec![7u8; size * count].into_boxed_slice());
    let region = LendRegion { address: memory.as_ptr() as usize, bytes: memory.len(), threshold_bytes: size };
    (memory, region)
}

/// Takes what arrives into `buf` for `duration` (a peer's disconnect does
/// not break this side's queue pair: it would poll forever).
fn sink(channel: &mut RdmaChannel, buf: &mut [u8], duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        match channel.poll_into(buf) {
            Ok(0) => {
                if channel.wait_for_completion(deadline).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Takes lent `size`-byte payloads as they land, into [`LANDING_BUFFERS`]
/// buffers in turn (a buffer is used again once the stream landed past the
/// payload it took), for `duration`.
fn sink_landing(channel: &mut RdmaChannel, memory: &mut [u8], size: usize, duration: Duration) {
    let deadline = Instant::now() + duration;
    let mut ends = std::collections::VecDeque::new();
    let mut taken = 0u64;
    while Instant::now() < deadline {
        while ends.front().is_some_and(|&end| end <= channel.landed_through()) {
            ends.pop_front();
        }
        if ends.len() == LANDING_BUFFERS {
            if channel.wait_for_completion(deadline).is_err() {
                return;
            }
            continue;
        }
        let buffer = (taken / size as u64) as usize % LANDING_BUFFERS;
        match channel.poll_into_landing(&mut memory[buffer * size..][..size]) {
            Ok(0) => {
                if channel.wait_for_completion(deadline).is_err() {
                    return;
                }
            }
            Ok(count) => {
                assert_eq!(count, size, "a lent payload lands whole");
                taken += count as u64;
                ends.push_back(taken);
            }
            Err(_) => return,
        }
    }
}

/// Lends `size`-byte payloads from [`LENT_BUFFERS`] buffers in turn (a
/// buffer is used again once its payload was released) for `duration`.
fn stream_lent(channel: &mut RdmaChannel, memory: &mut [u8], size: usize, duration: Duration) {
    let mut free: Vec<usize> = (0..LENT_BUFFERS).collect();
    let mut lent = std::collections::HashMap::new();
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        channel.poll_into(&mut []).unwrap_or_else(|e| panic!("{e}"));
        while let Some(token) = channel.take_released() {
            free.push(lent.remove(&token).expect("a token lent"));
        }
        let lent_now = match free.last() {
            Some(&buffer) => {
                let (count, token) =
                    channel.try_send_or_lend(&[&memory[buffer * size..][..size]]).unwrap_or_else(|e| panic!("{e}"));
                if let Some(token) = token {
                    free.pop();
                    lent.insert(token, buffer);
                    bytes += count as u64;
                }
                token.is_some()
            }
            None => false,
        };
        if !lent_now {
            channel.wait_for_completion(started + duration).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    print_rate("stream-lent", size, bytes, started, "payloads/s read by the peer's adapter, no copy");
}

/// "rdma channel PATTERN SIZE B: MB/s (N UNIT)" for `bytes` since `started`.
fn print_rate(pattern: &str, size: usize, bytes: u64, started: Instant, unit: &str) {
    let seconds = started.elapsed().as_secs_f64();
    let (rate, count) = (bytes as f64 / seconds / 1e6, bytes as f64 / size as f64 / seconds);
    println!("rdma channel {pattern} {size} B: {rate:.1} MB/s ({count:.0} {unit})");
}

fn stream(channel: &mut RdmaChannel, size: usize, duration: Duration) {
    let message = vec![7u8; size];
    let started = Instant::now();
    let mut bytes = 0u64;
    let deadline = started + duration;
    while Instant::now() < deadline {
        let count = channel.try_send(&[&message]).unwrap_or_else(|e| panic!("{e}"));
        bytes += count as u64;
        if count == 0 {
            channel.wait_for_completion(deadline).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    print_rate("stream", size, bytes, started, "messages/s");
}
