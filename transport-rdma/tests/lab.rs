//! The RDMA channel on real verbs: these run in the soft-RoCE lab guest
//! (`.ci/run` starts it; `rxe0` on 10.77.0.1), hence `#[ignore]` on hosts
//! without RDMA: `cargo test -p tandem-transport-rdma -- --ignored` there.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tandem_transport_rdma::{ChannelConfig, LendRegion, RdmaChannel, RdmaListener};

const LAB_IP: &str = "10.77.0.1";

fn address(port: u16) -> SocketAddr {
    SocketAddr::new(LAB_IP.parse().unwrap(), port)
}

/// Payload `n`: its index and a length that varies.
fn message(n: u32, max: usize) -> Vec<u8> {
    let length = 4 + (n as usize * 7919) % (max - 4);
    let mut payload = vec![(n % 251) as u8; length];
    payload[..4].copy_from_slice(&n.to_le_bytes());
    payload
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn the_lab_address_has_a_roce_path() {
    let path = tandem_transport_rdma::devices::path_for(LAB_IP.parse().unwrap()).unwrap();
    assert_eq!(path.device, "rxe0");
    let refused = tandem_transport_rdma::devices::path_for(IpAddr::from([192, 0, 2, 1])).unwrap_err();
    assert!(
        refused.contains("no RDMA device has a RoCE v2 GID for 192.0.2.1") && refused.contains("rxe0"),
        "{refused}"
    );
}

#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn messages_echo_in_order_with_their_content() {
    let config = ChannelConfig { message_bytes: 16 << 10, window: 16, timeout: Duration::from_secs(20), lend: None };
    let mut listener = RdmaListener::bind(address(18_601), config).unwrap();
    let server = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap();
        for _ in 0..500 {
            let payload = channel.recv().unwrap();
            channel.send(&payload).unwrap();
        }
    });
    let mut client = RdmaChannel::connect(address(18_601), config).unwrap();
    for n in 0..500 {
        let sent = message(n, config.message_bytes);
        client.send(&sent).unwrap();
        assert_eq!(client.recv().unwrap(), sent, "message {n}");
    }
    server.join().unwrap();
    let too_big = client.send(&vec![0u8; config.message_bytes + 1]).unwrap_err();
    assert!(too_big.contains("exceeds"), "{too_big}");
}

/// The smallest window with both ends sending as fast as they can: every
/// message arrives, in order, and no wait for a credit ever times out.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn a_tiny_window_under_two_way_load_never_stalls() {
    let config = ChannelConfig { message_bytes: 4096, window: 4, timeout: Duration::from_secs(5), lend: None };
    let count = 3000u32;
    let mut listener = RdmaListener::bind(address(18_602), config).unwrap();
    let exchange = move |mut channel: RdmaChannel| {
        // Send and receive interleaved: grants ride on data both ways.
        let (mut sent, mut received) = (0u32, 0u32);
        while received < count {
            if sent < count {
                channel.send(&message(sent, config.message_bytes)).unwrap();
                sent += 1;
            }
            if sent == count || sent % 3 == 0 {
                let payload = channel.recv().unwrap();
                assert_eq!(payload, message(received, config.message_bytes), "message {received}");
                received += 1;
            }
        }
        // Kept open until both ends took everything: a closed queue pair
        // flushes the sends it has not transmitted yet.
        (channel.credit_messages_sent, channel)
    };
    let server = std::thread::spawn(move || exchange(listener.accept().unwrap()));
    let client = RdmaChannel::connect(address(18_602), config).unwrap();
    let (client_credit_messages, _client) = exchange(client);
    let (server_credit_messages, _server) = server.join().unwrap();
    eprintln!("credit-only messages: client {client_credit_messages}, server {server_credit_messages}");
}

/// One way, through the non-blocking stream API a core uses, with a window
/// wide enough that most sends ask for no completion of their own: every
/// byte arrives in order and the sender never runs out of slots for good.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn a_stream_of_mostly_unsignaled_sends_arrives_whole() {
    let config = ChannelConfig { message_bytes: 4096, window: 32, timeout: Duration::from_secs(20), lend: None };
    let total_bytes = 24usize << 20;
    let pattern = |at: usize| (at % 251) as u8;
    let mut listener = RdmaListener::bind(address(18_604), config).unwrap();
    let server = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap();
        let mut buf = vec![0u8; 10_000];
        let mut received = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while received < total_bytes {
            assert!(std::time::Instant::now() < deadline, "stalled at byte {received}");
            let count = channel.poll_into(&mut buf).unwrap();
            for (i, byte) in buf[..count].iter().enumerate() {
                assert_eq!(*byte, pattern(received + i), "byte {}", received + i);
            }
            received += count;
        }
    });
    let mut client = RdmaChannel::connect(address(18_604), config).unwrap();
    let source: Vec<u8> = (0..total_bytes).map(pattern).collect();
    let (mut sent, mut part) = (0, 1usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while sent < total_bytes {
        assert!(std::time::Instant::now() < deadline, "no slot or credit after byte {sent}");
        // Parts of varying sizes: messages from a few bytes to a whole slot.
        part = (part * 7 + 13) % 9000 + 1;
        let end = (sent + part).min(total_bytes);
        sent += client.try_send(&[&source[sent..end]]).unwrap();
        client.poll_into(&mut []).unwrap();
    }
    server.join().unwrap();
    assert!(client.messages_sent > 6000, "{} messages", client.messages_sent);
}

/// Frames of a header and a payload of 1 to 70 KiB: payloads of 16 KiB and
/// more that lie in the sender's lending region travel as descriptors the
/// receiver reads with RDMA READ; those of 2 KiB and more are gathered by
/// the sender's adapter from where they lie. The receiver gets the same
/// byte stream, in order, whether it reads into a buffer of its own region
/// or into any other buffer (registered for the read), and every lent or
/// gathered payload is released back to the sender. A receiver that lets
/// payloads land (as the engine does) takes each at once and checks it
/// only once `landed_through` passed it, with several reads in flight.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn lent_payloads_are_read_in_order_and_released() {
    for (port, receiver_has_region, landing) in
        [(18_605, false, false), (18_606, true, false), (18_607, true, true), (18_608, false, true)]
    {
        lend_and_read(port, receiver_has_region, landing);
    }
}

/// Payload buffers of a receiver that lets payloads land (more than the
/// channel's reads ahead, so that several are in flight).
const LANDING_SLOTS: usize = 12;

const LEND_SLOT_BYTES: usize = 80 << 10;

/// A region of `slots` lending slots, alive for the whole test process.
fn leaked_region(slots: usize) -> (&'static mut [u8], LendRegion) {
    let memory: &'static mut [u8] = Box::leak(vec![0u8; slots * LEND_SLOT_BYTES].into_boxed_slice());
    let region = LendRegion { address: memory.as_ptr() as usize, bytes: memory.len(), threshold_bytes: 16 << 10 };
    (memory, region)
}

fn frame_payload_bytes(n: u32) -> usize {
    1 + (n as usize * 7_919) % (70 << 10)
}

fn lend_and_read(port: u16, receiver_has_region: bool, landing: bool) {
    let frames = 300u32;
    let base = ChannelConfig { message_bytes: 4096, window: 8, timeout: Duration::from_secs(20), lend: None };
    let (receiver_memory, receiver_region) = leaked_region(LANDING_SLOTS);
    let receiver_config = ChannelConfig { lend: receiver_has_region.then_some(receiver_region), ..base };
    let mut listener = RdmaListener::bind(address(port), receiver_config).unwrap();
    let all_released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver_may_go = std::sync::Arc::clone(&all_released);
    let receiver = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap();
        let mut heap = vec![0u8; LEND_SLOT_BYTES * LANDING_SLOTS];
        let buffer: &mut [u8] = if receiver_has_region { receiver_memory } else { &mut heap };
        if landing {
            receive_landing(&mut channel, buffer, frames);
        }
        for n in (0..frames).filter(|_| !landing) {
            let mut header = [0u8; 8];
            read_exact(&mut channel, &mut header);
            assert_eq!(u32::from_le_bytes(header[..4].try_into().unwrap()), n, "frame order");
            let length = u32::from_le_bytes(header[4..].try_into().unwrap()) as usize;
            assert_eq!(length, frame_payload_bytes(n));
            read_exact(&mut channel, &mut buffer[..length]);
            assert!(buffer[..length].iter().all(|&b| b == (n % 251) as u8), "payload of frame {n}");
        }
        let read = channel.lent_and_read_bytes().1;
        // The last releases go out as credits allow: the channel stays
        // until the sender has them all.
        while !receiver_may_go.load(std::sync::atomic::Ordering::Acquire) {
            channel.poll_into(&mut []).unwrap();
        }
        read
    });
    let (sender_memory, sender_region) = leaked_region(16);
    let mut sender = RdmaChannel::connect(address(port), ChannelConfig { lend: Some(sender_region), ..base }).unwrap();
    let mut free_slots: Vec<usize> = (0..16).collect();
    let mut lent_slots = std::collections::HashMap::new();
    let mut expected_lent = 0u64;
    for n in 0..frames {
        let length = frame_payload_bytes(n);
        while free_slots.is_empty() {
            sender.poll_into(&mut []).unwrap();
            while let Some(token) = sender.take_released() {
                free_slots.push(lent_slots.remove(&token).expect("a token that was lent"));
            }
        }
        let slot = free_slots.pop().unwrap();
        let payload = &mut sender_memory[slot * LEND_SLOT_BYTES..][..length];
        payload.fill((n % 251) as u8);
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&n.to_le_bytes());
        header[4..].copy_from_slice(&(length as u32).to_le_bytes());
        let (mut sent, mut lent) = (0, None);
        let started = std::time::Instant::now();
        while sent < 8 + length {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sender stuck at frame {n}: {}",
                sender.flow_control_state()
            );
            let parts: [&[u8]; 2] = if sent < 8 { [&header[sent..], payload] } else { [&payload[sent - 8..], &[]] };
            let (count, token) = sender.try_send_or_lend(&parts).unwrap();
            sent += count;
            lent = lent.or(token);
            sender.poll_into(&mut []).unwrap();
        }
        // Payloads of 16 KiB and more were lent (read by the receiver's
        // adapter); those of 2 KiB and more that fit a message with their
        // header were gathered by the sender's, and so was the rest of a
        // larger one once it fits: tokens come back for both. Payloads
        // under 2 KiB were copied.
        if length >= 16 << 10 || (length >= 2048 && 8 + length <= base.message_bytes) {
            assert!(lent.is_some(), "frame {n} of {length} bytes was neither lent nor gathered");
        }
        if length < 2048 {
            assert!(lent.is_none(), "frame {n} of {length} bytes was not copied");
        }
        match lent {
            Some(token) => {
                expected_lent += if length >= 16 << 10 { length as u64 } else { 0 };
                lent_slots.insert(token, slot);
            }
            None => free_slots.push(slot),
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !lent_slots.is_empty() {
        assert!(std::time::Instant::now() < deadline, "{} lent payloads never released", lent_slots.len());
        sender.poll_into(&mut []).unwrap();
        while let Some(token) = sender.take_released() {
            lent_slots.remove(&token);
        }
    }
    all_released.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(receiver.join().unwrap(), expected_lent, "the receiver read every lent byte");
    assert_eq!(sender.lent_and_read_bytes().0, expected_lent);
    assert!(expected_lent > 0);
}

/// Receives `frames` frames as the engine does: headers copied, payloads
/// taken as landing into `buffer`'s slots in turn, each checked once the
/// stream landed past it (a slot is used again only then).
fn receive_landing(channel: &mut RdmaChannel, buffer: &mut [u8], frames: u32) {
    let mut landing = std::collections::VecDeque::new();
    let (mut taken, mut most_in_flight) = (0u64, 0);
    let check_landed = |landing: &mut std::collections::VecDeque<(u32, usize, usize, u64)>, landed, buffer: &[u8]| {
        while let Some(&(n, slot, length, end)) = landing.front().filter(|entry| entry.3 <= landed) {
            let payload = &buffer[slot * LEND_SLOT_BYTES..][..length];
            assert!(payload.iter().all(|&b| b == (n % 251) as u8), "payload of frame {n} (ends at {end})");
            landing.pop_front();
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for n in 0..frames {
        let mut header = [0u8; 8];
        read_exact(channel, &mut header);
        taken += 8;
        assert_eq!(u32::from_le_bytes(header[..4].try_into().unwrap()), n, "frame order");
        let length = u32::from_le_bytes(header[4..].try_into().unwrap()) as usize;
        assert_eq!(length, frame_payload_bytes(n));
        while landing.len() >= LANDING_SLOTS {
            assert!(std::time::Instant::now() < deadline, "stalled landing: {}", channel.flow_control_state());
            channel.poll_into(&mut []).unwrap();
            check_landed(&mut landing, channel.landed_through(), buffer);
        }
        let slot = n as usize % LANDING_SLOTS;
        let mut got = 0;
        while got < length {
            assert!(std::time::Instant::now() < deadline, "stalled: {}", channel.flow_control_state());
            got += channel.poll_into_landing(&mut buffer[slot * LEND_SLOT_BYTES + got..][..length - got]).unwrap();
        }
        taken += length as u64;
        landing.push_back((n, slot, length, taken));
        most_in_flight = most_in_flight.max(landing.iter().filter(|entry| entry.3 > channel.landed_through()).count());
        check_landed(&mut landing, channel.landed_through(), buffer);
    }
    while !landing.is_empty() {
        assert!(std::time::Instant::now() < deadline, "never landed: {}", channel.flow_control_state());
        channel.poll_into(&mut []).unwrap();
        check_landed(&mut landing, channel.landed_through(), buffer);
    }
    assert_eq!(channel.landed_through(), taken, "every byte taken landed");
    // Landed is known only at a poll, and none ran since the read of a
    // lent payload was posted: at least that one was still landing.
    assert!(most_in_flight >= 1, "no payload was taken as landing");
    eprintln!("landing reads in flight together: at most {most_in_flight}");
}

fn read_exact(channel: &mut RdmaChannel, into: &mut [u8]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut got = 0;
    while got < into.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "stalled after {got} of {} bytes: {}",
            into.len(),
            channel.flow_control_state()
        );
        got += channel.poll_into(&mut into[got..]).unwrap();
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut usage = unsafe { std::mem::zeroed::<libc::rusage>() };
    // SAFETY: getrusage fills the struct passed.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A channel waiting for a message that comes late sleeps on its
/// completion channel instead of spinning: the wait costs little CPU.
#[test]
#[ignore = "needs an RDMA device: runs in the soft-RoCE lab"]
fn an_idle_channel_sleeps_until_a_message_comes() {
    let config = ChannelConfig { message_bytes: 4096, window: 8, timeout: Duration::from_secs(20), lend: None };
    let mut listener = RdmaListener::bind(address(18_603), config).unwrap();
    let server = std::thread::spawn(move || {
        let mut channel = listener.accept().unwrap();
        std::thread::sleep(Duration::from_secs(3));
        channel.send(b"late").unwrap();
        channel.recv().unwrap()
    });
    let mut client = RdmaChannel::connect(address(18_603), config).unwrap();
    let cpu_before = thread_cpu();
    let waited = std::time::Instant::now();
    assert_eq!(client.recv().unwrap(), b"late");
    let (wall, cpu) = (waited.elapsed(), thread_cpu() - cpu_before);
    client.send(b"bye").unwrap();
    assert_eq!(server.join().unwrap(), b"bye");
    eprintln!("waited {wall:?} for the message using {cpu:?} of CPU");
    assert!(wall >= Duration::from_secs(2), "the message came late ({wall:?})");
    assert!(cpu < wall / 4, "the wait slept rather than spun: {cpu:?} of CPU in {wall:?}");
}
