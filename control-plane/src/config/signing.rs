//! The file's `[signing]` table: where each signing secret is read from. A secret is
//! never written in the file itself, only where to find it: `env:NAME` (an environment
//! variable) or `file:/path` (a file, e.g. a mounted Kubernetes secret; surrounding
//! whitespace ignored). Several entries sign together, so a secret rotates without a gap.
//!
//! ```toml
//! [signing]
//! default = ["env:KNOCKER_WEBHOOK_SECRET"]        # the operator's destinations
//! rules.orders = ["file:/run/secrets/orders", "file:/run/secrets/orders-next"]
//! groups.caches = ["env:CACHES_SECRET"]
//! notifiers.ops-hook = ["env:OPS_SECRET"]
//! hosts."api.example:443" = ["file:/run/secrets/api"]
//! ```

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::delivery::signing::{Key, Signing};
use crate::validate::Invalid;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    #[serde(default)]
    pub default: Vec<String>,
    #[serde(default)]
    pub rules: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub notifiers: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub hosts: BTreeMap<String, Vec<String>>,
}

impl SigningConfig {
    /// Reads every secret and checks it; `env` looks up environment variables. Errors
    /// name the field (`signing.rules.orders[1]`), never the secret.
    pub fn load(
        &self,
        from_env: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Signing, Invalid> {
        let read = |entries: &[String], field: &str| -> Result<Vec<Key>, Invalid> {
            entries
                .iter()
                .enumerate()
                .map(|(i, entry)| {
                    let field = format!("{field}[{i}]");
                    let text = read_source(entry, &field, &env)?;
                    Key::parse(&text, &field)
                })
                .collect()
        };
        let mut signing = Signing {
            default: read(&self.default, "signing.default")?,
            ..Signing::default()
        };
        if let Some(text) = from_env {
            for (i, key) in text.split_whitespace().enumerate() {
                signing.default.push(Key::parse(
                    key,
                    &format!("KNOCKER_SIGNING_SECRETS (entry {})", i + 1),
                )?);
            }
        }
        for (kind, table) in [
            ("rule", &self.rules),
            ("group", &self.groups),
            ("notifier", &self.notifiers),
        ] {
            for (name, entries) in table {
                let keys = read(entries, &format!("signing.{kind}s.{name}"))?;
                signing.sources.insert(format!("{kind}:{name}"), keys);
            }
        }
        let mut hosts = HashMap::new();
        for (host, entries) in &self.hosts {
            let field = format!("signing.hosts.\"{host}\"");
            let key = host_port(host).ok_or_else(|| {
                Invalid(format!(
                    "{field}: name a target as host:port (`api.example:443`)"
                ))
            })?;
            hosts.insert(key, read(entries, &field)?);
        }
        signing.hosts = hosts;
        Ok(signing)
    }

    /// Checks that the groups and notifiers named exist.
    pub fn check_names(
        &self,
        groups: &dyn Fn(&str) -> bool,
        notifiers: &dyn Fn(&str) -> bool,
    ) -> Result<(), Invalid> {
        for (kind, table, exists) in [
            ("groups", &self.groups, groups),
            ("notifiers", &self.notifiers, notifiers),
        ] {
            if let Some(name) = table.keys().find(|n| !exists(n)) {
                return Err(Invalid(format!(
                    "signing.{kind}.{name}: there is no such {} in the file",
                    kind.trim_end_matches('s')
                )));
            }
        }
        Ok(())
    }
}

/// `host:port`, lower-case, when `text` is one.
pub fn host_port(text: &str) -> Option<String> {
    let (host, port) = text.rsplit_once(':')?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
    (port_ok && !host.is_empty() && !host.contains('/')).then(|| text.to_ascii_lowercase())
}

fn read_source(
    entry: &str,
    field: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<String, Invalid> {
    if let Some(name) = entry.strip_prefix("env:") {
        return env(name).ok_or_else(|| {
            Invalid(format!(
                "{field}: the environment variable `{name}` is not set"
            ))
        });
    }
    if let Some(path) = entry.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| Invalid(format!("{field}: cannot read `{path}`: {e}")));
    }
    Err(Invalid(format!(
        "{field}: say where the secret is, `env:NAME` or `file:/path` (a secret is never written in this file)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn config(text: &str) -> SigningConfig {
        #[derive(Deserialize)]
        struct File {
            signing: SigningConfig,
        }
        toml::from_str::<File>(text).unwrap().signing
    }

    #[test]
    fn secrets_come_from_the_environment_and_files() {
        let dir = std::env::temp_dir().join(format!("knocker-signing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("orders");
        std::fs::write(&file, format!("{SECRET}\n")).unwrap();
        let c = config(&format!(
            r#"
            [signing]
            default = ["env:DEFAULT"]
            rules.orders = ["file:{}", "env:DEFAULT"]
            hosts."API.example:443" = ["env:DEFAULT"]
            "#,
            file.display()
        ));
        let env = |n: &str| (n == "DEFAULT").then(|| SECRET.to_owned());
        let s = c.load(Some(SECRET), env).unwrap();
        assert_eq!(s.default.len(), 2, "the file's and KNOCKER_SIGNING_SECRETS");
        assert_eq!(s.sources["rule:orders"].len(), 2);
        assert_eq!(s.hosts["api.example:443"].len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_field_and_never_the_secret() {
        let env = |n: &str| (n == "SET").then(|| "whsec_bm90IGEgZ29vZCBrZXk".to_owned());
        for (text, field) in [
            (
                r#"default = ["whsec_abc"]"#,
                "signing.default[0]: say where",
            ),
            (r#"default = ["env:UNSET"]"#, "`UNSET` is not set"),
            (r#"rules.o = ["env:SET"]"#, "signing.rules.o[0]"),
            (
                r#"groups.g = ["file:/nonexistent/k"]"#,
                "signing.groups.g[0]: cannot read",
            ),
            (r#"hosts.api = ["env:SET"]"#, "host:port"),
        ] {
            let e = config(&format!("[signing]\n{text}"))
                .load(None, env)
                .unwrap_err()
                .0;
            assert!(e.contains(field), "{text}: {e}");
            assert!(!e.contains("bm90IGEgZ29vZCBrZXk"), "{e}");
        }
        let e = config("[signing]\n")
            .load(Some("whsec_x y"), env)
            .unwrap_err()
            .0;
        assert!(e.contains("KNOCKER_SIGNING_SECRETS (entry 1)"), "{e}");
        let c = config("[signing]\ngroups.nope = []\n");
        let e = c.check_names(&|_| false, &|_| true).unwrap_err().0;
        assert!(e.contains("signing.groups.nope"), "{e}");
    }
}
