//! Broadcast groups and their membership: a static list of base URLs, or every A and
//! AAAA address a DNS name resolves to — looked up at fan-out time, so a headless
//! Kubernetes service (or any DNS name) is a group without a registry.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{LookupIpStrategy, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::file::GroupConfig;

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
    ) -> anyhow::Result<Self> {
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
        let resolver = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the DNS resolver: {e}"))?;
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
