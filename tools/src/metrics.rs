//! Prometheus text exposition (format 0.0.4) on `metrics_listen`: every
//! group's and partnership's numbers from the same status the CLI shows,
//! rendered at each scrape. `tandem_` prefix, `_total` counters, base units
//! (bytes, seconds), the write latency as a histogram with real buckets.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::runtime::status::{GroupStatus, PartnershipStatus};

use crate::daemon::Daemon;

/// Every source state, for the state gauges (one is 1, the others 0).
const SOURCE_STATES: [&str; 7] = [
    "InitialBlockCopy",
    "BitmapCatchUp",
    "Recovering",
    "ContinuouslyReplicating",
    "WaitingForDestination",
    "PeerPromoted",
    "SplitBrain",
];
const DESTINATION_STATES: [&str; 2] = ["Connected", "WaitingForSource"];

struct Exposition {
    text: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP tandem_{name} {help}\n# TYPE tandem_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
        let _ = writeln!(self.text, "tandem_{name}{{{}}} {value}", labels.join(","));
    }
}

/// Label values escaped as the text format asks.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The exposition of `groups`.
#[must_use]
pub fn render(groups: &[GroupStatus]) -> String {
    let mut out = Exposition { text: String::new() };
    group_families(&mut out, groups);
    latency_histogram(&mut out, groups);
    let partnerships: Vec<(&GroupStatus, &PartnershipStatus)> =
        groups.iter().filter_map(|g| g.partnership.as_ref().map(|p| (g, p))).collect();
    partnership_families(&mut out, &partnerships);
    out.text
}

fn group_families(out: &mut Exposition, groups: &[GroupStatus]) {
    type Field = fn(&GroupStatus) -> u64;
    let families: [(&str, &str, &str, Field); 10] = [
        ("writes_total", "counter", "Writes completed (client and replicated).", |g| g.writes_completed),
        ("write_bytes_total", "counter", "Bytes written by clients and replication.", |g| g.bytes_written),
        ("reads_total", "counter", "Reads completed.", |g| g.reads_completed),
        ("read_bytes_total", "counter", "Bytes read by clients.", |g| g.bytes_read),
        ("checkpoints_total", "counter", "Checkpoints completed.", |g| g.checkpoints),
        ("writes_waiting_for_log_space", "gauge", "Writes waiting for log space now.", |g| {
            g.writes_waiting_for_log_space
        }),
        ("log_size_bytes", "gauge", "Usable bytes of the log ring.", |g| g.log_size_bytes),
        ("log_used_bytes", "gauge", "Bytes of the log ring in use.", |g| g.log_used_bytes),
        ("current_lsn", "gauge", "Last LSN taken by the group's log.", |g| g.current_lsn),
        ("client_connections", "gauge", "Client connections to the group's volumes.", |g| g.connections as u64),
    ];
    for (name, kind, help, field) in families {
        out.family(&format!("group_{name}"), kind, help);
        for group in groups {
            out.sample(&format!("group_{name}"), &[("group", &group.name)], field(group));
        }
    }
    out.family("group_online", "gauge", "1 when the group serves IO, 0 when it failed or is unavailable.");
    for group in groups {
        let online = u8::from(group.state == "Online");
        out.sample("group_online", &[("group", &group.name), ("role", &group.role)], online);
    }
}

fn latency_histogram(out: &mut Exposition, groups: &[GroupStatus]) {
    let name = "group_write_latency_seconds";
    out.family(name, "histogram", "Client write latency, from the request to its answer.");
    for group in groups {
        let labels = |le: String| [("group", group.name.clone()), ("le", le)];
        let mut count = 0;
        for &(bound_us, cumulative) in &group.write_latency_us_buckets {
            let le = if bound_us == u64::MAX { "+Inf".to_owned() } else { format!("{}", bound_us as f64 / 1e6) };
            let labels = labels(le);
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            out.sample(&format!("{name}_bucket"), &labels, cumulative);
            count = cumulative;
        }
        let sum_seconds = group.write_latency_us_avg * count as f64 / 1e6;
        out.sample(&format!("{name}_sum"), &[("group", &group.name)], sum_seconds);
        out.sample(&format!("{name}_count"), &[("group", &group.name)], count);
    }
}

fn partnership_families(out: &mut Exposition, partnerships: &[(&GroupStatus, &PartnershipStatus)]) {
    type Field = fn(&PartnershipStatus) -> f64;
    let families: [(&str, &str, &str, Field); 11] = [
        ("sent_bytes_total", "counter", "Bytes sent to the peer.", |p| p.bytes_sent as f64),
        ("received_bytes_total", "counter", "Bytes received from the peer.", |p| p.bytes_received as f64),
        ("rpo_seconds", "gauge", "Source: age of the oldest write the destination lacks.", |p| p.rpo_ms as f64 / 1e3),
        ("behind_bytes", "gauge", "Source: log bytes the destination lacks.", |p| p.bytes_behind as f64),
        ("copy_remaining_bytes", "gauge", "Source: initial copy bytes not yet acknowledged.", |p| {
            p.copy_remaining_bytes as f64
        }),
        (
            "ack_round_trip_seconds",
            "gauge",
            "Source: average time from shipping a record to its durable acknowledgement.",
            |p| p.ack_round_trip_us_avg / 1e6,
        ),
        ("records_read_back_total", "counter", "Source: records shipped by reading them back from the log.", |p| {
            p.records_read_back as f64
        }),
        ("destination_durable_lsn", "gauge", "Last LSN durable on the destination.", |p| {
            p.destination_durable_lsn as f64
        }),
        ("channels_connected", "gauge", "Data channels connected now.", |p| f64::from(p.channels_connected)),
        ("bitmap_dirty_bytes", "gauge", "Source: bytes the dirty-region bitmap marks for catch-up.", |p| {
            p.bitmap_dirty_bytes as f64
        }),
        ("frames_rejected_total", "counter", "Frames that failed authentication (each reset its session).", |p| {
            p.frames_rejected as f64
        }),
    ];
    for (name, kind, help, field) in families {
        out.family(&format!("partnership_{name}"), kind, help);
        for (group, partnership) in partnerships {
            let labels = [("group", group.name.as_str()), ("role", group.role.as_str())];
            out.sample(&format!("partnership_{name}"), &labels, field(partnership));
        }
    }
    out.family("partnership_state", "gauge", "1 for the partnership's current state, 0 for the others.");
    for (group, partnership) in partnerships {
        let states: &[&str] = if group.role == "source" { &SOURCE_STATES } else { &DESTINATION_STATES };
        for state in states {
            let labels = [("group", group.name.as_str()), ("role", group.role.as_str()), ("state", state)];
            out.sample("partnership_state", &labels, u8::from(partnership.state == *state));
        }
    }
}

/// Answers scrapes: `GET /metrics` gets the exposition, anything else 404.
pub fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if let Err(e) = answer(&daemon, stream) {
            tracing::debug!(error = %e, "metrics scrape failed");
        }
    }
}

fn answer(daemon: &Daemon, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    // The request line and headers end with an empty line; no body is read.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_owned();
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render(&daemon.status()))
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "tandemd serves GET /metrics here\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> GroupStatus {
        GroupStatus {
            name: name.to_owned(),
            state: "Online".to_owned(),
            role: "source".to_owned(),
            writes_completed: 7,
            write_latency_us_avg: 150.0,
            write_latency_us_buckets: vec![(100, 2), (200, 6), (u64::MAX, 7)],
            partnership: Some(PartnershipStatus {
                state: "Recovering".to_owned(),
                rpo_ms: 1500,
                ..PartnershipStatus::default()
            }),
            ..GroupStatus::default()
        }
    }

    /// The Grafana dashboard under contrib/ queries only series tandemd exposes.
    #[test]
    fn the_dashboard_queries_only_exposed_series() {
        let dashboard = include_str!("../../contrib/grafana/tandem-dashboard.json");
        let text = render(&[group("rg01")]);
        let mut names = 0;
        for (at, _) in dashboard.match_indices("tandem_") {
            let name: String = dashboard[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(text.contains(&format!("{name}{{")), "the dashboard queries {name}, which tandemd does not expose");
            names += 1;
        }
        assert!(names >= 10, "the dashboard queries the exposition ({names} series)");
    }

    #[test]
    fn the_exposition_has_families_histograms_and_state_gauges() {
        let text = render(&[group("rg\"01")]);
        assert!(text
            .contains("# TYPE tandem_group_writes_total counter\ntandem_group_writes_total{group=\"rg\\\"01\"} 7\n"));
        assert!(text.contains("tandem_group_write_latency_seconds_bucket{group=\"rg\\\"01\",le=\"0.0001\"} 2\n"));
        assert!(text.contains("tandem_group_write_latency_seconds_bucket{group=\"rg\\\"01\",le=\"+Inf\"} 7\n"));
        assert!(text.contains("tandem_group_write_latency_seconds_count{group=\"rg\\\"01\"} 7\n"));
        assert!(text.contains("tandem_group_write_latency_seconds_sum{group=\"rg\\\"01\"} 0.00105\n"));
        assert!(text.contains("tandem_partnership_rpo_seconds{group=\"rg\\\"01\",role=\"source\"} 1.5\n"));
        assert!(text.contains("tandem_partnership_state{group=\"rg\\\"01\",role=\"source\",state=\"Recovering\"} 1\n"));
        assert!(text.contains("state=\"ContinuouslyReplicating\"} 0\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            assert!(series.starts_with("tandem_") && series.ends_with('}'), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
