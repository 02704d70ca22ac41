//! The server's own count of answered requests, from its Prometheus `/metrics`, so a
//! throughput figure cannot come from requests that never reached the server.
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// The counter fleetcert increments once per answered `POST /v1/connect`.
pub const DEFAULT_COUNTER: &str = "fleetcert_connects_total";

/// Sum of every sample of `metric` (all label sets) in a Prometheus / OpenMetrics text
/// exposition; `None` if the metric has no sample.
pub fn counter_sum(exposition: &str, metric: &str) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        // The name must end here: `fleetcert_connects_total_x` is another metric.
        let rest = if let Some(labels) = rest.strip_prefix('{') {
            match closing_brace(labels) {
                Some(end) => &labels[end + 1..],
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            rest
        } else {
            continue;
        };
        // Value, then an optional timestamp.
        if let Some(value) = rest.split_whitespace().next().and_then(parse_value) {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// Index of the `}` closing a label set, skipping quoted values (which may hold `}`).
fn closing_brace(labels: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `GET` a plain-HTTP URL (`http://host:port/path`), returning the body. For the admin
/// listener; no TLS.
pub async fn fetch(url: &str) -> Result<String> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("metrics URL must be http://host:port/path, got {url:?}");
    }
    let host = uri.host().ok_or_else(|| anyhow!("no host in {url:?}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let driver = tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", authority)
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        drop(sender);
        let _ = driver.await;
        if !status.is_success() {
            bail!("{url} answered {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| anyhow!("{url}: no answer within 10 s"))?
}

/// The counter's value now (0 if the server has not counted any yet).
pub async fn fetch_counter(url: &str, metric: &str) -> Result<f64> {
    Ok(counter_sum(&fetch(url).await?, metric).unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP fleetcert_connects POST /v1/connect answered, by status.
# TYPE fleetcert_connects counter
fleetcert_connects_total{status="provisioned"} 3000
fleetcert_connects_total{status="known"} 12345
fleetcert_connects_total_other 7
fleetcert_connects_created{status="known"} 1.7e9
# HELP fleetcert_tls_handshakes mutual-TLS handshakes.
fleetcert_tls_handshakes_total{result="ok"} 15345
odd_total{path="/a}b\"c"} 2 1700000000000
odd_total 3
# EOF
"#;

    #[test]
    fn sums_over_label_sets_only_of_that_metric() {
        assert_eq!(
            counter_sum(EXPOSITION, "fleetcert_connects_total"),
            Some(15345.0)
        );
        assert_eq!(
            counter_sum(EXPOSITION, "fleetcert_tls_handshakes_total"),
            Some(15345.0)
        );
        // Quoted braces and timestamps; a sample without labels.
        assert_eq!(counter_sum(EXPOSITION, "odd_total"), Some(5.0));
        assert_eq!(counter_sum(EXPOSITION, "fleetcert_rejections_total"), None);
    }

    #[test]
    fn delta_between_two_scrapes() {
        let before = "fleetcert_connects_total{status=\"known\"} 10\n";
        let after = "fleetcert_connects_total{status=\"known\"} 25\nfleetcert_connects_total{status=\"provisioned\"} 5\n";
        let delta = counter_sum(after, DEFAULT_COUNTER).unwrap()
            - counter_sum(before, DEFAULT_COUNTER).unwrap();
        assert_eq!(delta, 20.0);
    }
}
