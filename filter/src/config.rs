//! The plugin configuration: JSON text in the Envoy `configuration` field.

use serde::Deserialize;

use crate::rules::Rule;

/// Validated plugin configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The Envoy cluster of the control plane's gRPC port (HTTP/2).
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// How long the filter waits for the control plane before answering 503.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The `Retry-After` (seconds) sent with a 503 when the control plane is unavailable.
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u32,
    /// Capture and fallback rules for requests without `Knocker-Host` (see `rules`).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The shared secret the control plane expects on its gRPC door
    /// (`KNOCKER_GRPC_TOKEN`), sent as `authorization: Bearer …`; empty: none.
    #[serde(default)]
    pub grpc_token: String,
}

fn default_cluster() -> String {
    "knocker_control_plane".to_owned()
}
fn default_timeout_ms() -> u64 {
    2_000
}
fn default_retry_after_s() -> u32 {
    1
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            cluster: default_cluster(),
            timeout_ms: default_timeout_ms(),
            retry_after_s: default_retry_after_s(),
            rules: Vec::new(),
            grpc_token: String::new(),
        }
    }
}

/// Upper bound for `timeout_ms`: a Knocker submission is a commit, not a delivery.
pub const MAX_TIMEOUT_MS: u64 = 60_000;

impl PluginConfig {
    /// Parses and validates the configuration. Empty text means all defaults.
    /// The error names the offending field.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let mut json = serde_json::Deserializer::from_slice(text);
        let config: Self = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                format!("invalid knocker plugin configuration: {}", e.inner())
            } else {
                format!(
                    "invalid knocker plugin configuration: `{path}`: {}",
                    e.inner()
                )
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The gRPC call's metadata: the shared secret, when there is one.
    pub fn grpc_metadata(&self) -> Option<String> {
        (!self.grpc_token.is_empty()).then(|| format!("Bearer {}", self.grpc_token))
    }

    fn validate(&self) -> Result<(), String> {
        if self.cluster.trim().is_empty() {
            return Err("invalid knocker plugin configuration: `cluster` must not be empty".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "invalid knocker plugin configuration: `timeout_ms` must be 1..={MAX_TIMEOUT_MS}, got {}",
                self.timeout_ms
            ));
        }
        if self.grpc_token.bytes().any(|b| !(b.is_ascii_graphic())) {
            return Err(
                "invalid knocker plugin configuration: `grpc_token` must be printable ASCII without spaces"
                    .into(),
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(i)
                .map_err(|e| format!("invalid knocker plugin configuration: {e}"))?;
            if self.rules.iter().take(i).any(|r| r.name == rule.name) {
                return Err(format!(
                    "invalid knocker plugin configuration: `rules[{i}].name` `{}` is used twice",
                    rule.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_means_defaults() {
        assert_eq!(PluginConfig::parse(b"").ok(), Some(PluginConfig::default()));
        assert_eq!(
            PluginConfig::parse(b"  ").ok(),
            Some(PluginConfig::default())
        );
    }

    #[test]
    fn parses_fields() {
        let c = PluginConfig::parse(
            br#"{"cluster":"cp","timeout_ms":500,"retry_after_s":3,"grpc_token":"s3cret"}"#,
        );
        assert_eq!(
            c.ok(),
            Some(PluginConfig {
                cluster: "cp".into(),
                timeout_ms: 500,
                retry_after_s: 3,
                rules: vec![],
                grpc_token: "s3cret".into(),
            })
        );
        let e = PluginConfig::parse(br#"{"grpc_token":"a b"}"#).unwrap_err();
        assert!(e.contains("grpc_token"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = PluginConfig::parse(br#"{"clustr":"x"}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("clustr"), "{e}");
        let e = PluginConfig::parse(br#"{"timeout_ms":0}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("timeout_ms"), "{e}");
        let e = PluginConfig::parse(br#"{"timeout_ms":"x"}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("invalid type"), "{e}");
        let e = PluginConfig::parse(br#"{"cluster":" "}"#)
            .err()
            .unwrap_or_default();
        assert!(e.contains("cluster"), "{e}");
        assert!(PluginConfig::parse(b"{").is_err());
    }

    #[test]
    fn rules_are_validated_with_their_index() {
        let ok = PluginConfig::parse(
            br#"{"rules":[{"name":"a","mode":"capture","delivery":{"target":"http://t"}},
                          {"name":"b","mode":"fallback","delivery":{"target":"http://u"}}]}"#,
        );
        assert_eq!(ok.map(|c| c.rules.len()), Ok(2));
        let e = PluginConfig::parse(
            br#"{"rules":[{"name":"a","mode":"capture","delivery":{"target":"http://t"}},
                          {"name":"a","mode":"capture","delivery":{"target":"http://t"}}]}"#,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("rules[1].name"), "{e}");
        let e = PluginConfig::parse(
            br#"{"rules":[{"name":"a","mode":"mirror","delivery":{"target":"http://t"}}]}"#,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("mirror"), "{e}");
        let e = PluginConfig::parse(
            br#"{"rules":[{"name":"a","mode":"capture","delivery":{"target":"http://t","retry":1}}]}"#,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("retry"), "{e}");
    }
}
