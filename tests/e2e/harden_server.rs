//! Issue 12, item 2: one device certificate must not be able to hold the JITP server's
//! connection slots — slow or oversized requests are bounded, one certificate gets a
//! share of the connections, and a revoked certificate's open connections are closed.
//! Driven against the real `fleetcert serve` with a raw rustls client (byte-exact
//! requests, slow senders, held connections) and curl.
use crate::jitp::{Served, curl_connect, metric, metrics, trust_anchor};
use crate::util::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn device(env: &Env, name: &str) -> (PathBuf, PathBuf) {
    env.ok(&["provision", name, "--out", "out"]);
    (
        env.out_dir().join(format!("{name}.crt")),
        env.out_dir().join(format!("{name}.key")),
    )
}

/// A device's TLS client configuration (trusting the fleet root for the server).
fn client_config(env: &Env, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(trust_anchor(env)).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A mutual-TLS connection to the device listener, handshake done.
fn open(served: &Served, config: &Arc<rustls::ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(&served.device).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// Reads one HTTP/1.1 response (status, body) within the socket's read timeout.
fn read_response(tls: &mut Tls) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = tls.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..]).into_owned();
            return Ok((status, body));
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits up to `limit` for the server to close the connection (EOF, reset or a TLS
/// alert); returns how long that took, or None if it is still open. Data the server
/// sends meanwhile is discarded.
fn wait_closed(tls: &mut Tls, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut chunk = [0u8; 4096];
    while started.elapsed() < limit {
        match tls.read(&mut chunk) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

fn rejections(served: &Served, reason: &str) -> f64 {
    metric(
        &metrics(served),
        &format!("fleetcert_rejections_total{{reason=\"{reason}\"}}"),
    )
}

/// `Content-Length: 99999999999` with a 3-byte body: 413 at once, without waiting for
/// the body; the server is none the worse for it.
#[test]
fn an_oversized_content_length_is_refused_at_once() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "big-body");
    let served = Served::start(&env, &[]);
    let config = client_config(&env, &cert, &key);
    let mut tls = open(&served, &config);
    // Well under the 10 s request deadline: the answer must not wait for the body.
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    tls.write_all(
        b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999\r\n\r\nabc",
    )
    .unwrap();
    tls.flush().unwrap();
    let (status, body) = read_response(&mut tls).expect("no answer within 5 s");
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("body_too_large"), "{body}");
    assert!(body.contains("65536"), "{body}");
    // The connection is closed after the refusal (the rest of the body is never read).
    assert!(
        wait_closed(&mut tls, Duration::from_secs(5)).is_some(),
        "left open"
    );
    assert!(rejections(&served, "body_too_large") >= 1.0);
    // A body within --max-body-bytes is still read.
    let (status, _) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(status, 201);
}

/// A body dripped byte by byte (and headers dripped likewise) cannot keep a connection
/// past the whole-request deadline: 408 and the connection closed.
#[test]
fn a_dripped_request_is_cut_off_at_the_request_deadline() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "dripper");
    let served = Served::start(&env, &["--request-timeout", "3s"]);
    let config = client_config(&env, &cert, &key);

    // Body: the headers at once, then one byte a second of a 100-byte body.
    let mut tls = open(&served, &config);
    let started = Instant::now();
    tls.write_all(b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    tls.flush().unwrap();
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut answered = None;
    while started.elapsed() < Duration::from_secs(20) {
        if tls.write_all(b"x").and_then(|_| tls.flush()).is_err() {
            break; // closed by the server
        }
        match read_response(&mut tls) {
            Ok(reply) => {
                answered = Some(reply);
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break, // closed by the server
        }
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "a body dripped at 1 byte/s held the connection for {took:?} (deadline 3 s)"
    );
    if let Some((status, body)) = &answered {
        assert_eq!(*status, 408, "{body}");
        assert!(body.contains("request_timeout"), "{body}");
    }
    assert!(
        wait_closed(&mut tls, Duration::from_secs(5)).is_some(),
        "left open after the deadline"
    );
    assert_eq!(rejections(&served, "request_timeout"), 1.0);

    // Headers: one byte a second, never finished.
    let mut tls = open(&served, &config);
    let started = Instant::now();
    let head = b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for byte in head.iter() {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        if tls.write_all(&[*byte]).and_then(|_| tls.flush()).is_err()
            || wait_closed(&mut tls, Duration::from_secs(1)).is_some()
        {
            closed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(
        closed,
        "dripped headers kept the connection open for {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Counted as a request that did not arrive in time (an idle connection is not).
    let deadline = Instant::now() + Duration::from_secs(5);
    while rejections(&served, "request_timeout") < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rejections(&served, "request_timeout"), 2.0);

    // The device itself is fine.
    assert_eq!(curl_connect(&env, &served, &cert, &key).0, 201);
}

/// Request headers are capped near what a device sends: 20 KB of headers get 431,
/// 8 KB still pass.
#[test]
fn oversized_headers_get_431() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "chatty");
    let served = Served::start(&env, &[]);
    let config = client_config(&env, &cert, &key);

    let mut tls = open(&served, &config);
    let padding = "a".repeat(20_000);
    tls.write_all(
        format!("POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nX-Pad: {padding}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    tls.flush().unwrap();
    let (status, _) = read_response(&mut tls).expect("no answer to oversized headers");
    assert_eq!(status, 431);
    assert!(
        wait_closed(&mut tls, Duration::from_secs(5)).is_some(),
        "left open"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while rejections(&served, "headers_too_large") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(rejections(&served, "headers_too_large"), 1.0);

    let mut tls = open(&served, &config);
    let padding = "a".repeat(8_000);
    tls.write_all(
        format!("POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nX-Pad: {padding}\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    tls.flush().unwrap();
    let (status, body) = read_response(&mut tls).unwrap();
    assert_eq!(status, 201, "{body}");
}

/// With --max-connections 20, one certificate opening 20 connections gets its share (16
/// by default) and the rest are closed after the handshake; another device still gets in.
#[test]
fn one_certificate_cannot_hold_every_connection_slot() {
    let env = Env::new();
    env.init_ca();
    let (hog_cert, hog_key) = device(&env, "hog");
    let (cert, key) = device(&env, "neighbour");
    let served = Served::start(&env, &["--max-connections", "20"]);
    let config = client_config(&env, &hog_cert, &hog_key);
    let mut held: Vec<Tls> = (0..20).map(|_| open(&served, &config)).collect();
    // The server settles every handshake before the neighbour comes.
    let deadline = Instant::now() + Duration::from_secs(3);
    while rejections(&served, "certificate_connection_limit") < 4.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = curl_connect(&env, &served, &cert, &key);
    assert_eq!(
        status, 201,
        "another device was turned away while one certificate held connections: {body}"
    );
    assert_eq!(rejections(&served, "certificate_connection_limit"), 4.0);
    let closed = held
        .iter_mut()
        .filter_map(|tls| wait_closed(tls, Duration::from_millis(300)))
        .count();
    assert_eq!(closed, 4, "connections of the hog closed by the server");
    // Those the certificate kept still work (the closed ones cannot be answered).
    let mut answered = 0;
    for tls in held.iter_mut() {
        tls.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        if tls
            .write_all(b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            .is_ok()
            && let Ok((status, _)) = read_response(tls)
        {
            assert!(status == 200 || status == 201, "{status}");
            answered += 1;
        }
    }
    assert_eq!(answered, 16);
    drop(held);

    // The cap is a flag.
    drop(served);
    let served = Served::start(
        &env,
        &[
            "--max-connections",
            "20",
            "--max-connections-per-certificate",
            "2",
        ],
    );
    let mut held: Vec<Tls> = (0..4).map(|_| open(&served, &config)).collect();
    let closed = held
        .iter_mut()
        .filter_map(|tls| wait_closed(tls, Duration::from_millis(500)))
        .count();
    assert_eq!(closed, 2);
}

/// A certificate revoked (`fleetcert revoke`, another process) while it has a keep-alive
/// connection open: that connection is closed within seconds; another device's stays.
#[test]
fn revoking_a_certificate_closes_its_open_connections() {
    let env = Env::new();
    env.init_ca();
    let (cert, key) = device(&env, "stolen");
    let (other_cert, other_key) = device(&env, "honest");
    // Idle keep-alive connections would be closed after 60 s: far beyond what is waited.
    let served = Served::start(&env, &["--request-timeout", "60s"]);
    let request = b"POST /v1/connect HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";

    let mut stolen = open(&served, &client_config(&env, &cert, &key));
    stolen.write_all(request).unwrap();
    assert_eq!(read_response(&mut stolen).unwrap().0, 201);
    let mut honest = open(&served, &client_config(&env, &other_cert, &other_key));
    honest.write_all(request).unwrap();
    assert_eq!(read_response(&mut honest).unwrap().0, 201);

    let serial = serial_of(&cert);
    env.ok(&["revoke", &serial, "--reason", "keyCompromise"]);
    let took = wait_closed(&mut stolen, Duration::from_secs(15));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(10)),
        "the revoked certificate's connection stayed open ({took:?})"
    );
    assert_eq!(rejections(&served, "revoked_while_connected"), 1.0);

    // The other device's keep-alive connection is untouched.
    honest
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    honest.write_all(request).unwrap();
    let (status, body) = read_response(&mut honest).unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Nonsense limits are refused with exit 2 and a message naming the flag.
#[test]
fn nonsense_server_limits_are_refused() {
    let env = Env::new();
    env.init_ca();
    for (flag, value) in [
        ("--request-timeout", "0s"),
        ("--request-timeout", "0ms"),
        ("--request-timeout", "30d"),
        ("--max-connections-per-certificate", "0"),
        ("--max-body-bytes", "0"),
        ("--max-header-bytes", "10"),
    ] {
        let mut child = env
            .cmd()
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                flag,
                value,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "serve {flag} {value} was accepted: {stderr}"
        );
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
