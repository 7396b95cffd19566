//! `envoy/gateway.yaml`, rendered by `scripts/envoy-config.sh` as users do: one HTTPS
//! listener (a certificate the test makes) in front of two services chosen by host name,
//! capture for one while it is down, fallback for the other when it fails (Envoy's retry
//! to the handover listener), and Knocker requests and the status URL on a third name.

use knocker_e2e::{free_port, ControlPlane, Envoy, EnvoyOptions, Reply, Target, TestCert};
use serde_json::Value;

use crate::WAIT;

const NAMES: [&str; 3] = [
    "orders.example.com",
    "api.example.com",
    "knocker.example.com",
];

struct Gateway {
    _cp: ControlPlane,
    envoy: Envoy,
    cert: TestCert,
}

impl Gateway {
    fn start(orders_port: u16, api_port: u16) -> Self {
        let cp = ControlPlane::start(&[]);
        let cert = TestCert::new(&NAMES);
        let vars = [
            ("KNOCKER_LISTEN_ADDRESS", "127.0.0.1".to_owned()),
            ("KNOCKER_TLS_CERT", cert.cert_path.display().to_string()),
            ("KNOCKER_TLS_KEY", cert.key_path.display().to_string()),
            ("KNOCKER_ORDERS_PORT", orders_port.to_string()),
            (
                "KNOCKER_ORDERS_TARGET",
                format!("http://127.0.0.1:{orders_port}"),
            ),
            ("KNOCKER_API_PORT", api_port.to_string()),
            ("KNOCKER_API_TARGET", format!("http://127.0.0.1:{api_port}")),
        ];
        let envoy = Envoy::start(
            "gateway.yaml",
            &EnvoyOptions {
                grpc_port: cp.grpc_port,
                http_port: cp.http_port,
                vars: vars
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), v.clone()))
                    .collect(),
                // Retries every second at most, so a service's return is noticed quickly.
                replace: vec![(
                    r#""max_backoff_s":30"#.into(),
                    r#""max_backoff_s":1"#.into(),
                )],
                ..EnvoyOptions::default()
            },
        );
        Self {
            _cp: cp,
            envoy,
            cert,
        }
    }

    fn client(&self) -> reqwest::Client {
        self.cert.client(&NAMES, self.envoy.port)
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.envoy.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_over_tls_and_captures_writes_for_a_service_that_is_down() {
    let orders_port = free_port(); // the orders service is down
    let api = Target::start(|request, _| {
        Reply::status(200).with_body(format!("api {}", request.target).as_bytes())
    })
    .await;
    let gateway = Gateway::start(orders_port, api.port());
    let client = gateway.client();

    // The api service, by its name, over HTTP/2 (ALPN) on TLS; answers untouched.
    let read = client
        .get(gateway.url("api.example.com", "/things?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(read.version(), reqwest::Version::HTTP_2);
    assert_eq!(read.text().await.unwrap(), "api /things?x=1");
    let write = client
        .post(gateway.url("api.example.com", "/things"))
        .body("new")
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 200);
    assert!(write.headers().get("knocker-id").is_none());
    // An extension method reaches the service, not Envoy's own 400.
    let refresh = client
        .request(
            reqwest::Method::from_bytes(b"XREFRESH").unwrap(),
            gateway.url("api.example.com", "/cache"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(refresh.status(), 200);
    assert_eq!(refresh.text().await.unwrap(), "api /cache");

    // Writes to orders, which is down: captured, answered 202 with receipts.
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = client
            .post(gateway.url("orders.example.com", &format!("/orders/{i}")))
            .header("x-order", i.to_string())
            .body(format!("order {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{response:?}");
        let receipt: Value = response.json().await.unwrap();
        assert_eq!(receipt["config"]["rule"], "orders", "{receipt}");
        ids.push(receipt["config"]["id"].as_str().unwrap().to_owned());
    }
    // A read of orders is not captured: the gateway's own 503 while it is down.
    let read = client
        .get(gateway.url("orders.example.com", "/orders/0"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 503);

    // Orders comes up: the writes arrive in the order they were sent.
    let orders = Target::start_on(orders_port, |_, _| Reply::status(201)).await;
    let got = orders.wait_for(3, WAIT).await;
    for (i, request) in got.iter().enumerate() {
        assert_eq!(request.method, "POST");
        assert_eq!(request.target, format!("/orders/{i}"));
        assert_eq!(request.body, format!("order {i}").as_bytes());
        assert!(request.header("x-knocker").is_some(), "{request:?}");
    }
    assert_eq!(api.count(), 3, "nothing for orders reached api");

    // A host the gateway does not serve.
    let h1 = gateway
        .cert
        .client_builder(&NAMES, gateway.envoy.port)
        .http1_only()
        .build()
        .unwrap();
    let unknown = h1
        .get(gateway.url("api.example.com", "/"))
        .header("host", "elsewhere.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_for_one_service_and_knocker_requests_on_their_own_name() {
    // api fails its first request with 503, then accepts.
    let api = Target::start(|_, n| {
        if n == 0 {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    })
    .await;
    let target = Target::ok().await;
    let gateway = Gateway::start(free_port(), api.port());
    let client = gateway.client();

    let failed = client
        .put(gateway.url("api.example.com", "/things/7"))
        .body("seven")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 202, "{failed:?}");
    let receipt: Value = failed.json().await.unwrap();
    assert_eq!(receipt["config"]["rule"], "api", "{receipt}");
    let got = api.wait_for(2, WAIT).await;
    assert_eq!(
        (got[1].method.as_str(), got[1].target.as_str()),
        ("PUT", "/things/7")
    );
    assert_eq!(got[1].body, b"seven");
    assert!(got[1].header("x-knocker").is_some());
    // Envoy retried the failed write to the handover listener, not to the service.
    assert!(got[0].header("x-knocker").is_none());
    assert_eq!(
        gateway
            .envoy
            .stat("cluster.api_with_handover.upstream_rq_retry"),
        Some(1)
    );

    // A Knocker request on the knocker name goes to its own target.
    let knocked = client
        .post(gateway.url("knocker.example.com", "/hook"))
        .header("knocker-host", target.host())
        .body("event")
        .send()
        .await
        .unwrap();
    assert_eq!(knocked.status(), 200, "{knocked:?}");
    assert!(knocked.headers().contains_key("knocker-id"));
    let hook = target.wait_for(1, WAIT).await;
    assert_eq!(
        (hook[0].target.as_str(), hook[0].body.as_slice()),
        ("/hook", &b"event"[..])
    );

    // The status URL is there; the API is not.
    let status = client
        .get(gateway.url("knocker.example.com", "/knocker/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 200);
    let api_call = client
        .get(gateway.url("knocker.example.com", "/knocker/jobs"))
        .send()
        .await
        .unwrap();
    assert_eq!(api_call.status(), 400);
    assert!(api_call.text().await.unwrap().contains("Knocker-Host"));
    assert_eq!(
        gateway
            .envoy
            .stat("wasmcustom.knocker.rule.api.fallback_taken"),
        Some(1)
    );
    assert_eq!(
        api.count(),
        2,
        "the failed write and its delivery, nothing more"
    );
}
