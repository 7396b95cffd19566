//! The stack tried as an attacker would, with network access to Envoy's listener or the
//! control plane's doors and no token: client-chosen destinations, the API, the gRPC
//! door, ids, numbers, connections, a damaged store. Each test fails without its fix.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use knocker_e2e::{
    eventually, ControlPlane, DnsServer, Envoy, EnvoyOptions, Reply, Target, TestCert,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{client, get_json, WAIT};

/// A control plane with the outbound policy as shipped (loopback closed).
fn strict(extra: &[(&str, &str)]) -> ControlPlane {
    let mut env = vec![("KNOCKER_OUTBOUND_ALLOW", "")];
    env.extend_from_slice(extra);
    ControlPlane::start(&env)
}

async fn knock(cp: &ControlPlane, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = client().post(cp.url("/x")).body("payload");
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Waits until job `id` is finished; returns it as the API shows it.
async fn finished(cp: &ControlPlane, id: &str, token: &str) -> Value {
    let url = cp.url(&format!("/knocker/jobs/{id}"));
    let deadline = Instant::now() + WAIT;
    loop {
        let job: Value = client()
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] == "failed" || job["state"] == "delivered" {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never finished: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Envoy with `envoy/knocker.yaml` in front of `cp` (and `plugin`, the plugin config,
/// when given).
fn start_envoy(cp: &ControlPlane, upstream: &Target, plugin: Option<&str>) -> Envoy {
    Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            plugin_config: plugin.map(str::to_owned),
            ..EnvoyOptions::default()
        },
    )
}

fn first_error(job: &Value) -> String {
    job["attempts"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_targets_cannot_reach_loopback_or_metadata_by_address_or_by_name() {
    let target = Target::ok().await;
    let dns = DnsServer::start().await;
    dns.set("inside.test", &[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    dns.set(
        "metadata.test",
        &[IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254))],
    );
    dns.set("mapped.test", &["::ffff:127.0.0.1".parse().unwrap()]);
    let dns_addr = dns.addr.to_string();
    let cp = strict(&[("KNOCKER_DNS_SERVER", &dns_addr)]);
    let port = target.port();
    let cases = [
        ("loop-literal", format!("127.0.0.1:{port}"), "loopback"),
        ("loop-decimal", format!("2130706433:{port}"), "loopback"),
        ("loop-v6", format!("[::1]:{port}"), "loopback"),
        ("meta-literal", "169.254.169.254".to_owned(), "link-local"),
        ("loop-name", format!("inside.test:{port}"), "loopback"),
        ("meta-name", "metadata.test".to_owned(), "link-local"),
        ("mapped-name", format!("mapped.test:{port}"), "loopback"),
    ];
    for (id, host, _) in &cases {
        let (status, _) = knock(
            &cp,
            &[
                ("Knocker-Host", host),
                ("Knocker-Id", id),
                ("Knocker-Retries", "3"),
            ],
        )
        .await;
        assert_eq!(status, 200, "{id}: accepted, then refused when it is sent");
    }
    for (id, host, what) in &cases {
        let job = finished(&cp, id, "").await;
        assert_eq!(job["state"], "failed", "{id} ({host}): {job}");
        // Denied is final: one attempt, no retries spent on it.
        assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{id}: {job}");
        assert_eq!(job["attempts"][0]["status"], 403, "{id}: {job}");
        let error = first_error(&job);
        assert!(
            error.starts_with("denied: ") && error.contains(what),
            "{id}: {error}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(target.count(), 0, "nothing reached the loopback target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_member_is_trusted_but_its_redirect_away_is_not() {
    // A group member on loopback (the operator's own: trusted, loopback or not) that
    // redirects once to itself (same origin: still trusted) and then to another loopback
    // port (a hop the member chose, not the operator: the policy applies).
    let inside = Target::ok().await;
    let away = format!("http://{}/inside", inside.host());
    let member = Target::start(move |r, _| {
        if r.target == "/page" {
            Reply::status(307).with_header("location", "/page2")
        } else {
            Reply::status(307).with_header("location", &away)
        }
    })
    .await;
    let config = crate::write_config(&format!(
        "[groups.g]\nmembers = [\"http://{}\"]\nretries = 0\nmax_age_s = 0\n",
        member.host()
    ));
    let cp = strict(&[("KNOCKER_CONFIG", &config)]);
    let copy = client()
        .put(cp.url("/page"))
        .header("Knocker-Broadcast", "g")
        .header("Knocker-Id", "page")
        .send()
        .await
        .unwrap();
    assert_eq!(copy.status(), 200);
    let job = finished(&cp, "page.0", "").await;
    assert_eq!(job["state"], "failed", "{job}");
    let error = first_error(&job);
    assert!(
        error.starts_with("denied: ") && error.contains("loopback"),
        "{error}"
    );
    // The member got the request and its same-origin hop; the loopback target nothing.
    let got: Vec<String> = member.received().iter().map(|r| r.target.clone()).collect();
    assert!(
        got.contains(&"/page".to_owned()) && got.contains(&"/page2".to_owned()),
        "{got:?}"
    );
    assert_eq!(
        inside.count(),
        0,
        "the redirect away from the member was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_redirects_and_this_stacks_ports_are_checked_on_every_hop() {
    let outside = Target::ok().await;
    // The allowed host redirects a POST (307 keeps method and body) elsewhere.
    let elsewhere = format!("http://{}/stolen", outside.host());
    let redirector =
        Target::start(move |_, _| Reply::status(307).with_header("location", &elsewhere)).await;
    let failing = Target::start(|_, _| Reply::status(500)).await;
    let upstream = Target::ok().await;
    let probe_cp = ControlPlane::start(&[]);
    let envoy = start_envoy(&probe_cp, &upstream, None);
    let admin = envoy.admin_port.to_string();
    // Loopback opened, as `make run` does; HOSTS_ONLY names two targets; Envoy's admin
    // port is one of this stack's ports.
    let hosts_only = format!("{},{}", redirector.host(), failing.host());
    let cp = ControlPlane::start(&[
        ("HOSTS_ONLY", &hosts_only),
        ("KNOCKER_PROTECTED_PORTS", &admin),
    ]);

    // A redirect from an allowed host to one HOSTS_ONLY does not name.
    knock(
        &cp,
        &[
            ("Knocker-Host", &redirector.host()),
            ("Knocker-Id", "redirected"),
            ("Knocker-Retries", "0"),
        ],
    )
    .await;
    let job = finished(&cp, "redirected", "").await;
    assert!(first_error(&job).contains("HOSTS_ONLY"), "{job}");
    assert_eq!(redirector.count(), 1);

    // A failure callback aimed at Envoy's admin (`/quitquitquit`) and one at a host
    // HOSTS_ONLY does not name.
    let quit = format!("http://127.0.0.1:{admin}/quitquitquit");
    let stray = format!("http://{}/cb", outside.host());
    for (id, callback) in [("cb-admin", &quit), ("cb-stray", &stray)] {
        knock(
            &cp,
            &[
                ("Knocker-Host", &failing.host()),
                ("Knocker-Id", id),
                ("Knocker-Retries", "0"),
                ("Knocker-Callback", callback),
            ],
        )
        .await;
        let callback_job = finished(&cp, &format!("{id}:callback"), "").await;
        assert_eq!(callback_job["state"], "failed", "{callback_job}");
        assert!(
            first_error(&callback_job).starts_with("denied: "),
            "{callback_job}"
        );
    }
    assert_eq!(
        outside.count(),
        0,
        "neither the redirect nor the callback got out"
    );
    // Envoy is still up: its admin was never reached.
    let ready = client()
        .get(envoy.url("/knocker/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_stacks_ports_stay_closed_when_loopback_is_open() {
    let upstream = Target::ok().await;
    let probe = ControlPlane::start(&[]);
    let envoy = start_envoy(&probe, &upstream, None);
    let admin = envoy.admin_port.to_string();
    let cp = ControlPlane::start(&[("KNOCKER_PROTECTED_PORTS", &admin)]);
    let cases = [
        ("admin", format!("127.0.0.1:{admin}")),
        ("own-http", format!("localhost:{}", cp.http_port)),
        ("own-grpc", format!("127.0.0.1:{}", cp.grpc_port)),
    ];
    for (id, host) in &cases {
        let (status, _) = knock(
            &cp,
            &[
                ("Knocker-Host", host),
                ("Knocker-Id", id),
                ("Knocker-Retries", "0"),
            ],
        )
        .await;
        assert_eq!(status, 200);
    }
    // A failure callback to Envoy's admin (`/quitquitquit` would stop it).
    let failing = Target::start(|_, _| Reply::status(500)).await;
    let quit = format!("http://localhost:{admin}/quitquitquit");
    knock(
        &cp,
        &[
            ("Knocker-Host", &failing.host()),
            ("Knocker-Id", "quit"),
            ("Knocker-Retries", "0"),
            ("Knocker-Callback", &quit),
        ],
    )
    .await;
    for id in cases.iter().map(|(id, _)| *id).chain(["quit:callback"]) {
        let job = finished(&cp, id, "").await;
        assert!(
            first_error(&job).contains("port of this stack"),
            "{id}: {job}"
        );
    }
    let alive = client()
        .get(envoy.url("/knocker/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status(), 200, "Envoy is still up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_the_token_and_envoy_does_not_expose_the_api() {
    let cp = ControlPlane::start(&[("KNOCKER_ADMIN_TOKEN", "t0ken")]);
    let routes = [
        ("GET", "/knocker/jobs"),
        ("GET", "/knocker/jobs?state=pending"),
        ("GET", "/knocker/jobs/some-id"),
        ("DELETE", "/knocker/jobs/some-id"),
        ("POST", "/knocker/jobs/some-id/replay"),
        ("POST", "/knocker/jobs/replay"),
        ("GET", "/knocker/broadcasts/b"),
        ("GET", "/knocker/groups"),
        ("GET", "/knocker/monitors"),
        ("POST", "/knocker/monitors"),
        ("GET", "/knocker/monitors/m"),
        ("PUT", "/knocker/monitors/m"),
        ("DELETE", "/knocker/monitors/m"),
        ("GET", "/knocker/no-such-route"),
    ];
    for (method, path) in routes {
        for auth in [None, Some("Bearer wrong"), Some("t0ken")] {
            let mut request = client().request(method.parse().unwrap(), cp.url(path));
            if let Some(a) = auth {
                request = request.header("authorization", a);
            }
            let status = request.send().await.unwrap().status();
            assert_eq!(status, 401, "{method} {path} with {auth:?}");
        }
        let with = client()
            .request(method.parse().unwrap(), cp.url(path))
            .bearer_auth("t0ken")
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status();
        assert_ne!(with, 401, "{method} {path} with the token");
    }
    let status = client()
        .get(cp.url("/knocker/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200, "the status URL needs no token");

    // Through the shipped Envoy config the API is not routed at all.
    let upstream = Target::ok().await;
    let envoy = start_envoy(&cp, &upstream, None);
    let jobs = client()
        .get(envoy.url("/knocker/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(jobs.status(), 200, "the upstream answers, not the API");
    assert_eq!(upstream.count(), 1);
    let status: Value = get_json(envoy.url("/knocker/status")).await;
    assert_eq!(status["status"], true);
}

#[test]
fn a_public_address_without_a_token_does_not_start() {
    let out = std::process::Command::new(knocker_e2e::knocker_bin())
        .arg("serve")
        .env("KNOCKER_HTTP_ADDR", "0.0.0.0:0")
        .env("KNOCKER_GRPC_ADDR", "127.0.0.1:0")
        .env("KNOCKER_DATA_DIR", knocker_e2e::temp_dir("public"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("KNOCKER_ADMIN_TOKEN"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_door_refuses_forged_submissions_and_the_filter_authenticates() {
    use knocker_proto::v1::ingress_client::IngressClient;
    use knocker_proto::v1::{Header, Mode, RulePolicy as DeliveryPolicy, SubmitRequest};

    let target = Target::ok().await;
    let cp = ControlPlane::start(&[("KNOCKER_GRPC_TOKEN", "filter-secret")]);
    let forged = SubmitRequest {
        method: "POST".into(),
        scheme: "http".into(),
        authority: "victim".into(),
        path: "/forged".into(),
        headers: vec![Header {
            name: b"knocker-id".to_vec(),
            value: b"forged".to_vec(),
        }],
        body: b"x".to_vec(),
        mode: Mode::Capture as i32,
        rule: "made-up".into(),
        policy: Some(DeliveryPolicy {
            target: format!("http://{}", target.host()),
            max_age_s: 60,
            timeout_s: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut grpc = IngressClient::connect(format!("http://127.0.0.1:{}", cp.grpc_port))
        .await
        .unwrap();
    let refused = grpc.submit(forged.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(forged.clone());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().unwrap());
    assert_eq!(
        grpc.submit(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(target.count(), 0, "nothing forged was delivered");
    let stored = client()
        .get(cp.url("/knocker/jobs/forged"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(stored, 404, "nothing forged was stored");

    // The filter with the same secret in its plugin config gets through.
    let upstream = Target::ok().await;
    let envoy = start_envoy(
        &cp,
        &upstream,
        Some(
            r#"{"cluster":"knocker_control_plane","timeout_ms":2000,"grpc_token":"filter-secret"}"#,
        ),
    );
    let ok = client()
        .post(envoy.url("/through"))
        .header("Knocker-Host", target.host())
        .body("real")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    target.wait_for(1, WAIT).await;
    // Without it, the filter's submissions are refused: 503, never a receipt.
    let other = start_envoy(&cp, &upstream, None);
    let refused = client()
        .post(other.url("/through"))
        .header("Knocker-Host", target.host())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_cannot_be_squatted_and_a_duplicate_id_reveals_nothing() {
    let target = Target::ok().await;
    let cp = ControlPlane::start(&[("KNOCKER_DELIVERY", "off")]);
    let host = target.host();
    let (status, _) = knock(
        &cp,
        &[
            ("Knocker-Host", &host),
            ("Knocker-Id", "victim-job"),
            ("Authorization", "Bearer victims-secret"),
            ("X-Private", "victims-data"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let (status, receipt) = knock(
        &cp,
        &[
            ("Knocker-Host", "attacker.example"),
            ("Knocker-Id", "victim-job"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{receipt}");
    let text = receipt.to_string();
    for secret in ["victims-secret", "victims-data", &host] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }

    for id in [
        "victim-job:callback",
        "victim-job.1",
        "monitor.api.1.1.hook",
    ] {
        let (status, body) = knock(&cp, &[("Knocker-Host", &host), ("Knocker-Id", id)]).await;
        assert_eq!(status, 400, "{id:?}: {body}");
        assert!(body["errors"]["knocker-id"].is_array(), "{id:?}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_numbers_are_refused_where_they_enter() {
    // Environment.
    for (var, value) in [
        ("TIMEOUT_MAX", "1e300"),
        ("RETRIES_BACKOFF_FACTOR_MAX", "1e300"),
    ] {
        let out = std::process::Command::new(knocker_e2e::knocker_bin())
            .arg("serve")
            .env(var, value)
            .env("KNOCKER_DATA_DIR", knocker_e2e::temp_dir("bounds"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(var), "{var}: {text}");
    }
    // The TOML file.
    for (table, field) in [
        (
            "[groups.g]\nmembers = [\"http://a\"]\ntimeout_s = 1e300\n",
            "groups.g.timeout_s",
        ),
        (
            "[groups.g]\nmembers = [\"http://a\"]\nmax_age_s = 300000000000\n",
            "groups.g.max_age_s",
        ),
        (
            "[monitors.m]\nurl = \"http://a/\"\ninterval_s = 1e300\n",
            "monitors.m.interval_s",
        ),
        (
            "[monitors.m]\nurl = \"http://a/\"\ntimeout_s = 1e300\n",
            "monitors.m.timeout_s",
        ),
    ] {
        let path = crate::write_config(table);
        let out = std::process::Command::new(knocker_e2e::knocker_bin())
            .arg("serve")
            .env("KNOCKER_CONFIG", &path)
            .env("KNOCKER_DATA_DIR", knocker_e2e::temp_dir("bounds"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains(field),
            "{field}: {text}"
        );
    }
    // The plugin config: Envoy refuses to load the filter with it.
    let rule = r#"{"rules":[{"name":"r","match":{"path_prefix":"/"},"mode":"capture","delivery":{"target":"http://a","timeout_s":1e300}}]}"#;
    let e = knocker_filter::config::PluginConfig::parse(rule.as_bytes()).unwrap_err();
    assert!(e.contains("delivery.timeout_s"), "{e}");

    let cp = ControlPlane::start(&[("KNOCKER_GRPC_TOKEN", "s")]);
    // gRPC, with the right token: the policy's number is named.
    use knocker_proto::v1::ingress_client::IngressClient;
    use knocker_proto::v1::{Mode, RulePolicy as DeliveryPolicy, SubmitReply, SubmitRequest};
    let mut grpc = IngressClient::connect(format!("http://127.0.0.1:{}", cp.grpc_port))
        .await
        .unwrap();
    for (policy, field) in [
        (
            DeliveryPolicy {
                target: "http://a".into(),
                max_age_s: 60,
                timeout_s: 1e300,
                ..Default::default()
            },
            "timeout_s",
        ),
        (
            DeliveryPolicy {
                target: "http://a".into(),
                max_age_s: 300_000_000_000,
                timeout_s: 1.0,
                ..Default::default()
            },
            "max_age_s",
        ),
        (
            DeliveryPolicy {
                target: "http://a".into(),
                max_age_s: 60,
                timeout_s: 1.0,
                backoff_factor: 1e300,
                ..Default::default()
            },
            "backoff_factor",
        ),
    ] {
        let mut request = tonic::Request::new(SubmitRequest {
            method: "POST".into(),
            path: "/".into(),
            mode: Mode::Capture as i32,
            rule: "r".into(),
            policy: Some(policy),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer s".parse().unwrap());
        let reply: SubmitReply = grpc.submit(request).await.unwrap().into_inner();
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        assert_eq!(reply.status, 400, "{field}: {body}");
        assert!(body.contains(field), "{field}: {body}");
    }
    // Headers and the API.
    let (status, body) = knock(
        &cp,
        &[("Knocker-Host", "a.example"), ("Knocker-Timeout", "1e300")],
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["errors"]["knocker-timeout"].is_array(), "{body}");
    for field in ["interval_s", "timeout_s"] {
        let response = client()
            .post(cp.url("/knocker/monitors"))
            .json(&json!({"name": "m", "url": "http://a.example/", field: 1e300}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body.to_string().contains(field), "{field}: {body}");
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_across_distinct_timeouts() {
    const N: usize = 2000;
    let target = Target::ok().await;
    let cp = ControlPlane::start(&[("TIMEOUT_MAX", "60")]);
    let host = target.host();
    let send = |i: usize| {
        let request = client()
            .post(cp.url("/t"))
            .header("Knocker-Host", &host)
            // A distinct value each time: 1.0001, 1.0002, …
            .header(
                "Knocker-Timeout",
                format!("{:.4}", 1.0 + i as f64 / 10_000.0),
            );
        async move { request.send().await.unwrap().status().as_u16() }
    };
    for i in 0..100 {
        assert_eq!(send(i).await, 200);
    }
    target.wait_for(100, WAIT).await;
    let before = rss_kib(cp.pid().unwrap());
    for chunk in (100..N).collect::<Vec<_>>().chunks(50) {
        let statuses = futures_util::future::join_all(chunk.iter().map(|&i| send(i))).await;
        assert!(statuses.iter().all(|s| *s == 200));
    }
    target.wait_for(N, Duration::from_secs(60)).await;
    let after = rss_kib(cp.pid().unwrap());
    eprintln!(
        "control plane RSS: {before} KiB after 100 jobs, {after} KiB after {N} distinct timeouts"
    );
    // One HTTP client per timeout value grew this by ~125 KiB a value (~230 MiB here).
    assert!(
        after < before + 40 * 1024,
        "RSS grew from {before} KiB to {after} KiB over {N} distinct timeouts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_idle_connections_are_closed_in_time_on_both_doors() {
    let cp = ControlPlane::start(&[
        ("KNOCKER_HEADER_TIMEOUT", "1s"),
        ("KNOCKER_BODY_TIMEOUT", "1s"),
        ("KNOCKER_IDLE_TIMEOUT", "2s"),
    ]);
    /// Reads until the peer closes; how long that took (bounded by 10 s).
    async fn closed_after(stream: &mut tokio::net::TcpStream) -> (Duration, Vec<u8>) {
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), got),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => panic!("connection still open after 10 s"),
            }
        }
    }
    let connect = |port: u16| tokio::net::TcpStream::connect(("127.0.0.1", port));

    // HTTP: half a header.
    let mut s = connect(cp.http_port).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nKnocker-Ho")
        .await
        .unwrap();
    let (took, _) = closed_after(&mut s).await;
    assert!(
        took < Duration::from_secs(4),
        "half a header: closed after {took:?}"
    );

    // HTTP: nothing at all.
    let mut s = connect(cp.http_port).await.unwrap();
    let (took, _) = closed_after(&mut s).await;
    assert!(
        took < Duration::from_secs(4),
        "silent: closed after {took:?}"
    );

    // HTTP: a body that stops half way: 408, then closed.
    let mut s = connect(cp.http_port).await.unwrap();
    s.write_all(
        b"POST /x HTTP/1.1\r\nHost: a\r\nKnocker-Host: t.example\r\nContent-Length: 10\r\n\r\nab",
    )
    .await
    .unwrap();
    let (took, answer) = closed_after(&mut s).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        took < Duration::from_secs(4),
        "stalled body: closed after {took:?}"
    );

    // gRPC: a connection that never sends its preface.
    let mut s = connect(cp.grpc_port).await.unwrap();
    let (took, _) = closed_after(&mut s).await;
    assert!(
        took < Duration::from_secs(5),
        "gRPC silent: closed after {took:?}"
    );
    // gRPC: half a preface.
    let mut s = connect(cp.grpc_port).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (took, _) = closed_after(&mut s).await;
    assert!(
        took < Duration::from_secs(5),
        "gRPC half preface: closed after {took:?}"
    );

    // A live filter connection is not idle: Envoy answers the control plane's pings.
    let target = Target::ok().await;
    let upstream = Target::ok().await;
    let envoy = start_envoy(&cp, &upstream, None);
    let send = || {
        client()
            .post(envoy.url("/live"))
            .header("Knocker-Host", target.host())
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    crate::wait_for_stream(&envoy).await;
    let opened = crate::grpc_stat(&envoy, "upstream_cx_total");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(
        crate::grpc_stat(&envoy, "upstream_cx_total"),
        opened,
        "the filter's connection was kept past the idle deadline"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_is_refused_when_it_opens() {
    let target = Target::ok().await;
    let mut cp = ControlPlane::start(&[("KNOCKER_DELIVERY", "off")]);
    for i in 0..300 {
        let id = format!("job-{i}");
        let body = "x".repeat(2000);
        let status = client()
            .post(cp.url("/d"))
            .header("Knocker-Host", target.host())
            .header("Knocker-Id", id)
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }
    assert!(cp.terminate(), "clean stop");
    let db = cp.dir.join("data").join("knocker.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} bytes", bytes.len());
    // Junk over pages in the middle of the file (page 1, the header, left intact).
    for b in &mut bytes[16 * 1024..48 * 1024] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let out = std::process::Command::new(knocker_e2e::knocker_bin())
        .arg("serve")
        .env("KNOCKER_HTTP_ADDR", "127.0.0.1:0")
        .env("KNOCKER_GRPC_ADDR", "127.0.0.1:0")
        .env("KNOCKER_DATA_DIR", cp.dir.join("data"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a damaged database: {text}"
    );
    assert!(
        text.contains("knocker.db") && text.contains("damaged"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_monitors_are_client_chosen_limited_in_number_and_quote_little() {
    let internal =
        Target::start(|_, _| Reply::status(200).with_body(br#"{"secret":"internal-document"}"#))
            .await;
    let cp = strict(&[
        ("KNOCKER_MAX_MONITORS", "2"),
        ("KNOCKER_MONITOR_MIN_INTERVAL", "0.2"),
    ]);
    let create = |name: &str, url: String, interval: f64| {
        client()
            .post(cp.url("/knocker/monitors"))
            .json(&json!({
                "name": name, "url": url, "interval_s": interval,
                "conditions": [{"json_pointer": "", "equals": "up"}],
            }))
            .send()
    };
    let inside = format!("http://{}/", internal.host());
    assert_eq!(
        create("inside", inside.clone(), 0.2)
            .await
            .unwrap()
            .status(),
        201
    );
    let denied = eventually(WAIT, || async {
        let m = get_json(cp.url("/knocker/monitors/inside")).await;
        m["last"]["failed_condition"]
            .as_str()
            .is_some_and(|r| r.contains("denied"))
    })
    .await;
    assert!(
        denied,
        "{}",
        get_json(cp.url("/knocker/monitors/inside")).await
    );
    assert_eq!(
        internal.count(),
        0,
        "the API monitor never reached loopback"
    );
    assert_eq!(
        create("second", inside.clone(), 0.2)
            .await
            .unwrap()
            .status(),
        201
    );
    let third = create("third", inside.clone(), 0.2).await.unwrap();
    assert_eq!(third.status(), 429);
    let too_fast = client()
        .post(cp.url("/knocker/monitors"))
        .json(&json!({"name": "fast", "url": inside, "interval_s": 0.1}))
        .send()
        .await
        .unwrap();
    assert_eq!(too_fast.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_are_verified_against_the_systems_trust_store() {
    // Two HTTPS targets named localhost: one with the certificate this machine's trust
    // store holds (SSL_CERT_FILE, as the system's store is read), one with another,
    // equally self-signed.
    let trusted = TestCert::new(&["localhost"]);
    let stranger = TestCert::new(&["localhost"]);
    let good = Target::start_tls(&trusted, |_, _| Reply::status(200).with_body(b"ok")).await;
    let impostor = Target::start_tls(&stranger, |_, _| Reply::status(200)).await;
    let cp = ControlPlane::start(&[("SSL_CERT_FILE", trusted.cert_path.to_str().unwrap())]);
    for (id, target) in [("tls-good", &good), ("tls-impostor", &impostor)] {
        let host = format!("localhost:{}", target.port());
        let (status, body) = knock(
            &cp,
            &[
                ("Knocker-Host", &host),
                ("Knocker-Scheme", "https"),
                ("Knocker-Retries", "0"),
                ("Knocker-Id", id),
            ],
        )
        .await;
        assert_eq!(status, 200, "{id}: {body}");
    }
    let delivered = finished(&cp, "tls-good", "").await;
    assert_eq!(delivered["state"], "delivered", "{delivered}");
    let got = good.wait_for(1, WAIT).await;
    assert_eq!(
        (got[0].method.as_str(), got[0].target.as_str()),
        ("POST", "/x")
    );
    assert_eq!(got[0].body, b"payload");
    assert_eq!(
        got[0].header("host").as_deref(),
        Some(&*format!("localhost:{}", good.port()))
    );
    // The impostor's certificate is refused in the handshake: nothing reaches it, and
    // the attempt says why.
    let refused = finished(&cp, "tls-impostor", "").await;
    assert_eq!(refused["state"], "failed", "{refused}");
    let error = first_error(&refused);
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert_eq!(impostor.count(), 0);
}
