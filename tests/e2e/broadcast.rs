//! Broadcast through the real Envoy: a DNS group answered by a DNS server on loopback
//! (members on 127.0.0.1–4, one stopped for a while), and the loop guard with a group
//! whose member is the Envoy itself (`envoy/broadcast.yaml`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use knocker_e2e::{
    free_port, knocker_bin, ControlPlane, DnsServer, Envoy, EnvoyOptions, Reply, Target,
};
use serde_json::Value;

use crate::{client, get_json, write_config, WAIT};

fn loopback(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn member(last: u8, port: u16) -> Target {
    Target::start_at(loopback(last, port), |_, _| Reply::status(200)).await
}

/// Sends message `i` with `Knocker-Broadcast: web`; returns the receipt.
async fn broadcast(url: String, i: usize) -> Value {
    let response = client()
        .post(url)
        .header("Knocker-Broadcast", "web")
        .header("x-seq", i.to_string())
        .body(format!("message {i}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["knocker-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let receipt: Value = response.json().await.unwrap();
    assert_eq!(receipt["status"], true);
    assert_eq!(receipt["broadcast"]["id"], id.as_str());
    assert_eq!(receipt["broadcast"]["group"], "web");
    receipt
}

fn members_of(receipt: &Value) -> Vec<String> {
    receipt["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["member"].as_str().unwrap().to_owned())
        .collect()
}

/// What a member got: the messages in arrival order, each with its broadcast copy id.
fn messages(target: &Target) -> Vec<(String, String)> {
    target
        .received()
        .into_iter()
        .map(|r| {
            assert_eq!(r.header("x-knocker-broadcast").as_deref(), Some("web"));
            let id = r.header("x-knocker-id").unwrap();
            (String::from_utf8(r.body).unwrap(), id)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_broadcast_reaches_every_member_and_a_stopped_one_catches_up_in_order() {
    let dns = DnsServer::start().await;
    let port = free_port();
    dns.set("web.knocker.test", &[ip(1), ip(2), ip(3)]);
    let config = write_config(&format!(
        "[groups.web]\ndns = \"web.knocker.test\"\nport = {port}\nmax_age_s = 120\n\
         backoff_factor = 0.2\nmax_backoff_s = 1\ntimeout_s = 2\n"
    ));
    let cp = ControlPlane::start(&[
        ("KNOCKER_CONFIG", &config),
        ("KNOCKER_DNS_SERVER", &dns.addr.to_string()),
    ]);
    let upstream = Target::ok().await;
    let envoy = Envoy::start(
        "knocker.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            ..EnvoyOptions::default()
        },
    );
    let one = member(1, port).await;
    let three = member(3, port).await; // member 2 is stopped

    const N: usize = 5;
    let mut receipts = Vec::new();
    for i in 0..N {
        receipts.push(broadcast(envoy.url(&format!("/msg/{i}?x=1")), i).await);
    }
    let expected_members: Vec<String> = [1, 2, 3]
        .iter()
        .map(|n| format!("http://{}", loopback(*n, port)))
        .collect();
    assert_eq!(members_of(&receipts[0]), expected_members);
    let ids: Vec<String> = receipts
        .iter()
        .map(|r| r["broadcast"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(receipts[0]["members"][2]["id"], format!("{}.2", ids[0]));

    // The live members get every message at once, in order; the dead one delays nobody.
    one.wait_for(N, WAIT).await;
    three.wait_for(N, WAIT).await;
    for (target, index) in [(&one, 0), (&three, 2)] {
        let got = messages(target);
        let want: Vec<(String, String)> = (0..N)
            .map(|i| (format!("message {i}"), format!("{}.{index}", ids[i])))
            .collect();
        assert_eq!(got, want);
        let first = &target.received()[0];
        assert_eq!(first.method, "POST");
        assert_eq!(first.target, "/msg/0?x=1");
        assert_eq!(first.header("x-seq").as_deref(), Some("0"));
    }

    // The API shows each member; member 2 is retrying its first message, the rest wait.
    let status = get_json(cp.url(&format!("/knocker/broadcasts/{}", ids[0]))).await;
    assert_eq!(status["group"], "web");
    assert_eq!(status["members"][0]["state"], "delivered");
    assert_eq!(status["members"][1]["state"], "pending");
    assert!(status["members"][1]["attempts"].as_u64().unwrap() >= 1);
    let later = get_json(cp.url(&format!("/knocker/broadcasts/{}", ids[N - 1]))).await;
    assert_eq!(later["members"][1]["waiting_in_lane"], true, "{later}");
    // … and so does the CLI.
    let cli = std::process::Command::new(knocker_bin())
        .args(["broadcasts", "get", &ids[0], "--url", &cp.url("")])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{cli:?}");
    let table = String::from_utf8_lossy(&cli.stdout);
    assert!(
        table.contains(&expected_members[1]) && table.contains("delivered"),
        "{table}"
    );

    // Member 2 comes back: everything it missed arrives, in order.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let two = member(2, port).await;
    two.wait_for(N, WAIT).await;
    let want: Vec<(String, String)> = (0..N)
        .map(|i| (format!("message {i}"), format!("{}.1", ids[i])))
        .collect();
    assert_eq!(messages(&two), want);

    // Membership is read at fan-out time: a changed DNS answer is the new group.
    dns.set("web.knocker.test", &[ip(1), ip(4)]);
    let four = member(4, port).await;
    let receipt = broadcast(envoy.url("/msg/new"), N).await;
    assert_eq!(
        members_of(&receipt),
        [
            format!("http://{}", loopback(1, port)),
            format!("http://{}", loopback(4, port))
        ]
    );
    four.wait_for(1, WAIT).await;
    one.wait_for(N + 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(two.count(), N, "no longer a member");
    assert_eq!(three.count(), N, "no longer a member");
    assert_eq!(
        upstream.count(),
        0,
        "broadcasts never reach the route's upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_guard_stops_a_broadcast_that_targets_ourselves() {
    // The group's only member is this Envoy: a copy comes back through the PURGE rule.
    let envoy_port = free_port();
    let config = write_config(&format!(
        "[groups.caches]\nmembers = [\"http://127.0.0.1:{envoy_port}\"]\npreserve_host = true\n\
         max_age_s = 60\n"
    ));
    let cp = ControlPlane::start(&[("KNOCKER_CONFIG", &config)]);
    let upstream = Target::ok().await;
    let envoy = Envoy::start(
        "broadcast.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            port: Some(envoy_port),
            ..EnvoyOptions::default()
        },
    );
    let response = client()
        .request(
            reqwest::Method::from_bytes(b"PURGE").unwrap(),
            envoy.url("/page?v=1"),
        )
        .header("host", "www.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let receipt: Value = response.json().await.unwrap();
    assert_eq!(receipt["members"].as_array().map(Vec::len), Some(1));

    // The copy reaches Envoy, is not broadcast again, and goes on to the upstream once.
    let got = upstream.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(upstream.count(), 1, "exactly one copy, no loop");
    assert_eq!(got[0].method, "PURGE");
    assert_eq!(got[0].target, "/page?v=1");
    assert_eq!(got[0].header("host").as_deref(), Some("www.example"));
    assert_eq!(
        got[0].header("x-knocker-broadcast").as_deref(),
        Some("caches")
    );
    let status = get_json(cp.url("/knocker/status")).await;
    assert_eq!(status["queue"]["delivered"], 1, "{status}");
    assert_eq!(status["queue"]["pending"], 0, "{status}");

    // A request that carries the marker is never broadcast, whatever door it uses.
    let copy = client()
        .post(cp.url("/x"))
        .header("Knocker-Broadcast", "caches")
        .header("x-knocker-broadcast", "caches")
        .send()
        .await
        .unwrap();
    assert_eq!(copy.status(), 406);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_submissions_are_validated_and_idempotent() {
    let a = Target::ok().await;
    let b = Target::ok().await;
    let config = write_config(&format!(
        "[groups.pair]\nmembers = [\"http://{}\", \"http://{}/base\"]\n",
        a.host(),
        b.host()
    ));
    let cp = ControlPlane::start(&[("KNOCKER_CONFIG", &config)]);
    let send = |headers: Vec<(&'static str, &'static str)>| {
        let mut request = client().put(cp.url("/item/1")).body("v1");
        for (n, v) in headers {
            request = request.header(n, v);
        }
        request.send()
    };
    let unknown = send(vec![("Knocker-Broadcast", "nope")]).await.unwrap();
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.json().await.unwrap();
    assert!(body["errors"]["knocker-broadcast"][0]
        .as_str()
        .unwrap()
        .contains("Groups: pair"));
    let mixed = send(vec![("Knocker-Broadcast", "pair"), ("Knocker-Host", "x")])
        .await
        .unwrap();
    assert_eq!(mixed.status(), 400);
    let body: Value = mixed.json().await.unwrap();
    assert!(body["errors"]["knocker-host"].is_array(), "{body}");

    let first = send(vec![("Knocker-Broadcast", "pair"), ("Knocker-Id", "inv-1")])
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    let again = send(vec![("Knocker-Broadcast", "pair"), ("Knocker-Id", "inv-1")])
        .await
        .unwrap();
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["members"], again["members"]);
    a.wait_for(1, WAIT).await;
    let got_b = b.wait_for(1, WAIT).await;
    assert_eq!(got_b[0].target, "/base/item/1");
    assert_eq!(got_b[0].header("x-knocker-id").as_deref(), Some("inv-1.1"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((a.count(), b.count()), (1, 1), "one copy each, not two");
    let groups = get_json(cp.url("/knocker/groups")).await;
    assert_eq!(
        groups["groups"]["pair"]["members"][1],
        format!("http://{}/base", b.host())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ban_purge_and_any_extension_method_go_through_every_shipped_config() {
    let one = Target::ok().await;
    let two = Target::ok().await;
    let config = write_config(&format!(
        "[groups.caches]\nmembers = [\"http://{}\", \"http://{}\"]\n",
        one.host(),
        two.host()
    ));
    let cp = ControlPlane::start(&[("KNOCKER_CONFIG", &config)]);
    let method = |name: &str| reqwest::Method::from_bytes(name.as_bytes()).unwrap();
    // Every file in envoy/ but the TLS gateway, whose own test sends one.
    let files = [
        "broadcast.yaml",
        "capture.yaml",
        "fallback.yaml",
        "knocker.yaml",
        "sidecar.yaml",
    ];
    let mut shipped: Vec<String> = std::fs::read_dir(knocker_e2e::repo_root().join("envoy"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "gateway.yaml")
        .collect();
    shipped.sort();
    assert_eq!(shipped, files, "a new config in envoy/ belongs here");
    for file in files {
        let upstream = Target::ok().await;
        let envoy = Envoy::start(
            file,
            &EnvoyOptions {
                grpc_port: cp.grpc_port,
                http_port: cp.http_port,
                upstream_port: upstream.port(),
                ..EnvoyOptions::default()
            },
        );
        // A method Envoy has never heard of reaches the upstream, not Envoy's own 400.
        let r = client()
            .request(method("XREFRESH"), envoy.url("/plain"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{file}");
        let got = upstream.wait_for(1, WAIT).await;
        assert_eq!(got[0].method, "XREFRESH", "{file}");
    }
    // BAN and PURGE through the broadcast rule: both members get each.
    let upstream = Target::ok().await;
    let envoy = Envoy::start(
        "broadcast.yaml",
        &EnvoyOptions {
            grpc_port: cp.grpc_port,
            http_port: cp.http_port,
            upstream_port: upstream.port(),
            ..EnvoyOptions::default()
        },
    );
    for name in ["BAN", "PURGE"] {
        let r = client()
            .request(method(name), envoy.url("/page"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{name}");
    }
    for member in [&one, &two] {
        let got = member.wait_for(2, WAIT).await;
        let mut methods: Vec<&str> = got.iter().map(|r| r.method.as_str()).collect();
        methods.sort_unstable();
        assert_eq!(methods, ["BAN", "PURGE"]);
    }
    assert_eq!(upstream.count(), 0, "the rule took them");
}
