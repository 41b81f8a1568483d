//! The blocking use of a channel, for handshakes and tests: whole
//! messages sent and received one at a time, waiting (polling briefly, then
//! asleep on the completion channel) for credits and messages.

use std::time::Instant;

use super::{RdmaChannel, Received, BUSY_POLL_BUDGET};

impl RdmaChannel {
    /// Sends one message of at most `message_bytes`, waiting for a credit.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), String> {
        if payload.len() > self.config.message_bytes {
            return Err(format!(
                "a message of {} bytes exceeds the channel's {}",
                payload.len(),
                self.config.message_bytes
            ));
        }
        let deadline = Instant::now() + self.config.timeout;
        while self.data_slot_start().is_none() {
            self.spill_received()?;
            if !self.poll()? && !self.wait_for_completion(deadline)? {
                return Err(format!("no credit from the peer for {:?} (it stopped reading)", self.config.timeout));
            }
        }
        self.post_message(payload, 0)?;
        self.messages_sent += 1;
        Ok(())
    }

    /// The next message (its payload), waiting for it.
    pub fn recv(&mut self) -> Result<Vec<u8>, String> {
        let deadline = Instant::now() + self.config.timeout;
        loop {
            if let Some(message) = self.spilled.pop_front() {
                return Ok(message);
            }
            if let Some(message) = self.take_first_message()? {
                return Ok(message);
            }
            if !self.poll()? && !self.wait_for_completion(deadline)? {
                return Err(format!("no message from the peer for {:?}", self.config.timeout));
            }
        }
    }

    /// Copies every received message out of its buffer (which is granted back).
    pub(super) fn spill_received(&mut self) -> Result<(), String> {
        while let Some(message) = self.take_first_message()? {
            self.spilled.push_back(message);
        }
        self.grant_if_owed()
    }

    /// What is left of the first received message, copied out; its buffer
    /// is posted again and granted back.
    pub(super) fn take_first_message(&mut self) -> Result<Option<Vec<u8>>, String> {
        let Some(&Received { slot, length, lent }) = self.received.front() else { return Ok(None) };
        if lent.is_some() {
            return Err("the peer lent a payload to a blocking receive: the channel is reset".to_owned());
        }
        let start = self.slot_start(slot) + self.taken_of_first;
        let message = self.memory[start..start + length - self.taken_of_first].to_vec();
        self.release_first()?;
        Ok(Some(message))
    }

    /// Waits for the next completion until `deadline`: polls for a short
    /// budget, then arms the completion queue and sleeps on the channel (a
    /// thread of its own; a core sleeps in its io_uring instead, through
    /// [`Self::arm`] and [`Self::completion_fd`]). False when the deadline
    /// passed.
    pub fn wait_for_completion(&mut self, deadline: Instant) -> Result<bool, String> {
        let busy_until = Instant::now() + BUSY_POLL_BUDGET;
        while Instant::now() < busy_until {
            if self.poll()? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        // A completion may have come between the last poll and arming.
        if !self.arm()? {
            return Ok(true);
        }
        let timeout_ms = deadline.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32;
        let mut pollfd = libc::pollfd { fd: self.completion_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::Interrupted => Ok(true),
                _ => Err(format!("waiting on the completion channel failed: {error}")),
            };
        }
        if ready == 0 {
            return Ok(Instant::now() < deadline);
        }
        self.notified();
        Ok(true)
    }
}
