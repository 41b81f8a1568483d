//! rdma_cm's side of a channel: the listener, the wait for a connection
//! event, and what rdma_cm says of a channel once it runs.
//!
//! A connected channel learns from rdma_cm that its peer disconnected or
//! that its device is being removed (`rdma link delete`, a driver unload,
//! a hot-unplugged adapter). The kernel's removal then waits until every
//! queue pair, region and rdma_cm id of the device is destroyed, so a
//! channel must end at once when it hears of it: it reports the event as
//! an error at its next poll and its owner drops it. The events of accepted
//! channels come to the listener's event channel (its accept loop passes
//! them on); a connecting channel reads its own.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sideway::rdmacm::communication_manager::{ConnectionParameter, EventChannel, EventType, Identifier, PortSpace};

use crate::channel::RdmaChannel;
use crate::ChannelConfig;

const ALARM_DISCONNECTED: u8 = 1;
const ALARM_DEVICE_REMOVED: u8 = 2;

/// What rdma_cm said of a running channel: nothing, a disconnect, or the
/// removal of its device. Kept as the channel's rdma_cm id's context, so
/// whoever reads the event can raise it.
#[derive(Clone, Default)]
pub(crate) struct Alarm(Arc<AtomicU8>);

impl Alarm {
    fn raise(&self, kind: &EventType) {
        let level = match kind {
            EventType::DeviceRemoval => ALARM_DEVICE_REMOVED,
            EventType::Disconnected => ALARM_DISCONNECTED,
            _ => return,
        };
        self.0.fetch_max(level, Ordering::Release);
    }

    /// The channel's error when rdma_cm ended it.
    pub(crate) fn check(&self) -> Result<(), String> {
        match self.0.load(Ordering::Acquire) {
            0 => Ok(()),
            ALARM_DISCONNECTED => Err("the peer disconnected the RDMA queue pair".to_owned()),
            _ => {
                Err("the RDMA device is being removed: the channel is closed so that the removal can finish".to_owned())
            }
        }
    }
}

/// Raises the alarm of the channel that `id` belongs to, if any.
fn raise_for(id: Option<&Arc<Identifier>>, kind: &EventType) {
    if let Some(alarm) = id.and_then(|id| id.get_context::<Alarm>()) {
        alarm.raise(kind);
    }
}

/// Takes every pending event of a non-blocking event channel and raises
/// the alarms they concern.
pub(crate) fn drain_events(events: &Arc<EventChannel>) {
    while let Ok(event) = events.get_cm_event() {
        let (kind, id) = (event.event_type(), event.cm_id());
        let _ = event.ack();
        raise_for(id.as_ref(), &kind);
    }
}

/// Waits (at most `timeout`) for the next connection event of `wanted` on
/// `events`; any other event that means failure ends the wait with its name.
pub(crate) fn wait_event(
    events: &Arc<EventChannel>,
    wanted: EventType,
    timeout: Duration,
) -> Result<Option<Arc<Identifier>>, String> {
    let deadline = Instant::now() + timeout;
    loop {
        // The kernel may never answer (a peer whose port went down): the
        // wait is bounded by polling the channel's descriptor first.
        let left_ms = deadline.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32;
        let mut pollfd = libc::pollfd { fd: events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, left_ms) };
        if ready == 0 {
            return Err(format!("rdma_cm: no {wanted:?} within {timeout:?}"));
        }
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("rdma_cm: waiting for {wanted:?} failed: {error}"));
        }
        let event = events.get_cm_event().map_err(|e| format!("rdma_cm: {e}"))?;
        let (kind, status, id) = (event.event_type(), event.status(), event.cm_id());
        let _ = event.ack();
        if kind == wanted {
            return Ok(id);
        }
        if is_failure(&kind) {
            return Err(format!("rdma_cm: {kind:?} (status {status}) while waiting for {wanted:?}"));
        }
    }
}

fn is_failure(kind: &EventType) -> bool {
    matches!(
        kind,
        EventType::AddressError
            | EventType::RouteError
            | EventType::ConnectError
            | EventType::Unreachable
            | EventType::Rejected
            | EventType::Disconnected
            | EventType::DeviceRemoval
    )
}

/// Opens a channel to a listener at `address`.
pub(crate) fn connect(address: SocketAddr, config: ChannelConfig) -> Result<RdmaChannel, String> {
    let events = EventChannel::new().map_err(|e| format!("rdma_cm event channel: {e}"))?;
    events.set_nonblocking(true).map_err(|e| format!("rdma_cm event channel: {e}"))?;
    let id = events.create_id(PortSpace::Tcp).map_err(|e| format!("rdma_cm id: {e}"))?;
    id.resolve_addr(None, address, config.timeout)
        .map_err(|e| format!("cannot resolve {address} to an RDMA device: {e}"))?;
    wait_event(&events, EventType::AddressResolved, config.timeout)?;
    id.resolve_route(config.timeout).map_err(|e| format!("cannot resolve a route to {address}: {e}"))?;
    wait_event(&events, EventType::RouteResolved, config.timeout)?;
    let mut channel = RdmaChannel::new(Arc::clone(&events), id, config)?;
    let mut param = ConnectionParameter::default();
    param.setup_qp_number(channel.qp_number());
    channel.id().connect(param).map_err(|e| format!("rdma_cm connect to {address}: {e}"))?;
    wait_event(&events, EventType::ConnectResponse, config.timeout)?;
    channel.make_ready()?;
    channel.post_all_receives()?;
    channel.id().establish().map_err(|e| format!("rdma_cm establish: {e}"))?;
    // From now on the channel reads its own events at its polls.
    channel.watch_own_events();
    Ok(channel)
}

/// Listens for RDMA channels on an address of an RDMA device.
pub struct RdmaListener {
    events: Arc<EventChannel>,
    id: Arc<Identifier>,
    config: ChannelConfig,
    /// Accepted, not yet established (their Established event is awaited).
    pending: Vec<(RdmaChannel, Instant)>,
    device_removed: bool,
}

impl RdmaListener {
    pub fn bind(address: SocketAddr, config: ChannelConfig) -> Result<Self, String> {
        config.check()?;
        let events = EventChannel::new().map_err(|e| format!("rdma_cm event channel: {e}"))?;
        let id = events.create_id(PortSpace::Tcp).map_err(|e| format!("rdma_cm id: {e}"))?;
        id.bind_addr(address).map_err(|e| format!("cannot bind RDMA listener to {address}: {e}"))?;
        id.listen(64).map_err(|e| format!("cannot listen for RDMA on {address}: {e}"))?;
        Ok(Self { events, id, config, pending: Vec::new(), device_removed: false })
    }

    /// True once the listener's device was removed: drop it (the removal
    /// waits for that) and bind again when a device is back.
    pub fn device_removed(&self) -> bool {
        self.device_removed
    }

    /// The next channel a peer opens. Meanwhile the events of channels
    /// accepted earlier go to their alarms.
    pub fn accept(&mut self) -> Result<RdmaChannel, String> {
        loop {
            let event = self.events.get_cm_event().map_err(|e| format!("rdma_cm: {e}"))?;
            let (kind, id) = (event.event_type(), event.cm_id());
            let _ = event.ack();
            let Some(id) = id else { continue };
            if Arc::ptr_eq(&id, &self.id) {
                if kind == EventType::DeviceRemoval {
                    self.device_removed = true;
                    self.pending.clear();
                    return Err("the RDMA device of the listener is being removed".to_owned());
                }
                continue;
            }
            match kind {
                EventType::ConnectRequest => self.answer(id)?,
                EventType::Established => {
                    if let Some(channel) = self.take_pending(&id) {
                        return Ok(channel);
                    }
                }
                _ if is_failure(&kind) => {
                    // A channel that fails before it is established is dropped.
                    self.take_pending(&id);
                    raise_for(Some(&id), &kind);
                }
                _ => {}
            }
        }
    }

    /// Answers a connect request: a channel with its receives posted,
    /// pending until rdma_cm says it is established.
    fn answer(&mut self, id: Arc<Identifier>) -> Result<(), String> {
        let mut channel = RdmaChannel::new(Arc::clone(&self.events), id, self.config)?;
        channel.make_ready()?;
        channel.post_all_receives()?;
        let mut param = ConnectionParameter::default();
        param.setup_qp_number(channel.qp_number());
        channel.id().accept(param).map_err(|e| format!("rdma_cm accept: {e}"))?;
        // A peer that never completes its connection is forgotten.
        let timeout = self.config.timeout;
        self.pending.retain(|(_, since)| since.elapsed() < timeout);
        self.pending.push((channel, Instant::now()));
        Ok(())
    }

    fn take_pending(&mut self, id: &Arc<Identifier>) -> Option<RdmaChannel> {
        let at = self.pending.iter().position(|(channel, _)| Arc::ptr_eq(channel.id(), id))?;
        Some(self.pending.swap_remove(at).0)
    }
}

#[cfg(test)]
mod tests {
    use sideway::rdmacm::communication_manager::EventType;

    use super::Alarm;

    /// A channel's alarm names what rdma_cm said; a removal is not hidden
    /// by a disconnect that follows it, and events of other kinds leave it.
    #[test]
    fn an_alarm_keeps_the_gravest_event() {
        let alarm = Alarm::default();
        alarm.raise(&EventType::Established);
        alarm.check().unwrap();
        let seen_by_the_channel = alarm.clone();
        alarm.raise(&EventType::Disconnected);
        assert!(seen_by_the_channel.check().unwrap_err().contains("disconnected"));
        alarm.raise(&EventType::DeviceRemoval);
        alarm.raise(&EventType::Disconnected);
        let error = seen_by_the_channel.check().unwrap_err();
        assert!(error.contains("device is being removed"), "{error}");
    }
}
