//! `knocker echo`: a tiny HTTP target that answers `200` to everything and logs one line
//! per request — something to point Knocker at when trying it out, and the upstream of
//! the benchmarks.

use std::net::SocketAddr;

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
    let app = Router::new().fallback(move |request: Request| async move {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        if !quiet {
            let id = parts
                .headers
                .get("x-knocker-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            eprintln!(
                "echo: {} {} ({} bytes, x-knocker-id {id})",
                parts.method,
                parts.uri,
                body.len()
            );
        }
        "ok\n"
    });
    axum::serve(listener, app).await?;
    Ok(())
}
