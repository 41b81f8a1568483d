//! The daemon's event log: numbered events from the cores and the control
//! plane, kept in memory (the last 10,000), written to the daemon's log, and
//! served to `tandem events [--follow]`.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tandem_engine::runtime::events::EventKind;

const KEPT_EVENTS: usize = 10_000;

/// One event as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event of this daemon's life.
    pub seq: u64,
    /// UTC time, RFC 3339 with milliseconds.
    pub time: String,
    /// Stable id (docs/events.md).
    pub id: u32,
    pub severity: String,
    pub group: String,
    pub message: String,
    /// The event's fields.
    pub data: EventKind,
}

/// The log.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<(u64, VecDeque<Event>)>,
    arrived: Condvar,
}

impl EventLog {
    /// Records an event of `group`.
    pub fn record(&self, group: &str, kind: EventKind) {
        let message = kind.message();
        match kind.severity() {
            "error" => tracing::error!(group, id = kind.id(), "{message}"),
            "warning" => tracing::warn!(group, id = kind.id(), "{message}"),
            _ => tracing::info!(group, id = kind.id(), "{message}"),
        }
        let mut guard = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.0 += 1;
        let event = Event {
            seq: guard.0,
            time: rfc3339_now(),
            id: kind.id(),
            severity: kind.severity().to_owned(),
            group: group.to_owned(),
            message,
            data: kind,
        };
        if guard.1.len() == KEPT_EVENTS {
            guard.1.pop_front();
        }
        guard.1.push_back(event);
        self.arrived.notify_all();
    }

    /// Events after `since`, waiting up to `wait` for one when there is none.
    pub fn since(&self, since: u64, wait: Duration) -> Vec<Event> {
        let guard = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = self
            .arrived
            .wait_timeout_while(guard, wait, |(last, _)| *last <= since)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}

/// Now as `2026-11-22T01:02:03.456Z`.
fn rfc3339_now() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let (days, seconds) = ((now.as_secs() / 86_400) as i64, now.as_secs() % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_and_followed() {
        let log = EventLog::default();
        log.record("rg01", EventKind::GroupDeleted);
        log.record("rg01", EventKind::PeerLost { reason: "timeout".into() });
        let all = log.since(0, Duration::ZERO);
        assert_eq!(all.iter().map(|e| (e.seq, e.id)).collect::<Vec<_>>(), vec![(1, 1002), (2, 4001)]);
        assert_eq!(all[1].severity, "warning");
        assert!(log.since(2, Duration::from_millis(10)).is_empty(), "nothing new");
        let time = &all[0].time;
        assert_eq!(time.len(), 24, "{time}");
        assert!(time.starts_with("20") && time.ends_with('Z'), "{time}");
    }
}
