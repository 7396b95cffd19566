//! Outbound requests: the one door every request the control plane sends leaves by —
//! job attempts, callbacks, broadcast copies, agent replays, webhooks, monitor checks —
//! and the one policy each hop of them passes.
//!
//! A destination the operator wrote (a rule's target, a group member, a notifier, a
//! monitor in the file) is trusted ([`Trust::Operator`]). One a client chose
//! (`Knocker-Host`, `Knocker-Callback`, a monitor made through the API) and every
//! redirect hop that leaves the trusted origin ([`Trust::Client`]) must pass
//! [`OutboundPolicy`], checked on the address actually connected to: literal addresses
//! before the request, names in the resolver (so a name that resolves to a denied
//! address is denied too). By default that denies loopback, link-local (the cloud
//! metadata addresses among them), unspecified, multicast and broadcast addresses, and
//! this stack's own ports on this machine's addresses; `HOSTS_ONLY` applies to every
//! such hop. `KNOCKER_OUTBOUND_ALLOW` opens ranges, `KNOCKER_OUTBOUND_DENY` closes more.
//!
//! Redirects are followed here, hop by hop, rather than inside the HTTP client, so that
//! each hop is checked and the method and body rules are ours. One HTTP client per trust
//! serves every attempt, whatever its timeout (timeouts are per request).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::Method;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use ipnet::IpNet;
use url::Url;

pub use crate::hosts_only::HostsOnly;
pub use crate::job::Trust;
use crate::validate::Invalid;

/// The DNS resolver of `KNOCKER_DNS_SERVER` cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot build the DNS resolver: {0}")]
pub struct ResolverError(pub(crate) String);

/// Why a hop was not sent. The text names the address and what would open it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Ranges a client-chosen destination may not reach unless the operator opens them.
const DEFAULT_DENIED: &[(&str, &str)] = &[
    ("127.0.0.0/8", "a loopback address"),
    ("::1/128", "a loopback address"),
    ("0.0.0.0/8", "an unspecified (this-network) address"),
    ("::/128", "an unspecified address"),
    (
        "169.254.0.0/16",
        "a link-local address (cloud metadata lives there)",
    ),
    ("fe80::/10", "a link-local address"),
    ("100.100.100.200/32", "a cloud metadata address"),
    ("fd00:ec2::254/128", "a cloud metadata address"),
    ("224.0.0.0/4", "a multicast address"),
    ("ff00::/8", "a multicast address"),
    ("255.255.255.255/32", "the broadcast address"),
];

/// [`DEFAULT_DENIED`] parsed, once.
fn default_denied() -> &'static [(IpNet, &'static str)] {
    static NETS: std::sync::LazyLock<Vec<(IpNet, &'static str)>> = std::sync::LazyLock::new(|| {
        DEFAULT_DENIED
            .iter()
            .filter_map(|(net, what)| Some((IpNet::from_str(net).ok()?, *what)))
            .collect()
    });
    &NETS
}

/// The policy for client-chosen hops.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    pub hosts_only: HostsOnly,
    /// Opened by the operator: these ranges are reachable even where the defaults deny.
    pub allow: Vec<IpNet>,
    /// Closed by the operator, on top of the defaults; wins over `allow`.
    pub deny: Vec<IpNet>,
    /// Ports of this stack (the control plane's own, Envoy's admin…): never reached on
    /// this machine's addresses by a client-chosen hop.
    pub protected_ports: Vec<u16>,
    /// This machine's addresses (loopback and unspecified count as this machine too).
    pub local: Vec<IpAddr>,
}

/// The address an IPv4-mapped or NAT64 IPv6 address stands for, else the address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // 64:ff9b::/96 (NAT64) carries an IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

impl OutboundPolicy {
    /// This machine's interface addresses, read once at start-up.
    pub fn local_addresses() -> Vec<IpAddr> {
        match if_addrs::get_if_addrs() {
            Ok(ifs) => ifs.into_iter().map(|i| i.ip()).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list this machine's addresses; protected ports are checked on loopback only");
                Vec::new()
            }
        }
    }

    /// May a client-chosen hop connect to `ip`?
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        let ip = canonical(ip);
        if let Some(net) = self.deny.iter().find(|n| n.contains(&ip)) {
            return Err(Denied(format!(
                "{ip} is in {net}, which KNOCKER_OUTBOUND_DENY closes"
            )));
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        for (net, what) in default_denied() {
            if net.contains(&ip) {
                return Err(Denied(format!(
                    "{ip} is {what}, closed to client-chosen destinations (KNOCKER_OUTBOUND_ALLOW opens a range)"
                )));
            }
        }
        Ok(())
    }

    /// May a client-chosen hop connect to `addr`: its range and, on this machine, its port?
    pub fn check_addr(&self, addr: SocketAddr) -> Result<(), Denied> {
        self.check_ip(addr.ip())?;
        self.check_port(addr.ip(), addr.port())
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_loopback() || ip.is_unspecified() || self.local.iter().any(|l| canonical(*l) == ip)
    }

    fn check_port(&self, ip: IpAddr, port: u16) -> Result<(), Denied> {
        if self.protected_ports.contains(&port) && self.is_local(ip) {
            return Err(Denied(format!(
                "{} is a port of this stack on this machine, closed to client-chosen destinations",
                SocketAddr::new(ip, port)
            )));
        }
        Ok(())
    }

    /// `HOSTS_ONLY` for a client-chosen hop to `url`.
    pub fn check_host(&self, url: &Url) -> Result<(), Denied> {
        let host = url.host_str().unwrap_or_default();
        // The URL parser drops a scheme's default port (`https://a:443/` is `https://a/`):
        // an entry `a:443` must still match it.
        let host_port = match url.port_or_known_default() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        if self.hosts_only.allows(&host_port, host) {
            Ok(())
        } else {
            Err(Denied(format!(
                "host {host_port} is not in HOSTS_ONLY ({})",
                self.hosts_only.0.join(", ")
            )))
        }
    }

    /// Every check that can be made before connecting: scheme, `HOSTS_ONLY`, a literal
    /// address. Names are checked again when they resolve.
    pub fn check_url(&self, url: &Url) -> Result<(), Denied> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Denied(format!(
                "scheme {} is not http or https",
                url.scheme()
            )));
        }
        self.check_host(url)?;
        let port = url.port_or_known_default().unwrap_or(80);
        match url.host() {
            Some(url::Host::Ipv4(v4)) => self.check_addr(SocketAddr::new(IpAddr::V4(v4), port)),
            Some(url::Host::Ipv6(v6)) => self.check_addr(SocketAddr::new(IpAddr::V6(v6), port)),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(Denied("the URL has no host".into())),
        }
    }
}

/// How names become addresses: the system's lookup (`/etc/hosts`, `/etc/resolv.conf`),
/// or the DNS server of `KNOCKER_DNS_SERVER` when one is set.
pub enum Lookup {
    System,
    Server(Box<hickory_resolver::TokioResolver>),
}

/// A resolver that asks `server` only (A and AAAA), caching no failure.
pub fn dns_server_resolver(
    server: SocketAddr,
) -> hickory_resolver::ResolverBuilder<hickory_resolver::net::runtime::TokioRuntimeProvider> {
    use hickory_resolver::config::{
        ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
    };
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = server.port();
    let name_server = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
    let mut builder = hickory_resolver::TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![name_server]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.negative_max_ttl = Some(Duration::ZERO);
    builder
}

impl Lookup {
    pub fn new(dns_server: Option<SocketAddr>) -> Result<Self, ResolverError> {
        match dns_server {
            None => Ok(Self::System),
            Some(server) => dns_server_resolver(server)
                .build()
                .map(|r| Self::Server(Box::new(r)))
                .map_err(|e| ResolverError(e.to_string())),
        }
    }

    async fn addresses(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        match self {
            Self::System => Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|a| a.ip())
                .collect()),
            Self::Server(resolver) => {
                let fqdn = if host.ends_with('.') {
                    host.to_owned()
                } else {
                    format!("{host}.")
                };
                let found = resolver
                    .lookup_ip(fqdn.as_str())
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Ok(found.iter().collect())
            }
        }
    }
}

/// The resolver of both clients; for client-chosen hops it keeps only the addresses the
/// policy allows, and a name left with none is denied.
#[derive(Clone)]
struct PolicyResolver {
    lookup: Arc<Lookup>,
    policy: Option<Arc<OutboundPolicy>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Name> for PolicyResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = Arc::clone(&self.lookup);
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str();
            let found = lookup.addresses(host).await?;
            let Some(policy) = policy else {
                let all: Vec<SocketAddr> =
                    found.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
                return Ok(all.into_iter());
            };
            let mut denied = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|ip| match policy.check_ip(*ip) {
                    Ok(()) => true,
                    Err(e) => {
                        denied.get_or_insert(e);
                        false
                    }
                })
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            match (allowed.is_empty(), denied) {
                (true, Some(Denied(why))) => {
                    Err(Box::new(Denied(format!("{host} resolves to {why}"))) as BoxError)
                }
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// Why a request was not answered.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("denied: {0}")]
    Denied(Denied),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{}", error_chain(.0))]
    Transport(hyper_util::client::legacy::Error),
    #[error("too many redirects (more than {0})")]
    TooManyRedirects(usize),
    #[error("invalid URL {0}")]
    BadUrl(String),
}

/// Longest per-request timeout, whatever a stored job says.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// A timeout in seconds as a duration, clamped to what a request may take.
pub fn timeout(seconds: f64) -> Duration {
    if seconds.is_nan() || seconds <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(seconds).map_or(MAX_TIMEOUT, |d| d.min(MAX_TIMEOUT))
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Bounds connecting and waiting for each answer's head, per hop.
    pub timeout: Duration,
    pub trust: Trust,
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<PolicyResolver>>;
type Client = hyper_util::client::legacy::Client<Connector, Full<Bytes>>;

/// An answer: its head, and its body to read (or drop) as the caller sees fit.
pub type Response = http::Response<hyper::body::Incoming>;

/// The next piece of an answer's body, `None` at its end (trailers are skipped).
pub async fn chunk(response: &mut Response) -> Result<Option<Bytes>, hyper::Error> {
    loop {
        match response.body_mut().frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// The HTTP clients cannot be built: no trust store for HTTPS.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct ClientError(String);

/// The HTTP clients and the policy.
pub struct Outbound {
    policy: Arc<OutboundPolicy>,
    lookup: Arc<Lookup>,
    operator: Client,
    client: Client,
    max_redirects: usize,
}

/// TLS as every connection the control plane opens sets it up: rustls with aws-lc-rs
/// (named, as this binary is built with two crypto providers and rustls cannot pick one
/// alone), its safe default protocol versions, and servers checked against `roots`, or the
/// system's trust store without them. The caller adds its client certificate, or none.
pub fn tls_client(
    roots: Option<rustls::RootCertStore>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    Ok(match roots {
        Some(roots) => builder.with_root_certificates(roots),
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| format!("TLS: the system's trust store: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    })
}

/// Headers that do not follow a redirect to another origin.
const CREDENTIALS: &[&str] = &["authorization", "cookie", "proxy-authorization"];

impl Outbound {
    pub fn new(
        policy: OutboundPolicy,
        lookup: Lookup,
        max_redirects: u32,
    ) -> Result<Self, ClientError> {
        let policy = Arc::new(policy);
        let lookup = Arc::new(lookup);
        // HTTPS as reqwest sets it up: the system's trust store, HTTP/2 or HTTP/1.1 by ALPN.
        let tls = tls_client(None).map_err(ClientError)?.with_no_client_auth();
        let build = |policy: Option<Arc<OutboundPolicy>>| {
            let mut http = HttpConnector::new_with_resolver(PolicyResolver {
                lookup: Arc::clone(&lookup),
                policy,
            });
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(MAX_TIMEOUT));
            http.set_keepalive(Some(Duration::from_secs(15)));
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .enable_all_versions()
                .wrap_connector(http);
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(https)
        };
        Ok(Self {
            operator: build(None),
            client: build(Some(Arc::clone(&policy))),
            policy,
            lookup,
            max_redirects: max_redirects as usize,
        })
    }

    /// Sends the request, following redirects hop by hop; each hop that is not the
    /// operator's own origin passes the policy.
    pub async fn send(&self, request: Request) -> Result<Response, Failure> {
        let Request {
            mut method,
            url,
            mut headers,
            mut body,
            timeout,
            trust,
        } = request;
        let mut url = Url::parse(&url).map_err(|_| Failure::BadUrl(url.clone()))?;
        // As browsers and reqwest do, unless the request says otherwise.
        headers
            .entry(http::header::ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        let trusted_origin = (trust == Trust::Operator).then(|| url.origin());
        let mut redirects = 0;
        loop {
            let hop_trust = match &trusted_origin {
                Some(origin) if *origin == url.origin() => Trust::Operator,
                _ => Trust::Client,
            };
            let client = match hop_trust {
                Trust::Operator => &self.operator,
                Trust::Client => {
                    self.check_hop(&url).await.map_err(Failure::Denied)?;
                    &self.client
                }
            };
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Failure::BadUrl(format!(
                    "{url}: scheme {} is not http or https",
                    url.scheme()
                )));
            }
            let uri: http::Uri = url
                .as_str()
                .parse()
                .map_err(|_| Failure::BadUrl(url.to_string()))?;
            let mut hop = http::Request::new(Full::new(body.clone()));
            *hop.method_mut() = method.clone();
            *hop.uri_mut() = uri;
            *hop.headers_mut() = headers.clone();
            let send = client.request(hop);
            let response = match tokio::time::timeout(timeout, send).await {
                Err(_) => return Err(Failure::Timeout(timeout)),
                Ok(Err(e)) => return Err(classify_denied(e)),
                Ok(Ok(r)) => r,
            };
            let status = response.status().as_u16();
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(str::to_owned);
            let Some(location) = location.filter(|_| matches!(status, 301 | 302 | 303 | 307 | 308))
            else {
                return Ok(response);
            };
            if redirects >= self.max_redirects {
                return Err(Failure::TooManyRedirects(self.max_redirects));
            }
            redirects += 1;
            let next = url
                .join(&location)
                .map_err(|_| Failure::BadUrl(location.clone()))?;
            // 303, and 301/302 after a POST, become a GET without a body (as browsers do).
            if status == 303 && method != Method::HEAD
                || matches!(status, 301 | 302) && method == Method::POST
            {
                method = Method::GET;
                body = Bytes::new();
                headers.remove(http::header::CONTENT_TYPE);
                headers.remove(http::header::CONTENT_LENGTH);
            }
            if next.origin() != url.origin() {
                for name in CREDENTIALS {
                    headers.remove(*name);
                }
            }
            url = next;
        }
    }

    /// The checks of a client-chosen hop that can be made before connecting; for a name
    /// on a protected port, the addresses it has now (the resolver checks ranges again
    /// when connecting).
    async fn check_hop(&self, url: &Url) -> Result<(), Denied> {
        self.policy.check_url(url)?;
        if let (Some(url::Host::Domain(name)), Some(port)) =
            (url.host(), url.port_or_known_default())
        {
            if self.policy.protected_ports.contains(&port) {
                if let Ok(addrs) = self.lookup.addresses(name).await {
                    for ip in addrs {
                        self.policy.check_addr(SocketAddr::new(ip, port))?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A transport error whose cause is the resolver's denial is a denial.
fn classify_denied(e: hyper_util::client::legacy::Error) -> Failure {
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(denied) = s.downcast_ref::<Denied>() {
            return Failure::Denied(denied.clone());
        }
        source = s.source();
    }
    Failure::Transport(e)
}

pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// CIDR lists as people write them: `127.0.0.0/8, ::1/128` (a bare address is /32 or /128).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, Invalid> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            IpNet::from_str(p)
                .or_else(|_| IpAddr::from_str(p).map(IpNet::from))
                .map_err(|_| {
                    Invalid(format!(
                        "`{p}` is not an address range like 10.0.0.0/8 or ::1/128"
                    ))
                })
        })
        .collect()
}

/// Port lists: `9901, 15000`.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, Invalid> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(Invalid(format!("`{p}` is not a port (1–65535)"))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutboundPolicy {
        OutboundPolicy {
            protected_ports: vec![9901, 8000],
            local: vec!["10.1.2.3".parse().unwrap()],
            ..OutboundPolicy::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denials_cover_loopback_metadata_and_friends_in_every_spelling() {
        let p = policy();
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::7f00:1",
        ] {
            let e = p.check_ip(ip(bad)).unwrap_err();
            assert!(e.0.contains("KNOCKER_OUTBOUND_ALLOW"), "{bad}: {e}");
        }
        for good in [
            "93.184.216.34",
            "10.0.0.1",
            "2606:4700::1111",
            "192.168.1.1",
        ] {
            assert_eq!(p.check_ip(ip(good)), Ok(()), "{good}");
        }
    }

    #[test]
    fn allow_opens_deny_closes_and_protected_ports_stay_closed_on_this_machine() {
        let mut p = policy();
        p.allow = parse_cidrs("127.0.0.0/8").unwrap();
        p.deny = parse_cidrs("10.0.0.0/8, 127.0.0.5").unwrap();
        assert_eq!(p.check_ip(ip("127.0.0.1")), Ok(()));
        assert!(p
            .check_ip(ip("127.0.0.5"))
            .unwrap_err()
            .0
            .contains("KNOCKER_OUTBOUND_DENY"));
        assert!(p.check_ip(ip("10.9.9.9")).is_err());
        // Loopback is open, but not this stack's ports on it, nor on this machine's address.
        assert_eq!(p.check_addr("127.0.0.1:8080".parse().unwrap()), Ok(()));
        assert!(p.check_addr("127.0.0.1:9901".parse().unwrap()).is_err());
        assert!(p
            .check_addr("[::ffff:127.0.0.1]:8000".parse().unwrap())
            .is_err());
        p.deny.clear();
        assert!(p.check_addr("10.1.2.3:9901".parse().unwrap()).is_err());
        assert_eq!(p.check_addr("10.1.2.4:9901".parse().unwrap()), Ok(()));
    }

    #[test]
    fn urls_are_checked_by_scheme_hosts_only_and_literal_address() {
        let mut p = policy();
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(p.check_url(&url("http://127.0.0.1:9/")).is_err());
        // The URL parser reads every spelling of an IPv4 address as one.
        assert!(p.check_url(&url("http://2130706433/")).is_err());
        assert!(p.check_url(&url("http://0x7f.1/")).is_err());
        assert!(p.check_url(&url("http://[::1]/")).is_err());
        assert!(p.check_url(&url("ftp://example.com/")).is_err());
        assert_eq!(p.check_url(&url("https://example.com/x")), Ok(()));
        p.hosts_only = HostsOnly(vec!["a.example".into(), "b.example:8080".into()]);
        assert_eq!(p.check_url(&url("http://a.example:1234/")), Ok(()));
        assert_eq!(p.check_url(&url("http://b.example:8080/")), Ok(()));
        p.hosts_only = HostsOnly(vec!["s.example:443".into()]);
        assert_eq!(p.check_url(&url("https://s.example:443/")), Ok(()));
        assert!(p.check_url(&url("http://s.example/")).is_err());
        p.hosts_only = HostsOnly(vec!["a.example".into(), "b.example:8080".into()]);
        let e = p.check_url(&url("http://b.example:9090/")).unwrap_err();
        assert!(e.0.contains("HOSTS_ONLY"), "{e}");
        assert!(p.check_url(&url("http://c.example/")).is_err());
    }

    #[test]
    fn every_default_range_parses() {
        assert_eq!(default_denied().len(), DEFAULT_DENIED.len());
    }

    #[test]
    fn timeouts_are_clamped_not_panics() {
        assert_eq!(timeout(1e300), MAX_TIMEOUT);
        assert_eq!(timeout(f64::INFINITY), MAX_TIMEOUT);
        assert_eq!(timeout(f64::NAN), Duration::ZERO);
        assert_eq!(timeout(-1.0), Duration::ZERO);
        assert_eq!(timeout(1.5), Duration::from_millis(1500));
    }

    #[test]
    fn lists_parse_with_errors_naming_the_item() {
        assert_eq!(parse_cidrs("").unwrap(), vec![]);
        assert_eq!(parse_cidrs("::1").unwrap().len(), 1);
        assert!(parse_cidrs("10.0.0.0/33")
            .unwrap_err()
            .0
            .contains("10.0.0.0/33"));
        assert_eq!(parse_ports("9901, 15000").unwrap(), vec![9901, 15000]);
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("x").unwrap_err().0.contains("`x`"));
    }
}
