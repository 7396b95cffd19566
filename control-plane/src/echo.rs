//! `knocker echo`: a tiny HTTP target that answers `200` to everything and logs one line
//! per request (Knocker's own monitor checks aside) — something to point Knocker at when trying it out, and the upstream of
//! the benchmarks.
//!
//! To try capture and fallback, it can play dead: after `POST /echo/down` it answers
//! `503` to everything but `POST /echo/up`, which brings it back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use axum::extract::Request;
use axum::Router;

pub async fn run(addr: SocketAddr, quiet: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("echo: cannot listen on {addr}: {e}"))?;
    eprintln!(
        "knocker echo listening on http://{}",
        listener.local_addr()?
    );
    let down = Arc::new(AtomicBool::new(false));
    let app = Router::new().fallback(move |request: Request| {
        let down = Arc::clone(&down);
        async move { answer(request, &down, quiet).await }
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn answer(request: Request, down: &AtomicBool, quiet: bool) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let switch = match (parts.method.as_str(), parts.uri.path()) {
        ("POST", "/echo/down") => Some(true),
        ("POST", "/echo/up") => Some(false),
        _ => None,
    };
    if let Some(is_down) = switch {
        down.store(is_down, Ordering::Relaxed);
        eprintln!(
            "echo: {}",
            if is_down {
                "down: answering 503"
            } else {
                "up again"
            }
        );
        return "ok\n".into_response();
    }
    let is_down = down.load(Ordering::Relaxed);
    if !quiet && !is_health_check(&parts.headers) {
        let id = parts
            .headers
            .get("x-knocker-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        eprintln!(
            "echo: {} {} ({} bytes, x-knocker-id {id}){}",
            parts.method,
            parts.uri,
            body.len(),
            if is_down { " → 503" } else { "" }
        );
    }
    if is_down {
        return (StatusCode::SERVICE_UNAVAILABLE, "down\n").into_response();
    }
    "ok\n".into_response()
}

/// A monitor's health check (every few seconds, it would drown the deliveries).
fn is_health_check(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("knocker-monitor/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monitor_checks_are_not_printed_deliveries_are() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(!is_health_check(&headers));
        headers.insert("user-agent", "knocker-monitor/0.1.0".parse().unwrap());
        assert!(is_health_check(&headers));
        headers.insert("user-agent", "curl/8".parse().unwrap());
        assert!(!is_health_check(&headers));
    }
}
