//! The optional configuration file (`KNOCKER_CONFIG`, TOML): broadcast groups,
//! monitors and their notifiers.
//!
//! ```toml
//! [groups.caches]                 # a static list of base URLs
//! members = ["http://10.0.0.1:6081", "http://10.0.0.2:6081"]
//! preserve_host = true            # members get the client's Host (cache invalidation)
//!
//! [groups.web]                    # every A and AAAA address of a DNS name
//! dns = "web.default.svc.cluster.local"
//! port = 8080
//! scheme = "http"
//! max_age_s = 3600                # how long a member that is down is waited for
//! ```
//!
//! Monitors and notifiers:
//!
//! ```toml
//! [notifiers.ops-mail]
//! email = { host = "smtp.example", tls = "starttls", username = "k", password_env = "SMTP_PASSWORD",
//!           from = "knocker@example", to = ["ops@example"] }
//! [notifiers.ops-hook]
//! webhook = "https://hooks.example/knocker"
//!
//! [monitors.api]
//! url = "https://api.example/health"
//! interval_s = 30
//! conditions = [{ status = [200] }, { json_pointer = "/db", equals = "up" }]
//! notify = ["ops-mail", "ops-hook"]
//! send_on_resolved = true
//! ```
//!
//! Signing secrets (`[signing]`, see `config::signing`) and target health and rate
//! limits (`[targets]`, see `config::targets`) live here too.
//!
//! Errors name the file and the field (`groups.web.port`, `monitors.api.notify[1]`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::signing::SigningConfig;
use super::targets::TargetsConfig;
use super::ConfigError;
use crate::broadcast::groups::GroupConfig;
use crate::monitor::MonitorConfig;
use crate::notify::NotifierConfig;
use crate::validate::Invalid;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
    #[serde(default)]
    pub monitors: BTreeMap<String, MonitorConfig>,
    #[serde(default)]
    pub notifiers: BTreeMap<String, NotifierConfig>,
    /// Where signing secrets are read from (`config::signing`).
    #[serde(default)]
    pub signing: SigningConfig,
    /// Target health and rate limits (`config::targets`).
    #[serde(default)]
    pub targets: TargetsConfig,
}

impl FileConfig {
    /// Reads and validates the file; the error names the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let at = |e: &dyn std::fmt::Display| {
            ConfigError(format!("KNOCKER_CONFIG {}: {e}", path.display()))
        };
        let text = std::fs::read_to_string(path).map_err(|e| at(&e))?;
        Self::parse(&text).map_err(|e| at(&e))
    }

    pub fn parse(text: &str) -> Result<Self, Invalid> {
        let config: Self = toml::from_str(text).map_err(|e| Invalid(e.to_string()))?;
        for (name, group) in &config.groups {
            group.validate(name)?;
        }
        for (name, notifier) in &config.notifiers {
            if !crate::monitor::valid_name(name) {
                return Err(Invalid(format!(
                    "notifier name `{name}`: use letters, digits, `-` and `_`"
                )));
            }
            notifier.validate(name)?;
        }
        for (name, monitor) in &config.monitors {
            if !crate::monitor::valid_name(name) {
                return Err(Invalid(format!(
                    "monitor name `{name}`: use letters, digits, `-` and `_`"
                )));
            }
            monitor.compile(&format!("monitors.{name}"), &config.notifiers)?;
        }
        config
            .signing
            .check_names(&|g| config.groups.contains_key(g), &|n| {
                config.notifiers.contains_key(n)
            })?;
        config
            .targets
            .settings(&|n| config.notifiers.contains_key(n))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_and_dns_groups_with_defaults() {
        let c = FileConfig::parse(
            r#"
            [groups.caches]
            members = ["http://a:1", "https://b/prefix"]
            preserve_host = true
            [groups.web]
            dns = "web.test"
            port = 8080
            max_age_s = 60
            "#,
        )
        .unwrap();
        let caches = &c.groups["caches"];
        assert_eq!(caches.members.as_ref().map(Vec::len), Some(2));
        assert!(caches.preserve_host);
        assert_eq!(caches.delivery.max_age_s, 86_400);
        let web = &c.groups["web"];
        assert_eq!(web.dns.as_deref(), Some("web.test"));
        assert_eq!((web.port, web.scheme.as_str()), (Some(8080), "http"));
        assert_eq!(web.delivery.max_age_s, 60);
        assert_eq!(FileConfig::parse("").unwrap(), FileConfig::default());
        let agents = FileConfig::parse("[groups.edge]\nagents = true\n").unwrap();
        assert!(agents.groups["edge"].agents);
    }

    #[test]
    fn the_example_file_is_valid() {
        let c = FileConfig::parse(include_str!("../../../examples/knocker.toml")).unwrap();
        assert!(c.groups.contains_key("caches"));
        assert!(c.monitors.contains_key("demo-target"));
        assert!(c.notifiers.contains_key("demo-hook"));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            ("[groups.a]\nmembers = []", "groups.a.members"),
            ("[groups.a]\nmembers = [\"ftp://x\"]", "groups.a.members[0]"),
            ("[groups.a]\ndns = \"x\"", "groups.a.port"),
            (
                "[groups.a]\ndns = \"x\"\nport = 1\nmembers = [\"http://a\"]",
                "groups.a: needs one of",
            ),
            (
                "[groups.a]\nagents = true\ndns = \"x\"",
                "groups.a: needs one of",
            ),
            ("[groups.a]\nagents = true\nport = 1", "groups.a.port"),
            ("[groups.a]\n", "groups.a"),
            (
                "[groups.a]\ndns = \"x\"\nport = 1\nscheme = \"ftp\"",
                "groups.a.scheme",
            ),
            (
                "[groups.a]\ndns = \"x\"\nport = 1\nmax_age_s = 0",
                "groups.a.retries",
            ),
            (
                "[groups.a]\ndns = \"x\"\nport = 1\ntimeout_s = 0",
                "groups.a.timeout_s",
            ),
            ("[groups.a]\ndns = \"x\"\nport = 1\nmembrs = 1", "membrs"),
            ("[groups.\"a b\"]\ndns = \"x\"\nport = 1", "a b"),
        ] {
            let e = FileConfig::parse(text).unwrap_err();
            assert!(e.0.contains(field), "{text:?}: {e}");
        }
    }
}
