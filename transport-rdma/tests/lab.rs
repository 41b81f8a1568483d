//! The RDMA channel on real verbs: these run in the soft-RoCE lab guest
//! (`.ci/run` starts it; `rxe0` on 10.77.0.1), hence `#[ignore]` on hosts
//! without RDMA: `cargo test -p tandem-transport-rdma -- --ignored` there.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tandem_transport_rdma::{ChannelConfig, RdmaChannel, RdmaListener};

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
    let config = ChannelConfig { message_bytes: 16 << 10, window: 16, timeout: Duration::from_secs(20) };
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
    let config = ChannelConfig { message_bytes: 4096, window: 4, timeout: Duration::from_secs(5) };
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
        channel.credit_messages_sent
    };
    let server = std::thread::spawn(move || exchange(listener.accept().unwrap()));
    let client = RdmaChannel::connect(address(18_602), config).unwrap();
    let client_credit_messages = exchange(client);
    let server_credit_messages = server.join().unwrap();
    eprintln!("credit-only messages: client {client_credit_messages}, server {server_credit_messages}");
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
    let config = ChannelConfig { message_bytes: 4096, window: 8, timeout: Duration::from_secs(20) };
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
