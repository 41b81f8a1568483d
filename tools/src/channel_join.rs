//! Sessions on a destination whose data channels are still connecting.
//!
//! A source opens channel 0 with Create or Resume; the answer names a session
//! token, and the source opens channels 1..N with Join and that token. The
//! session goes to the group's core once every channel is there, in channel
//! order. A session that does not complete within the handshake timeout, or
//! that a newer Create or Resume of the same group replaces, is dropped with
//! its connections (the source sees them close and reconnects).

use std::collections::HashMap;

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_crypto::{SessionKeys, Side};
use tandem_engine::runtime::peer_conn::PeerChannel;
use tandem_engine::runtime::wire::Wire;

struct Joining {
    token: u64,
    partnership_id: String,
    streams: Vec<Option<Wire>>,
    opened: Instant,
    /// The keys of channel 0's TLS session (none without TLS): data channels
    /// prove they belong to it, and their frames are sealed with them.
    keys: Option<SessionKeys>,
}

/// The joining sessions of a destination node, by group.
pub struct JoiningSessions {
    by_group: Mutex<HashMap<String, Joining>>,
    timeout: Duration,
}

impl JoiningSessions {
    #[must_use]
    pub fn new(timeout: Duration) -> Self {
        Self { by_group: Mutex::default(), timeout }
    }

    /// Opens a session of `channels` channels for `group`; returns its token.
    pub fn open(&self, group: &str, partnership_id: &str, channels: u32, keys: Option<SessionKeys>) -> u64 {
        let token = rand::random::<u64>() | 1;
        let joining = Joining {
            token,
            partnership_id: partnership_id.to_owned(),
            streams: (0..channels).map(|_| None).collect(),
            opened: Instant::now(),
            keys,
        };
        let mut by_group = self.lock();
        self.drop_expired(&mut by_group);
        by_group.insert(group.to_owned(), joining);
        token
    }

    /// Adds channel `channel` of session `token`; returns every channel,
    /// sealed for the destination, once the session is complete. `proof` is
    /// a data channel's join proof (`None` for channel 0, the connection
    /// that opened the session); a session opened over TLS admits only a
    /// data channel whose proof is bound to that TLS session.
    pub fn add(
        &self,
        group: &str,
        partnership_id: &str,
        token: u64,
        channel: u32,
        stream: Wire,
        proof: Option<&str>,
    ) -> Result<Option<Vec<PeerChannel>>, String> {
        let mut by_group = self.lock();
        Self::check_locked(&mut by_group, self.timeout, (group, partnership_id, token, channel), proof)?;
        let joining = by_group.get_mut(group).expect("checked");
        let slot = joining.streams.get_mut(channel as usize).expect("checked");
        *slot = Some(stream);
        if joining.streams.iter().any(Option::is_none) {
            return Ok(None);
        }
        let joining = by_group.remove(group).expect("present");
        let streams = joining.streams.into_iter().map(|s| s.expect("complete")).collect();
        Ok(Some(crate::secure_channel::sealed_channels(streams, joining.keys.as_ref(), Side::Destination)))
    }

    /// Whether channel `channel` may join session `token` now (see [`Self::add`]).
    pub fn check(
        &self,
        group: &str,
        partnership_id: &str,
        token: u64,
        channel: u32,
        proof: Option<&str>,
    ) -> Result<(), String> {
        let mut by_group = self.lock();
        Self::check_locked(&mut by_group, self.timeout, (group, partnership_id, token, channel), proof)
    }

    fn check_locked(
        by_group: &mut HashMap<String, Joining>,
        timeout: Duration,
        (group, partnership_id, token, channel): (&str, &str, u64, u32),
        proof: Option<&str>,
    ) -> Result<(), String> {
        let Some(joining) = by_group.get_mut(group) else {
            return Err(format!("no session of group {group} is waiting for data channels; the source reconnects"));
        };
        if joining.opened.elapsed() > timeout {
            by_group.remove(group);
            return Err(format!(
                "the session of group {group} waited more than {} s for its data channels; the source reconnects",
                timeout.as_secs()
            ));
        }
        if joining.token != token || joining.partnership_id != partnership_id {
            return Err(format!("session {token:#x} is not the open session of group {group}; the source reconnects"));
        }
        if let (Some(keys), Some(proof)) = (&joining.keys, proof) {
            if !keys.check_join_proof(token, channel, proof) {
                return Err(format!(
                    "data channel {channel} of group {group} carries no valid proof of the session's TLS handshake; refused"
                ));
            }
        }
        let count = joining.streams.len();
        match joining.streams.get(channel as usize) {
            None => Err(format!("channel {channel} is outside the session's {count} channel(s)")),
            Some(Some(_)) => Err(format!("channel {channel} of the session already joined")),
            Some(None) => Ok(()),
        }
    }

    /// Sessions whose channels never all came close their connections.
    fn drop_expired(&self, by_group: &mut HashMap<String, Joining>) {
        by_group.retain(|_, joining| joining.opened.elapsed() <= self.timeout);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Joining>> {
        self.by_group.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    fn stream() -> Wire {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Wire::Tcp(TcpStream::connect(listener.local_addr().unwrap()).unwrap())
    }

    #[test]
    fn a_session_completes_with_every_channel_in_order() {
        let sessions = JoiningSessions::new(Duration::from_secs(15));
        let token = sessions.open("rg02", "ab", 3, None);
        let (s0, s1, s2) = (stream(), stream(), stream());
        let local = [s0.describe(), s1.describe(), s2.describe()];
        assert!(sessions.add("rg02", "ab", token, 2, s2, None).unwrap().is_none());
        assert!(sessions.add("rg02", "ab", token, 0, s0, None).unwrap().is_none());
        let all = sessions.add("rg02", "ab", token, 1, s1, None).unwrap().expect("complete");
        let got: Vec<_> = all.iter().map(|c| c.wire.describe()).collect();
        assert_eq!(got, local, "channels come back in channel order");
        let late = sessions.add("rg02", "ab", token, 1, stream(), None).unwrap_err();
        assert!(late.contains("no session of group rg02"), "{late}");
    }

    #[test]
    fn wrong_joins_are_refused_with_the_reason() {
        let sessions = JoiningSessions::new(Duration::from_secs(15));
        let token = sessions.open("rg02", "ab", 2, None);
        let wrong_token = sessions.add("rg02", "ab", token ^ 2, 1, stream(), None).unwrap_err();
        assert!(wrong_token.contains("is not the open session"), "{wrong_token}");
        let wrong_partnership = sessions.add("rg02", "cd", token, 1, stream(), None).unwrap_err();
        assert!(wrong_partnership.contains("is not the open session"), "{wrong_partnership}");
        let outside = sessions.add("rg02", "ab", token, 2, stream(), None).unwrap_err();
        assert!(outside.contains("outside the session's 2 channel(s)"), "{outside}");
        assert!(sessions.add("rg02", "ab", token, 1, stream(), None).unwrap().is_none());
        let twice = sessions.add("rg02", "ab", token, 1, stream(), None).unwrap_err();
        assert!(twice.contains("already joined"), "{twice}");
        // A newer session replaces the older one, whose token no longer joins.
        let newer = sessions.open("rg02", "ab", 2, None);
        assert!(sessions.add("rg02", "ab", token, 0, stream(), None).is_err());
        assert!(sessions.add("rg02", "ab", newer, 0, stream(), None).unwrap().is_none());
    }

    #[test]
    fn a_session_that_waits_too_long_is_dropped() {
        let sessions = JoiningSessions::new(Duration::ZERO);
        let token = sessions.open("rg02", "ab", 2, None);
        std::thread::sleep(Duration::from_millis(5));
        let expired = sessions.add("rg02", "ab", token, 1, stream(), None).unwrap_err();
        assert!(expired.contains("waited more than 0 s"), "{expired}");
        // Opening another group's session drops expired ones of every group.
        let _ = sessions.open("rg03", "cd", 2, None);
        std::thread::sleep(Duration::from_millis(5));
        let _ = sessions.open("rg04", "ef", 2, None);
        assert_eq!(sessions.lock().len(), 1, "only the newest session is left");
    }
}
