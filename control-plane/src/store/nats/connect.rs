//! How a control plane reaches its NATS server, and the one place it connects: the job
//! store, the shared circuits, the shared monitors and the broadcast agents all connect
//! through [`NatsAccess::connect`].
//!
//! - `KNOCKER_STORE`: `nats://host:port`, or `tls://host:port` for TLS; the servers of one
//!   cluster separated by commas. A user and password (`nats://user:pass@host:port`) or a
//!   token (`nats://token@host:port`) in it are sent when connecting, and never shown: a
//!   log line or an error names the address alone.
//! - `KNOCKER_NATS_CREDS`: a user's credentials file (its JWT and NKey seed) for a server
//!   run with NATS accounts; or `KNOCKER_NATS_NKEY`: a file holding an NKey seed, for a
//!   server that lists its users by NKey. One login at a time: the address's or a file's.
//! - `KNOCKER_NATS_CA`: the certificate authority (PEM) the server's certificate must
//!   chain to, instead of the system's trust store.
//! - `KNOCKER_NATS_CERT` and `KNOCKER_NATS_KEY`: this control plane's certificate and key
//!   (PEM), for a server that verifies its clients (mutual TLS).
//!
//! Any of the three TLS files makes TLS required. Every file is read when the settings
//! are loaded, so a wrong one stops the start with its variable named; and again at each
//! connection.

use std::fmt;
use std::path::{Path, PathBuf};

use async_nats::{Client, ConnectOptions, ServerAddr};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::super::StoreError;

/// A NATS connection's login and TLS files, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsFiles {
    /// `KNOCKER_NATS_CREDS`.
    pub creds: Option<PathBuf>,
    /// `KNOCKER_NATS_NKEY`.
    pub nkey: Option<PathBuf>,
    /// `KNOCKER_NATS_CA`.
    pub ca: Option<PathBuf>,
    /// `KNOCKER_NATS_CERT`.
    pub cert: Option<PathBuf>,
    /// `KNOCKER_NATS_KEY`.
    pub key: Option<PathBuf>,
}

impl NatsFiles {
    fn tls(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Where the NATS server is, and how to log in to it.
#[derive(Clone, PartialEq, Eq)]
pub struct NatsAccess {
    /// Each server's address, without credentials.
    addresses: Vec<String>,
    /// The login written in the address (none, a user and password, or a token).
    credentials: Login,
    files: NatsFiles,
}

/// Shows the addresses only.
impl fmt::Display for NatsAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addresses.join(","))
    }
}

/// Shows the addresses, the kind of credentials in them (never their value) and the
/// files' paths.
impl fmt::Debug for NatsAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = match self.credentials {
            Login::UserPassword(..) => "user and password",
            Login::Token(_) => "token",
            _ => "none",
        };
        f.debug_struct("NatsAccess")
            .field("addresses", &self.addresses)
            .field("credentials", &credentials)
            .field("files", &self.files)
            .finish()
    }
}

/// Whether `KNOCKER_STORE` names a NATS server (its scheme; [`NatsAccess::new`] checks
/// the rest).
pub fn is_nats(store: &str) -> bool {
    let store = store.trim_start();
    ["nats://", "tls://"].iter().any(|scheme| {
        store
            .get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    })
}

impl NatsAccess {
    /// From `KNOCKER_STORE` and the login and TLS files. The error names the setting, and
    /// shows no credential.
    pub fn new(store: &str, files: NatsFiles) -> Result<Self, String> {
        let mut addresses = Vec::new();
        let mut credentials = Login::None;
        for part in store.split(',').map(str::trim) {
            let shown = crate::redact::url(part);
            let invalid = |why: &str| {
                format!("KNOCKER_STORE: `{shown}` {why} (nats://host:port or tls://host:port)")
            };
            let url = url::Url::parse(part).map_err(|e| invalid(&format!("is not a URL: {e}")))?;
            let scheme = url.scheme();
            if scheme != "nats" && scheme != "tls" {
                return Err(invalid("is not a NATS server"));
            }
            let host = match url.host_str() {
                Some(h) if !h.is_empty() => h,
                _ => return Err(invalid("names no host")),
            };
            if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some()
            {
                return Err(invalid("has more than a host and a port"));
            }
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| invalid("has credentials that are not UTF-8"))
            };
            let these = match (url.username(), url.password()) {
                ("", None) => Login::None,
                (user, Some(password)) => Login::UserPassword(decode(user)?, decode(password)?),
                (token, None) => Login::Token(decode(token)?),
            };
            if these != Login::None {
                if credentials != Login::None && credentials != these {
                    return Err(
                        "KNOCKER_STORE: the servers carry different credentials; one login serves them all"
                            .to_owned(),
                    );
                }
                credentials = these;
            }
            addresses.push(format!("{scheme}://{host}:{}", url.port().unwrap_or(4222)));
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err("KNOCKER_NATS_CERT and KNOCKER_NATS_KEY go together".to_owned());
        }
        let logins: Vec<&str> = [
            (credentials != Login::None).then_some("a login in KNOCKER_STORE"),
            files.creds.as_ref().map(|_| "KNOCKER_NATS_CREDS"),
            files.nkey.as_ref().map(|_| "KNOCKER_NATS_NKEY"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let [one, other, ..] = logins[..] {
            return Err(format!("{one} and {other}: one login at a time"));
        }
        let server = Self {
            addresses,
            credentials,
            files,
        };
        server.login()?;
        if server.files.tls() {
            server.tls_config()?;
        }
        Ok(server)
    }

    /// Connects as `name` (how the server lists the connection).
    pub async fn connect(&self, name: &str) -> Result<Client, StoreError> {
        let failed = |e: &dyn fmt::Display| StoreError::Unavailable(format!("NATS {self}: {e}"));
        let addresses = self
            .addresses
            .iter()
            .map(|a| a.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed(&e))?;
        // Always a TLS set-up of our own, for a server that asks for TLS unasked too:
        // rustls is built with two crypto providers here, so it cannot pick one alone.
        let tls = self.tls_config().map_err(|e| failed(&e))?;
        let options = ConnectOptions::new()
            .name(name)
            .tls_client_config(tls)
            .require_tls(self.files.tls());
        let options = match self.login().map_err(|e| failed(&e))? {
            Login::None => options,
            Login::UserPassword(user, password) => options.user_and_password(user, password),
            Login::Token(token) => options.token(token),
            Login::Creds(text) => options
                .credentials(&text)
                .map_err(|e| failed(&format!("KNOCKER_NATS_CREDS: {e}")))?,
            Login::NKey(seed) => options.nkey(seed),
        };
        options.connect(addresses).await.map_err(|e| failed(&e))
    }

    /// The login to send: the address's, or a file's (read and checked).
    fn login(&self) -> Result<Login, String> {
        let read = |path: &Path, var: &str| {
            std::fs::read_to_string(path).map_err(|e| format!("{var} {}: {e}", path.display()))
        };
        if let Some(path) = &self.files.creds {
            let text = read(path, "KNOCKER_NATS_CREDS")?;
            ConnectOptions::new().credentials(&text).map_err(|e| {
                format!(
                    "KNOCKER_NATS_CREDS {}: not a NATS credentials file: {e}",
                    path.display()
                )
            })?;
            return Ok(Login::Creds(text));
        }
        if let Some(path) = &self.files.nkey {
            let text = read(path, "KNOCKER_NATS_NKEY")?;
            let seed = text.trim();
            nkeys::KeyPair::from_seed(seed).map_err(|e| {
                format!(
                    "KNOCKER_NATS_NKEY {}: not an NKey seed: {e}",
                    path.display()
                )
            })?;
            return Ok(Login::NKey(seed.to_owned()));
        }
        Ok(self.credentials.clone())
    }

    /// The TLS client set-up: the server checked against `KNOCKER_NATS_CA` or the system's
    /// trust store, this control plane's certificate when it has one.
    fn tls_config(&self) -> Result<rustls::ClientConfig, String> {
        let roots = match &self.files.ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca, "KNOCKER_NATS_CA")? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("KNOCKER_NATS_CA {}: {e}", ca.display()))?;
                }
                Some(roots)
            }
            None => None,
        };
        let builder = crate::outbound::tls_client(roots)?;
        match (&self.files.cert, &self.files.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates(cert, "KNOCKER_NATS_CERT")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    format!(
                        "KNOCKER_NATS_KEY {}: no private key read: {e}",
                        key.display()
                    )
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("KNOCKER_NATS_CERT and KNOCKER_NATS_KEY: {e}"))
            }
            _ => Ok(builder.with_no_client_auth()),
        }
    }
}

/// What a connection logs in with.
#[derive(Clone, PartialEq, Eq)]
enum Login {
    None,
    UserPassword(String, String),
    Token(String),
    /// A credentials file's text.
    Creds(String),
    /// An NKey seed.
    NKey(String),
}

/// The certificates of a PEM file; an error names `var` when it cannot be read or holds
/// none.
fn certificates(path: &Path, var: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let failed = |why: String| format!("{var} {}: {why}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| failed(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failed(e.to_string()))?;
    if certs.is_empty() {
        return Err(failed("no PEM certificate in it".to_owned()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(store: &str) -> Result<NatsAccess, String> {
        NatsAccess::new(store, NatsFiles::default())
    }

    #[test]
    fn credentials_are_taken_out_of_the_address_and_never_shown() {
        let s = server("nats://kn:s%40cret@nats.example:4333").unwrap();
        assert_eq!(s.to_string(), "nats://nats.example:4333");
        assert!(s.credentials == Login::UserPassword("kn".into(), "s@cret".into()));
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("cret") && debug.contains("user and password"),
            "{debug}"
        );
        let t = server("tls://t0ken@nats.example").unwrap();
        assert_eq!(t.to_string(), "tls://nats.example:4222");
        assert!(t.credentials == Login::Token("t0ken".into()));
        assert!(!format!("{t:?}").contains("t0ken"));
    }

    #[test]
    fn a_cluster_is_its_servers_with_one_login() {
        let s = server("nats://u:p@a:4222, nats://b:4223,tls://u:p@c").unwrap();
        assert_eq!(s.to_string(), "nats://a:4222,nats://b:4223,tls://c:4222");
        let e = server("nats://u:p@a,nats://u:other@b").unwrap_err();
        assert!(
            e.contains("different credentials") && !e.contains("other"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_address_is_named_without_its_password() {
        for (store, why) in [
            ("http://u:hunter2@a:4222", "is not a NATS server"),
            ("nats://u:hunter2@a:4222/x", "more than a host"),
            ("nats://u:hunter2@a:4222?x=1", "more than a host"),
            ("nats://u:hunter2@:4222", "URL"),
            ("nats://a:4222,", "URL"),
        ] {
            let e = server(store).unwrap_err();
            assert!(e.starts_with("KNOCKER_STORE"), "{store}: {e}");
            assert!(e.contains(why), "{store}: {e}");
            assert!(!e.contains("hunter2"), "{store}: {e}");
        }
        assert!(is_nats("nats://a") && is_nats("TLS://a") && !is_nats("sqlite"));
        assert!(!is_nats("natsé://a") && !is_nats("tls"));
    }

    #[test]
    fn tls_files_are_read_at_once_and_named_when_wrong() {
        let dir = std::env::temp_dir().join(format!("knocker-nats-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["nats.example".to_owned()]).unwrap();
        let (cert, key, junk) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("junk.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::write(&junk, "not a certificate").unwrap();
        let files = |ca: Option<&Path>, c: Option<&Path>, k: Option<&Path>| NatsFiles {
            ca: ca.map(Path::to_path_buf),
            cert: c.map(Path::to_path_buf),
            key: k.map(Path::to_path_buf),
            ..NatsFiles::default()
        };
        let store = "tls://a:4222";
        let ok = NatsAccess::new(store, files(Some(&cert), Some(&cert), Some(&key)));
        assert!(ok.is_ok(), "{ok:?}");
        for (tls, var) in [
            (files(Some(&junk), None, None), "KNOCKER_NATS_CA"),
            (
                files(Some(&dir.join("missing")), None, None),
                "KNOCKER_NATS_CA",
            ),
            (files(None, Some(&junk), Some(&key)), "KNOCKER_NATS_CERT"),
            (files(None, Some(&cert), Some(&junk)), "KNOCKER_NATS_KEY"),
            (
                files(None, Some(&cert), None),
                "KNOCKER_NATS_CERT and KNOCKER_NATS_KEY go together",
            ),
        ] {
            let e = NatsAccess::new(store, tls).unwrap_err();
            assert!(e.contains(var), "{var}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_login_file_is_read_at_once_and_one_login_is_sent() {
        let dir = std::env::temp_dir().join(format!("knocker-nats-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let user = nkeys::KeyPair::new_user();
        let seed_text = user.seed().unwrap();
        let (seed, creds, junk) = (dir.join("seed"), dir.join("u.creds"), dir.join("junk"));
        std::fs::write(&seed, format!("{seed_text}\n")).unwrap();
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed_text}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        std::fs::write(&junk, "SUnotaseed").unwrap();
        let files = |creds: Option<&Path>, nkey: Option<&Path>| NatsFiles {
            creds: creds.map(Path::to_path_buf),
            nkey: nkey.map(Path::to_path_buf),
            ..NatsFiles::default()
        };
        let nkey = NatsAccess::new("nats://a", files(None, Some(&seed))).unwrap();
        assert!(matches!(nkey.login(), Ok(Login::NKey(s)) if s == seed_text));
        let jwt = NatsAccess::new("nats://a", files(Some(&creds), None)).unwrap();
        assert!(matches!(jwt.login(), Ok(Login::Creds(_))));
        assert!(!format!("{nkey:?}{jwt:?}").contains(&seed_text));
        for (store, files, words) in [
            ("nats://a", files(None, Some(&junk)), "KNOCKER_NATS_NKEY"),
            ("nats://a", files(Some(&junk), None), "KNOCKER_NATS_CREDS"),
            (
                "nats://a",
                files(Some(&dir.join("gone")), None),
                "KNOCKER_NATS_CREDS",
            ),
            (
                "nats://u:p@a",
                files(None, Some(&seed)),
                "a login in KNOCKER_STORE and KNOCKER_NATS_NKEY",
            ),
            (
                "nats://a",
                files(Some(&creds), Some(&seed)),
                "KNOCKER_NATS_CREDS and KNOCKER_NATS_NKEY",
            ),
        ] {
            let e = NatsAccess::new(store, files).unwrap_err();
            assert!(e.contains(words), "{words}: {e}");
            assert!(!e.contains(&seed_text), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
