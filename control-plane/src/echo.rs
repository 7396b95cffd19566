//! `knocker echo`: a tiny HTTP target that answers `200` to everything and logs one line
//! per request — something to point Knocker at when trying it out, and the upstream of
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
    if !quiet {
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
