//! Thresholds: a monitor is down after `failure_threshold` consecutive failed checks and
//! up again after `success_threshold` consecutive good ones. Pure, so it is tested
//! without a clock or a network.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Up,
    Down,
}

/// What is stored per monitor, so that a restart neither re-alerts nor forgets a
/// resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub health: Health,
    /// Consecutive failed / good checks.
    pub failures: u32,
    pub successes: u32,
    /// Transitions so far: numbers each alert, so its notifications have stable ids.
    pub transitions: u64,
    /// When this monitor's state began (ms): with the transition number it names an
    /// alert uniquely, also across a monitor deleted and created again.
    pub since: u64,
}

impl Default for AlertState {
    fn default() -> Self {
        Self {
            health: Health::Up,
            failures: 0,
            successes: 0,
            transitions: 0,
            since: 0,
        }
    }
}

/// A change of health, numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub to: Health,
    pub number: u64,
}

impl AlertState {
    /// Takes one check's outcome; returns the transition it causes, if any.
    pub fn observe(
        &mut self,
        ok: bool,
        failure_threshold: u32,
        success_threshold: u32,
    ) -> Option<Transition> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.health == Health::Down && self.successes >= success_threshold {
                return Some(self.change(Health::Up));
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.health == Health::Up && self.failures >= failure_threshold {
                return Some(self.change(Health::Down));
            }
        }
        None
    }

    fn change(&mut self, to: Health) -> Transition {
        self.health = to;
        self.transitions += 1;
        Transition {
            to,
            number: self.transitions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_after_the_failure_threshold_and_up_after_the_success_threshold() {
        let mut s = AlertState::default();
        let run = |s: &mut AlertState, checks: &[bool]| -> Vec<Option<Health>> {
            checks
                .iter()
                .map(|ok| s.observe(*ok, 3, 2).map(|t| t.to))
                .collect()
        };
        // Two failures, a success: the count starts over.
        assert_eq!(run(&mut s, &[false, false, true]), [None, None, None]);
        assert_eq!(s.health, Health::Up);
        assert_eq!(
            run(&mut s, &[false, false, false, false]),
            [None, None, Some(Health::Down), None],
            "one alert, not one per failure"
        );
        assert_eq!(
            run(&mut s, &[true, false, true, true, true]),
            [None, None, None, Some(Health::Up), None]
        );
        assert_eq!(s.transitions, 2);
    }

    #[test]
    fn thresholds_of_one_flip_at_once() {
        let mut s = AlertState::default();
        assert_eq!(
            s.observe(false, 1, 1).map(|t| (t.to, t.number)),
            Some((Health::Down, 1))
        );
        assert_eq!(
            s.observe(true, 1, 1).map(|t| (t.to, t.number)),
            Some((Health::Up, 2))
        );
    }
}
