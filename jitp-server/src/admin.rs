//! The admin listener: plain HTTP, loopback by default. `/healthz`, `/metrics`, and
//! `/crl` (the certificates' CRL Distribution Point: relying parties fetch it without
//! client authentication).
use crate::Metrics;
use bytes::Bytes;
use fleetcert_lifecycle::jitp::Jitp;
use fleetcert_lifecycle::mirror::Mirror;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long `/healthz` waits for the registry's write probe.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    jitp: Arc<Jitp>,
    mirror: Option<Arc<Mirror>>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let jitp = jitp.clone();
        let mirror = mirror.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let jitp = jitp.clone();
                    let mirror = mirror.clone();
                    async move {
                        if req.method() == Method::GET && req.uri().path() == "/crl" {
                            return Ok::<_, std::convert::Infallible>(crate::crl_response(&jitp));
                        }
                        let (status, content_type, body) = match (req.method(), req.uri().path()) {
                            // What first connects see: unhealthy while their latest news
                            // is `registry_unavailable`; otherwise a write through the
                            // registry pool (see `Jitp::health`), bounded in time so a
                            // stuck database answers 503 rather than nothing.
                            (&Method::GET, "/healthz") => {
                                if let Some(ago) = metrics.registry_failing() {
                                    (
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "text/plain",
                                        format!(
                                            "unhealthy: device requests found the registry unavailable {} s ago and no registration has succeeded since\n",
                                            ago.as_secs()
                                        ),
                                    )
                                } else {
                                    match tokio::time::timeout(HEALTH_TIMEOUT, jitp.health()).await
                                    {
                                        Ok(Ok(())) => {
                                            (StatusCode::OK, "text/plain", "ok\n".to_owned())
                                        }
                                        Ok(Err(e)) => (
                                            StatusCode::SERVICE_UNAVAILABLE,
                                            "text/plain",
                                            format!("unhealthy: {e}\n"),
                                        ),
                                        Err(_) => (
                                            StatusCode::SERVICE_UNAVAILABLE,
                                            "text/plain",
                                            format!(
                                                "unhealthy: the registry did not take a write within {} s\n",
                                                HEALTH_TIMEOUT.as_secs()
                                            ),
                                        ),
                                    }
                                }
                            }
                            (&Method::GET, "/metrics") => {
                                metrics.sync_rotations(&jitp.stats());
                                if let Some(mirror) = &mirror
                                    && let Ok(backlog) = mirror.backlog().await
                                {
                                    metrics.sync_mirror(
                                        &mirror.stats(),
                                        &backlog,
                                        fleetcert_lifecycle::unix_now(),
                                    );
                                }
                                (
                                    StatusCode::OK,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    metrics.encode(),
                                )
                            }
                            _ => (
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "not found\n".to_owned(),
                            ),
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", content_type)
                                .body(Full::new(Bytes::from(body)))
                                .expect("valid response"),
                        )
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
