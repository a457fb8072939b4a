//! `/healthz`, `/readyz`, `/status`, `/metrics` (axum). Loopback by default; with
//! `server.token_file`, every endpoint but `/healthz` needs `Authorization: Bearer <token>`.
//! Responses carry no tenant data and no secret: roles, LSNs, times, counts, sizes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::telemetry::Telemetry;

use super::DaemonError;

/// The bound listener, before serving (so that a port in use fails the start).
pub struct Server {
    listener: TcpListener,
    token: Option<Arc<[u8; 32]>>,
}

impl Server {
    pub async fn bind(config: &Config) -> Result<Self, DaemonError> {
        let token = match &config.server.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    DaemonError::Config(format!("server.token_file {}: {e}", path.display()))
                })?;
                let token = text.trim();
                if token.len() < 16 {
                    return Err(DaemonError::Config(format!(
                        "server.token_file {}: the token is shorter than 16 characters",
                        path.display()
                    )));
                }
                // Compared as digests: equal length, and no early exit on the secret's bytes.
                Some(Arc::new(Sha256::digest(token.as_bytes()).into()))
            }
            None => None,
        };
        let addr: SocketAddr = config.server.listen.parse().map_err(|_| {
            DaemonError::Config(format!("server.listen = {:?}", config.server.listen))
        })?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| DaemonError::Listen(addr, e))?;
        Ok(Self { listener, token })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop`.
    pub async fn serve(
        self,
        telemetry: Arc<Telemetry>,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let protected = Router::new()
            .route("/readyz", get(readyz))
            .route("/status", get(status))
            .route("/metrics", get(metrics))
            .route_layer(middleware::from_fn_with_state(
                self.token.clone(),
                authorize,
            ));
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .merge(protected)
            .with_state(telemetry);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }
}

async fn authorize(
    State(token): State<Option<Arc<[u8; 32]>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        if given.as_ref() != Some(&*expected) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required (server.token_file)\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(telemetry): State<Arc<Telemetry>>) -> Response {
    let (ready, role) = telemetry.ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({ "ready": ready, "role": role })),
    )
        .into_response()
}

async fn status(State(telemetry): State<Arc<Telemetry>>) -> Response {
    Json(telemetry.status()).into_response()
}

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry.metrics.render(),
    )
        .into_response()
}
