//! Broadcast groups and their membership: a static list of base URLs, or every A and
//! AAAA address a DNS name resolves to — looked up at fan-out time, so a headless
//! Kubernetes service (or any DNS name) is a group without a registry.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{LookupIpStrategy, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use serde::Deserialize;

use crate::job::policy::DeliveryPolicy;
use crate::outbound::ResolverError;
use crate::validate::unknown_fields;
use crate::validate::Invalid;

/// One broadcast group: its membership and the delivery policy of each member's copy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct GroupConfig {
    /// Static members: base URLs (`scheme://host[:port][/prefix]`).
    #[serde(default)]
    pub members: Option<Vec<String>>,
    /// DNS membership: every address this name resolves to, at fan-out time.
    #[serde(default)]
    pub dns: Option<String>,
    /// Agent membership (NATS engine): every control plane started with
    /// `KNOCKER_AGENT_GROUP` set to this group's name.
    #[serde(default)]
    pub agents: bool,
    /// DNS members' port and scheme.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_scheme")]
    pub scheme: String,
    /// Send the client's `Host` to every member instead of the member's own address.
    #[serde(default)]
    pub preserve_host: bool,
    /// The delivery policy of each member's copy (`max_age_s`: how long a member that is
    /// down is waited for — it then gets everything it missed, in order; `retries`,
    /// `backoff_factor`, `max_backoff_s`, `timeout_s`).
    #[serde(flatten)]
    pub delivery: DeliveryPolicy,
    /// Anything else is a mistake, named in the error (`deny_unknown_fields` does not
    /// work beside `flatten`).
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

fn default_scheme() -> String {
    "http".into()
}

impl GroupConfig {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let field = |f: &str| format!("groups.{name}.{f}");
        unknown_fields(&self.unknown, &format!("groups.{name}"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Invalid(format!(
                "group name `{name}`: use letters, digits, `-` and `_`"
            )));
        }
        let kinds = [self.members.is_some(), self.dns.is_some(), self.agents];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(Invalid(format!(
                "groups.{name}: needs one of `members` (base URLs), `dns` (a name) or \
                 `agents = true`"
            )));
        }
        match (&self.members, &self.dns) {
            (Some(_), Some(_)) | (None, None) => {
                if self.port.is_some() {
                    return Err(Invalid(format!(
                        "{} applies to DNS groups only",
                        field("port")
                    )));
                }
            }
            (Some(members), None) => {
                if members.is_empty() {
                    return Err(Invalid(format!("{} must not be empty", field("members"))));
                }
                for (i, m) in members.iter().enumerate() {
                    if !crate::job::spec::is_http_base_url(m) {
                        return Err(Invalid(format!(
                            "{}[{i}] `{m}` is not an http:// or https:// base URL",
                            field("members")
                        )));
                    }
                }
                if self.port.is_some() {
                    return Err(Invalid(format!(
                        "{} applies to DNS groups only",
                        field("port")
                    )));
                }
            }
            (None, Some(dns)) => {
                if dns.trim().is_empty() || dns.contains(['/', ':', ' ']) {
                    return Err(Invalid(format!(
                        "{} `{dns}` is not a DNS name",
                        field("dns")
                    )));
                }
                if !matches!(self.port, Some(1..)) {
                    return Err(Invalid(format!(
                        "{} (1–65535) is needed with `dns`",
                        field("port")
                    )));
                }
            }
        }
        if self.scheme != "http" && self.scheme != "https" {
            return Err(Invalid(format!(
                "{} must be http or https",
                field("scheme")
            )));
        }
        self.delivery.validate(field)
    }
}

/// Why a group has no members to send to.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MembershipError {
    #[error("no broadcast group named '{0}'")]
    Unknown(String),
    /// DNS failed or gave no address: nothing can be sent now.
    #[error("group '{group}': {reason}")]
    Unavailable { group: String, reason: String },
}

pub struct Groups {
    groups: BTreeMap<String, GroupConfig>,
    resolver: TokioResolver,
}

impl Groups {
    /// `dns_server`: where DNS groups are resolved; the system's resolver when `None`.
    pub fn new(
        groups: BTreeMap<String, GroupConfig>,
        dns_server: Option<SocketAddr>,
    ) -> Result<Self, ResolverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = match dns_server {
            Some(server) => crate::outbound::dns_server_resolver(server),
            None => match TokioResolver::builder(TokioRuntimeProvider::default()) {
                Ok(builder) => builder,
                Err(e) => {
                    // Only DNS groups need it: they answer 503 until it is fixed.
                    tracing::warn!(
                        error = %e,
                        "no system DNS configuration: DNS groups cannot resolve (set KNOCKER_DNS_SERVER)"
                    );
                    TokioResolver::builder_with_config(
                        ResolverConfig::from_name_servers(Vec::new()),
                        provider,
                    )
                }
            },
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // Membership is read at fan-out time: never answer from a stale cache longer
        // than the record's own TTL, and do not let a failed lookup stick.
        options.negative_max_ttl = Some(std::time::Duration::ZERO);
        let resolver = builder.build().map_err(|e| ResolverError(e.to_string()))?;
        Ok(Self { groups, resolver })
    }

    pub fn get(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.groups.keys()
    }

    /// The group's members now: base URLs without a trailing `/`, in a stable order.
    pub async fn members(&self, name: &str) -> Result<Vec<String>, MembershipError> {
        let group = self
            .groups
            .get(name)
            .ok_or_else(|| MembershipError::Unknown(name.to_owned()))?;
        if let Some(members) = &group.members {
            return Ok(members
                .iter()
                .map(|m| m.trim_end_matches('/').to_owned())
                .collect());
        }
        let dns = group.dns.as_deref().unwrap_or_default();
        let unavailable = |reason: String| MembershipError::Unavailable {
            group: name.to_owned(),
            reason,
        };
        // A trailing dot: the name is absolute, never tried against search domains.
        let fqdn = if dns.ends_with('.') {
            dns.to_owned()
        } else {
            format!("{dns}.")
        };
        let lookup = self
            .resolver
            .lookup_ip(fqdn.as_str())
            .await
            .map_err(|e| unavailable(format!("DNS lookup of {dns} failed: {e}")))?;
        let mut addresses: Vec<IpAddr> = lookup.iter().collect();
        addresses.sort();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(unavailable(format!("{dns} resolves to no address")));
        }
        let port = group.port.unwrap_or(80);
        Ok(addresses
            .into_iter()
            .map(|ip| format!("{}://{}", group.scheme, SocketAddr::new(ip, port)))
            .collect())
    }
}
