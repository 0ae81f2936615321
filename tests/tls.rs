//! TLS faults over real sockets on 127.0.0.1: a hyper-rustls client behind `MapFaults`.
#![cfg(feature = "rustls")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, StatusCode};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncWriteExt;
use tower::{Layer, ServiceExt};
use tower_upstream::fault::{classify, Fault, Sent};
use tower_upstream::map_faults::MapFaultsLayer;

use support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS upstream on 127.0.0.1 for `localhost`, with a fresh self-signed certificate;
/// answers every request 200. Returns its address and its certificate.
async fn tls_upstream() -> (SocketAddr, CertificateDer<'static>) {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = CertificateDer::from(key.cert.der().to_vec());
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], private)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let addr = raw_upstream(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(stream).await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                use tokio::io::AsyncReadExt;
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
            let _ = tls.shutdown().await;
        }
    })
    .await;
    (addr, cert)
}

fn https_client(
    trusted: Option<CertificateDer<'static>>,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector<LocalResolver>>, Body> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(cert) = trusted {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new_with_resolver(local_resolver());
    http.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn answer(
    client: Client<hyper_rustls::HttpsConnector<HttpConnector<LocalResolver>>, Body>,
    uri: String,
) -> (StatusCode, String) {
    let svc = MapFaultsLayer::builder()
        .gateway_name("gw")
        .build()
        .unwrap()
        .layer(client);
    let res = svc
        .oneshot(Request::get(uri).body(empty()).unwrap())
        .await
        .unwrap();
    let proxy_status = res
        .headers()
        .get("proxy-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (res.status(), proxy_status)
}

#[tokio::test]
async fn trusted_certificate_works() {
    let (addr, cert) = tls_upstream().await;
    let (status, proxy_status) = answer(
        https_client(Some(cert)),
        format!("https://localhost:{}/", addr.port()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proxy_status, "");
}

#[tokio::test]
async fn untrusted_certificate_is_a_certificate_error() {
    let (addr, _) = tls_upstream().await;
    let uri = format!("https://localhost:{}/", addr.port());
    let (status, proxy_status) = answer(https_client(None), uri.clone()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy_status, "gw; error=tls_certificate_error");

    let err = https_client(None)
        .request(Request::get(uri).body(empty()).unwrap())
        .await
        .unwrap_err();
    let c = classify(&err);
    assert_eq!(
        (c.fault(), c.sent()),
        (Fault::TlsCertificateError, Sent::NotSent)
    );
}

#[tokio::test]
async fn plaintext_answer_to_a_handshake_is_a_protocol_error() {
    // A plain HTTP server: it answers the ClientHello's bytes with an HTTP error.
    let addr = raw_upstream(|mut s| async move {
        use tokio::io::AsyncReadExt;
        let mut hello = [0u8; 512];
        let _ = s.read(&mut hello).await;
        let _ = s
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let (status, proxy_status) = answer(
        https_client(None),
        format!("https://localhost:{}/", addr.port()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(proxy_status, "gw; error=tls_protocol_error");
}
