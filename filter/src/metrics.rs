//! The filter's own counters, defined as proxy-wasm metrics: Envoy shows them on its
//! stats (`/stats`, `/stats/prometheus`) as `wasmcustom.knocker.<counter>` and, for a
//! request a rule took, also as `wasmcustom.knocker.rule.<rule>.<counter>`. The shipped
//! Envoy configurations turn `<rule>` into the tag `knocker_rule` (`stats_tags`), so
//! Prometheus sees `knocker_rule_submitted{knocker_rule="orders"}`.

/// What the filter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Requests handed to the control plane.
    Submitted,
    /// Answered with the control plane's receipt (a 2xx).
    Receipts,
    /// Refused by the control plane (a 4xx naming the field).
    Rejected,
    /// Answered `503`: the control plane could not be reached or could not store it.
    ControlPlaneUnavailable,
    /// Of those, the ones whose answer did not come within `timeout_ms`.
    Deadlines,
    /// A fallback rule took a failed request over (the client got the receipt).
    FallbackTaken,
    /// A failed request a fallback rule could not take (body over the buffer limit, or
    /// not whole when the upstream failed): the upstream's answer went through.
    FallbackOff,
    /// A failed request handed over, but the control plane did not take it: the
    /// upstream's answer went through.
    FallbackFailed,
    /// The worker's stream to the control plane was opened again after it closed.
    StreamReopened,
}

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::Submitted,
        Counter::Receipts,
        Counter::Rejected,
        Counter::ControlPlaneUnavailable,
        Counter::Deadlines,
        Counter::FallbackTaken,
        Counter::FallbackOff,
        Counter::FallbackFailed,
        Counter::StreamReopened,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Submitted => "submitted",
            Counter::Receipts => "receipts",
            Counter::Rejected => "rejected",
            Counter::ControlPlaneUnavailable => "control_plane_unavailable",
            Counter::Deadlines => "deadlines",
            Counter::FallbackTaken => "fallback_taken",
            Counter::FallbackOff => "fallback_off",
            Counter::FallbackFailed => "fallback_failed",
            Counter::StreamReopened => "stream_reopened",
        }
    }

    /// The counter the status of a control-plane answer falls under.
    pub fn for_status(status: u32) -> Counter {
        match status {
            200..=299 => Counter::Receipts,
            503 => Counter::ControlPlaneUnavailable,
            _ => Counter::Rejected,
        }
    }
}

/// The metric's name: `knocker.<counter>`, or `knocker.rule.<rule>.<counter>` with the
/// rule's name made safe for a stat name (anything but letters, digits, `-` and `_`
/// becomes `_`).
pub fn metric_name(counter: Counter, rule: Option<&str>) -> String {
    match rule {
        None => format!("knocker.{}", counter.name()),
        Some(rule) => {
            let safe: String = rule
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("knocker.rule.{safe}.{}", counter.name())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stat_names_with_the_rule_as_one_segment() {
        assert_eq!(metric_name(Counter::Submitted, None), "knocker.submitted");
        assert_eq!(
            metric_name(Counter::FallbackOff, Some("orders.v2 api")),
            "knocker.rule.orders_v2_api.fallback_off"
        );
        assert_eq!(Counter::for_status(202), Counter::Receipts);
        assert_eq!(Counter::for_status(503), Counter::ControlPlaneUnavailable);
        assert_eq!(Counter::for_status(400), Counter::Rejected);
    }
}
