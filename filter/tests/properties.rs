//! Plugin configurations as anyone might write them: no input panics the parser, and
//! every refusal names a field.

use knocker_filter::config::PluginConfig;
use proptest::prelude::*;

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| format!("{f:e}")),
        any::<i64>().prop_map(|i| i.to_string()),
        Just("1e300".to_owned()),
        Just("-1".to_owned()),
        Just("0".to_owned()),
        Just("18446744073709551616".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_parse_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = PluginConfig::parse(&bytes);
    }

    #[test]
    fn numbers_anywhere_in_a_rule_are_range_checked_by_name(
        timeout_ms in number(), max_age in number(), backoff in number(),
        max_backoff in number(), timeout_s in number(), retries in number(),
    ) {
        let text = format!(
            r#"{{"timeout_ms":{timeout_ms},"rules":[{{"name":"r","match":{{"path_prefix":"/"}},"mode":"capture",
               "delivery":{{"target":"http://t","max_age_s":{max_age},"backoff_factor":{backoff},
               "max_backoff_s":{max_backoff},"timeout_s":{timeout_s},"retries":{retries}}}}}]}}"#
        );
        match PluginConfig::parse(text.as_bytes()) {
            Ok(config) => {
                let Some(d) = config.rules.first().and_then(|r| r.delivery.as_ref()) else {
                    return Err(TestCaseError::fail("a capture rule without its delivery"));
                };
                prop_assert!(d.timeout_s > 0.0 && d.timeout_s <= 3600.0);
                prop_assert!(d.max_age_s <= 315_360_000);
                prop_assert!(d.backoff_factor.is_finite() && d.max_backoff_s.is_finite());
            }
            Err(e) => {
                let named = ["timeout_ms", "max_age_s", "backoff_factor", "max_backoff_s", "timeout_s", "retries", "delivery"]
                    .iter()
                    .any(|f| e.contains(f));
                prop_assert!(named, "{}", e);
            }
        }
    }
}
