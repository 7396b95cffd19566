//! Signed deliveries (Standard Webhooks) as receivers see them: checked here by a second
//! implementation (HMAC-SHA256 written out over SHA-256), secrets rotating without a
//! gap, a retry keeping its `webhook-id`, `knocker verify` on a saved request, and no
//! signature a client could obtain for a destination it chose.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use knocker_e2e::{knocker_bin, ControlPlane, Received, Reply, Target};

use crate::{client, write_config, WAIT};

pub(crate) const OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NEW: &str = "whsec_c2Vjb25kIHNlY3JldCBvZiAzMiBieXRlcyEhIQ==";
const GROUP: &str = "whsec_Z3JvdXAgc2VjcmV0IG9mIHRoaXJ0eS10d28gYnl0ZXM=";

/// HMAC-SHA256 (RFC 2104) over SHA-256, independent of the control plane's code.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use ring::digest::{digest, SHA256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(digest(&SHA256, key).as_ref());
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let mut inner = pad(0x36);
    inner.extend_from_slice(message);
    let inner = digest(&SHA256, &inner);
    let mut outer = pad(0x5c);
    outer.extend_from_slice(inner.as_ref());
    digest(&SHA256, &outer).as_ref().to_vec()
}

/// Whether `request` carries a valid `v1` signature by `secret` (the receiver's check:
/// id, timestamp within 5 minutes, any entry matching).
pub(crate) fn verifies(request: &Received, secret: &str) -> bool {
    let (Some(id), Some(ts), Some(sigs)) = (
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
        request.header("webhook-signature"),
    ) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts_n: u64 = ts.parse().expect("a timestamp in seconds");
    assert!(
        now.abs_diff(ts_n) < 300,
        "timestamp {ts} far from now {now}"
    );
    let key = STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    let mut content = format!("{id}.{ts}.").into_bytes();
    content.extend_from_slice(&request.body);
    let expected = format!("v1,{}", STANDARD.encode(hmac_sha256(&key, &content)));
    sigs.split(' ').any(|s| s == expected)
}

#[test]
fn the_test_hmac_matches_the_specifications_example() {
    let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let mac = hmac_sha256(
        &key,
        br#"msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.{"test": 2432232314}"#,
    );
    assert_eq!(
        STANDARD.encode(mac),
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_verify_deliveries_and_rotation_needs_no_gap() {
    // The first attempt fails: the retry must carry the same webhook-id.
    let signed = Target::start(|_, n| Reply::status(if n == 0 { 500 } else { 200 })).await;
    let member = Target::ok().await;
    let chosen = Target::ok().await;
    let config = write_config(&format!(
        r#"
        [groups.hooks]
        members = ["http://{member}"]
        [signing]
        hosts."{signed}" = ["env:SIG_OLD", "env:SIG_NEW"]
        groups.hooks = ["file:{group_file}"]
        "#,
        member = member.host(),
        signed = signed.host(),
        group_file = {
            let path = knocker_e2e::temp_dir("secrets").join("group");
            std::fs::write(&path, format!("{GROUP}\n")).unwrap();
            path.display().to_string()
        },
    ));
    let cp = ControlPlane::start(&[
        ("KNOCKER_CONFIG", config.as_str()),
        ("SIG_OLD", OLD),
        ("SIG_NEW", NEW),
        ("KNOCKER_SIGNING_SECRETS", NEW),
        ("RETRIES_BACKOFF_FACTOR", "0.1"),
    ]);

    // A Knocker job to a target with secrets of its own: both sign it.
    let response = client()
        .post(cp.url("/hook"))
        .header("Knocker-Host", signed.host())
        .header("Knocker-Retries", "3")
        .body(r#"{"event":"order.paid","n":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["knocker-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let got = signed.wait_for(2, WAIT).await;
    for request in &got {
        assert_eq!(request.header("webhook-id").as_deref(), Some(id.as_str()));
        assert!(verifies(request, OLD), "the old secret still verifies");
        assert!(verifies(request, NEW), "the new secret verifies");
        assert!(!verifies(request, GROUP));
        assert_eq!(
            request.header_all("webhook-signature")[0]
                .split(' ')
                .count(),
            2
        );
    }

    // A broadcast copy to a member: the group's secret signs it, alone.
    let response = client()
        .post(cp.url("/purge"))
        .header("Knocker-Broadcast", "hooks")
        .body("purge")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let copy = &member.wait_for(1, WAIT).await[0];
    assert!(verifies(copy, GROUP), "{copy:?}");
    assert!(!verifies(copy, NEW));

    // A destination the client chose, without secrets of its own: the default secret
    // is not lent to it (the client could replay the signature elsewhere).
    let response = client()
        .post(cp.url("/x"))
        .header("Knocker-Host", chosen.host())
        .header("webhook-signature", "v1,forwarded-as-is")
        .body("mine")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let plain = &chosen.wait_for(1, WAIT).await[0];
    assert_eq!(plain.header("webhook-id"), None);
    assert_eq!(
        plain.header_all("webhook-signature"),
        ["v1,forwarded-as-is"],
        "a client's own header passes untouched when we do not sign"
    );

    // `knocker verify` on the request as saved by the receiver.
    let saved = knocker_e2e::temp_dir("saved").join("request.http");
    let mut raw = format!("{} {} HTTP/1.1\r\n", got[1].method, got[1].target).into_bytes();
    for (name, value) in &got[1].headers {
        raw.extend_from_slice(name.as_bytes());
        raw.extend_from_slice(b": ");
        raw.extend_from_slice(value);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(&got[1].body);
    std::fs::write(&saved, &raw).unwrap();
    let verify = |secret: &str| {
        std::process::Command::new(knocker_bin())
            .args(["verify", "--secret", secret])
            .arg(&saved)
            .output()
            .unwrap()
    };
    let ok = verify(OLD);
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid"));
    let bad = verify(GROUP);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no signature"),
        "{bad:?}"
    );
    // The API and the log never show a secret.
    let job = crate::get_json(cp.url(&format!("/knocker/jobs/{id}"))).await;
    let log = cp.log();
    for secret in [OLD, NEW, GROUP] {
        let bare = secret.trim_start_matches("whsec_");
        assert!(!job.to_string().contains(bare));
        assert!(!log.contains(bare), "a secret in the log");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}
