//! Inbound rate limits, one rule for every way in: a socket counts its data frames, the
//! REST routes that start runs count per user, both against `NETRA_RATE_LIMIT` per
//! `NETRA_RATE_WINDOW`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A fixed-window counter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateWindow {
    limit: u32,
    window: Duration,
    started: Instant,
    count: u32,
}

impl RateWindow {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        Self { limit, window, started: Instant::now(), count: 0 }
    }

    /// Counts one request; false once the window's limit is spent.
    pub(crate) fn allow(&mut self) -> bool {
        if self.started.elapsed() >= self.window {
            self.started = Instant::now();
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= self.limit
    }

    /// How long until the window opens again.
    pub(crate) fn retry_after(&self) -> Duration {
        self.window.saturating_sub(self.started.elapsed())
    }

    fn expired(&self) -> bool {
        self.started.elapsed() >= self.window
    }
}

/// One window per user. Windows that have run out are swept once the map grows, so its
/// size stays near the number of users active within one window.
#[derive(Debug)]
pub(crate) struct UserRates {
    limit: u32,
    window: Duration,
    users: Mutex<HashMap<String, RateWindow>>,
    /// The map's size after the last sweep; the next sweep waits until it doubles.
    swept_at: Mutex<usize>,
}

impl UserRates {
    pub(crate) fn new(limit: u32, window: Duration) -> Self {
        Self { limit, window, users: Mutex::default(), swept_at: Mutex::new(0) }
    }

    /// Counts one request of `user`; on refusal, how long until it may try again.
    pub(crate) fn allow(&self, user: &str) -> Result<(), Duration> {
        let mut users = self.users.lock().expect("rate lock is never held across a panic");
        let window = match users.get_mut(user) {
            Some(w) => w,
            None => {
                let mut swept_at = self.swept_at.lock().expect("rate lock is never held across a panic");
                if users.len() >= (*swept_at * 2).max(1024) {
                    users.retain(|_, w| !w.expired());
                    *swept_at = users.len();
                }
                users.entry(user.to_string()).or_insert_with(|| RateWindow::new(self.limit, self.window))
            }
        };
        if window.allow() { Ok(()) } else { Err(window.retry_after()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_window_refuses_past_its_limit_and_opens_again() {
        let rates = UserRates::new(2, Duration::from_secs(10));
        assert!(rates.allow("a").is_ok() && rates.allow("a").is_ok());
        let wait = rates.allow("a").expect_err("third in the window");
        assert_eq!(wait, Duration::from_secs(10));
        assert!(rates.allow("b").is_ok(), "users are counted apart");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(rates.allow("a").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_windows_are_swept_as_the_map_grows() {
        let rates = UserRates::new(1, Duration::from_secs(1));
        for i in 0..1024 {
            rates.allow(&format!("u{i}")).expect("first request");
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        rates.allow("late").expect("first request");
        assert_eq!(rates.users.lock().expect("lock").len(), 1, "only the live window is kept");
    }
}
