//! A control plane reaches a NATS server that asks for a login or TLS: a user and password
//! or a token inside `KNOCKER_STORE`, an account's user (`KNOCKER_NATS_CREDS`), an NKey
//! (`KNOCKER_NATS_NKEY`), TLS checked against `KNOCKER_NATS_CA`, and a client
//! certificate (`KNOCKER_NATS_CERT` / `KNOCKER_NATS_KEY`) for a server that verifies its
//! clients. A wrong login or certificate stops the start with a message that names the
//! server, never the password.

use std::time::Duration;

use knocker_e2e::process::start_refused;
use knocker_e2e::{temp_dir, Accounts, ControlPlane, NatsServer, Target, TestCert};

use crate::{client, WAIT};

const PASSWORD: &str = "pa55-w0rd_of-nats";

/// `nats://` becomes `scheme://` with `login@` before the host.
fn address(nats: &NatsServer, scheme: &str, login: &str) -> String {
    let host = nats.url.trim_start_matches("nats://");
    format!("{scheme}://{login}{host}")
}

/// A job through `cp` reaches `target`: every part that talks to NATS (the job store,
/// circuits, monitors, broadcast agents) connected, or the control plane would not have
/// started.
async fn delivers(cp: &ControlPlane, target: &Target) {
    let before = target.count();
    let response = client()
        .post(cp.url("/nats/login"))
        .header("Knocker-Host", target.host())
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", cp.log());
    target.wait_for(before + 1, WAIT).await;
}

/// `knocker serve` with `env`, which must stop it: its standard error.
fn refused(env: &[(&str, &str)]) -> String {
    start_refused(env, Duration::from_secs(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_and_password_or_a_token_in_the_address_log_in_and_are_never_shown() {
    let target = Target::ok().await;
    let nats = NatsServer::start_with(&format!(
        "authorization {{ user: knocker, password: \"{PASSWORD}\" }}"
    ));
    let store = address(&nats, "nats", &format!("knocker:{PASSWORD}@"));
    let cp = ControlPlane::start(&[("KNOCKER_STORE", store.as_str())]);
    delivers(&cp, &target).await;
    assert!(!cp.log().contains(PASSWORD), "the password is in the log");

    // Without the login, or with another password: refused, the server named, the
    // password not.
    let wrong = address(&nats, "nats", "knocker:not-the-password@");
    for store in [nats.url.as_str(), wrong.as_str()] {
        let stderr = refused(&[("KNOCKER_STORE", store)]);
        assert!(stderr.contains(&nats.url), "{stderr}");
        assert!(stderr.contains("authorization"), "{stderr}");
        assert!(!stderr.contains("not-the-password"), "{stderr}");
    }

    // A malformed address is named, its password not.
    let malformed = format!(
        "{}/jobs",
        address(&nats, "nats", &format!("knocker:{PASSWORD}@"))
    );
    let stderr = refused(&[("KNOCKER_STORE", malformed.as_str())]);
    assert!(stderr.contains("KNOCKER_STORE"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");

    let nats = NatsServer::start_with(&format!("authorization {{ token: \"{PASSWORD}\" }}"));
    let store = address(&nats, "nats", &format!("{PASSWORD}@"));
    let cp = ControlPlane::start(&[("KNOCKER_STORE", store.as_str())]);
    delivers(&cp, &target).await;
    assert!(!cp.log().contains(PASSWORD), "the token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_checked_against_the_given_authority_and_a_client_certificate_is_shown() {
    let target = Target::ok().await;
    let server = TestCert::new(&["127.0.0.1"]);
    let client_cert = TestCert::new(&["knocker-control-plane"]);
    let path = |p: &std::path::Path| p.display().to_string();
    let nats = NatsServer::start_with(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true, timeout: 5 }}",
        path(&server.cert_path),
        path(&server.key_path),
        path(&client_cert.cert_path),
    ));
    let store = address(&nats, "tls", "");
    let (ca, cert, key) = (
        path(&server.cert_path),
        path(&client_cert.cert_path),
        path(&client_cert.key_path),
    );
    let cp = ControlPlane::start(&[
        ("KNOCKER_STORE", store.as_str()),
        ("KNOCKER_NATS_CA", ca.as_str()),
        ("KNOCKER_NATS_CERT", cert.as_str()),
        ("KNOCKER_NATS_KEY", key.as_str()),
    ]);
    delivers(&cp, &target).await;

    // A server this authority did not sign, or no certificate of ours: refused.
    let stranger = TestCert::new(&["127.0.0.1"]);
    let other_ca = path(&stranger.cert_path);
    for env in [
        vec![
            ("KNOCKER_STORE", store.as_str()),
            ("KNOCKER_NATS_CA", other_ca.as_str()),
            ("KNOCKER_NATS_CERT", cert.as_str()),
            ("KNOCKER_NATS_KEY", key.as_str()),
        ],
        vec![
            ("KNOCKER_STORE", store.as_str()),
            ("KNOCKER_NATS_CA", ca.as_str()),
        ],
    ] {
        let stderr = refused(&env);
        assert!(stderr.contains(&store), "{stderr}");
        assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    }
    // A file that is not what its variable says: named before anything is tried.
    let stderr = refused(&[
        ("KNOCKER_STORE", store.as_str()),
        ("KNOCKER_NATS_CA", key.as_str()),
    ]);
    assert!(stderr.contains("KNOCKER_NATS_CA"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_user_logs_in_with_its_credentials_file_and_an_nkey_with_its_seed() {
    let target = Target::ok().await;
    let dir = temp_dir("nats-login");

    // NATS accounts (operator mode): the user's JWT and seed.
    let accounts = Accounts::new();
    let nats = NatsServer::start_with(&accounts.conf);
    let creds = dir.join("knocker.creds");
    std::fs::write(&creds, &accounts.creds).unwrap();
    let creds = creds.display().to_string();
    let cp = ControlPlane::start(&[
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_NATS_CREDS", creds.as_str()),
    ]);
    delivers(&cp, &target).await;
    // Another operator's user is not one of this server's.
    let stranger = dir.join("stranger.creds");
    std::fs::write(&stranger, Accounts::new().creds).unwrap();
    let stranger = stranger.display().to_string();
    for env in [
        vec![("KNOCKER_STORE", nats.url.as_str())],
        vec![
            ("KNOCKER_STORE", nats.url.as_str()),
            ("KNOCKER_NATS_CREDS", stranger.as_str()),
        ],
    ] {
        let stderr = refused(&env);
        assert!(stderr.contains(&nats.url), "{stderr}");
    }

    // A user known by its NKey: the seed signs the server's challenge.
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let seed = dir.join("knocker.nk");
    let seed_text = user.seed().unwrap();
    std::fs::write(&seed, format!("{seed_text}\n")).unwrap();
    let seed = seed.display().to_string();
    let cp = ControlPlane::start(&[
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_NATS_NKEY", seed.as_str()),
    ]);
    delivers(&cp, &target).await;
    assert!(!cp.log().contains(&seed_text), "the seed is in the log");
    let other = dir.join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let other = other.display().to_string();
    let stderr = refused(&[
        ("KNOCKER_STORE", nats.url.as_str()),
        ("KNOCKER_NATS_NKEY", other.as_str()),
    ]);
    assert!(stderr.contains("authorization"), "{stderr}");
}
