//! End-to-end tests: the real Envoy with the built filter, the real `knocker` binary and
//! real HTTP targets, all on loopback and free ports. One binary, one module per area.

mod broadcast;
mod cluster;
mod configs;
mod dashboard;
mod deploy;
mod durability;
mod gateway;
mod images;
mod link;
mod make_run;
mod monitors;
mod nats_access;
mod observability;
mod protocol;
mod readme;
mod rules;
mod security;
mod settings;
mod sidecar;
mod signing;
mod stack;
mod targets;

use std::time::Duration;

/// Every wait in these tests is bounded by this (or a shorter, stated bound).
pub const WAIT: Duration = Duration::from_secs(20);

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// A body of `n` bytes that is not one repeated byte (so truncation or reordering shows).
pub fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

/// The admin token of the tests that set one (`KNOCKER_ADMIN_TOKEN`); a control plane
/// without a token ignores it.
pub const TOKEN: &str = "tok";

/// A GET answered with JSON (the API's answers), with [`TOKEN`].
pub async fn get_json(url: String) -> serde_json::Value {
    client()
        .get(url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("a JSON answer")
}

/// The value of the sample `name{labels}` (exactly as written) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

/// The control plane's `/metrics` (with [`TOKEN`]), checked to be OpenMetrics text.
pub async fn scrape(cp: &knocker_e2e::ControlPlane) -> String {
    let response = client()
        .get(cp.url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"].to_str().unwrap_or("");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    response.text().await.expect("metrics text")
}

/// Scrapes until `series` reaches `value` (bounded by [`WAIT`]); returns the last text.
pub async fn scrape_until(cp: &knocker_e2e::ControlPlane, series: &str, value: f64) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = scrape(cp).await;
        if sample(&text, series) == Some(value) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a control-plane configuration file (`KNOCKER_CONFIG`); returns its path.
pub fn write_config(text: &str) -> String {
    let path = knocker_e2e::temp_dir("config").join("knocker.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// A stat of the Envoy cluster of the control plane's gRPC port (`knocker_control_plane`
/// in every `envoy/*.yaml`).
pub fn grpc_stat(envoy: &knocker_e2e::Envoy, name: &str) -> Option<u64> {
    envoy.stat(&format!("cluster.knocker_control_plane.{name}"))
}

/// Waits (up to 5 s) until the Envoy worker's stream to the control plane is open: the
/// one request in flight on the control plane's cluster.
pub async fn wait_for_stream(envoy: &knocker_e2e::Envoy) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while grpc_stat(envoy, "upstream_rq_active") != Some(1) {
        assert!(std::time::Instant::now() < deadline, "no stream opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
