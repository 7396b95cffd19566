//! The retry schedule, as data: pure functions, tested without sleeping.

/// Seconds to wait after failed attempt `k` (1-based, `k` ≤ retries):
/// `min(cap, factor × 2^(k−1) + jitter)`, jitter uniform in `[0, 1)`. A `Retry-After`
/// from a 429/503 wins when it is longer, within the same cap.
pub fn delay_s(k: u32, factor: f64, cap: f64, jitter: f64, retry_after_s: Option<f64>) -> f64 {
    let exponent = i32::try_from(k.saturating_sub(1))
        .unwrap_or(i32::MAX)
        .min(1023);
    let base = (factor * 2f64.powi(exponent) + jitter).min(cap);
    match retry_after_s {
        Some(ra) if ra > base => ra.min(cap),
        _ => base,
    }
}

/// Seconds to wait after a failed attempt whose delay an explicit schedule gives: the
/// step as configured (the schedule is the operator's choice, not capped); a longer
/// `Retry-After` wins, within `cap`.
pub fn scheduled_s(step: f64, cap: f64, retry_after_s: Option<f64>) -> f64 {
    match retry_after_s {
        Some(ra) if ra > step => ra.min(cap).max(step),
        _ => step,
    }
}

/// A `Retry-After` value: delta-seconds or an HTTP date, as seconds from `now`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<f64> {
    let v = value.trim();
    if let Ok(seconds) = v.parse::<u64>() {
        return Some(seconds as f64);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).map_or(0.0, |d| d.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn exponential_with_jitter_and_cap() {
        assert_eq!(delay_s(1, 0.5, 600.0, 0.0, None), 0.5);
        assert_eq!(delay_s(2, 0.5, 600.0, 0.0, None), 1.0);
        assert_eq!(delay_s(3, 0.5, 600.0, 0.25, None), 2.25);
        assert_eq!(delay_s(11, 1.0, 600.0, 0.0, None), 600.0);
        assert_eq!(delay_s(1, 0.0, 600.0, 0.9, None), 0.9);
        assert_eq!(delay_s(4000, 600.0, 600.0, 0.5, None), 600.0);
        assert_eq!(
            delay_s(1, 0.0, 0.0, 0.9, None),
            0.0,
            "the cap bounds the jitter too"
        );
    }

    #[test]
    fn retry_after_wins_when_longer_within_the_cap() {
        assert_eq!(delay_s(1, 0.5, 600.0, 0.0, Some(5.0)), 5.0);
        assert_eq!(delay_s(3, 4.0, 600.0, 0.0, Some(5.0)), 16.0);
        assert_eq!(delay_s(1, 0.5, 10.0, 0.0, Some(3600.0)), 10.0);
    }

    #[test]
    fn a_scheduled_step_is_kept_and_a_longer_retry_after_wins_within_the_cap() {
        assert_eq!(scheduled_s(1800.0, 60.0, None), 1800.0);
        assert_eq!(scheduled_s(5.0, 60.0, Some(30.0)), 30.0);
        assert_eq!(scheduled_s(5.0, 60.0, Some(3600.0)), 60.0);
        assert_eq!(scheduled_s(300.0, 60.0, Some(3600.0)), 300.0);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(7.0));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(30.0));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(0.0));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
