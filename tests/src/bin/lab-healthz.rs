//! Test helper (never shipped): a stand-in apiserver health endpoint and its client.
//!
//! lab-healthz mkcert DIR VIP IP...      test CA (ca.crt) and one cert/key per IP (IP.crt/IP.key),
//!                                       each also valid for VIP, as apiserver certificates are
//! lab-healthz serve ADDR CERT KEY NAME  HTTPS: /healthz, /readyz -> 200 "ok", / -> 200 "NAME"
//! lab-healthz get IP:PORT CA            one HTTPS GET /, prints the body
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("mkcert") if args.len() >= 4 => mkcert(&args[1], &args[2], &args[3..]),
        Some("serve") if args.len() == 5 => serve(&args[1], &args[2], &args[3], &args[4]).await,
        Some("get") if args.len() == 3 => get(&args[1], &args[2]).await,
        _ => bail!("usage: lab-healthz mkcert DIR VIP IP... | serve ADDR CERT KEY NAME | get IP:PORT CA"),
    }
}

fn mkcert(dir: &str, vip: &str, ips: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(vec![])?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "lab test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(format!("{dir}/ca.crt"), ca_cert.pem())?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    for ip in ips {
        let key = rcgen::KeyPair::generate()?;
        let p = rcgen::CertificateParams::new(vec![ip.clone(), vip.to_string()])?;
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(format!("{dir}/{ip}.crt"), cert.pem())?;
        std::fs::write(format!("{dir}/{ip}.key"), key.serialize_pem())?;
    }
    Ok(())
}

async fn serve(addr: &str, cert: &str, key: &str, name: &str) -> anyhow::Result<()> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).context("cert")?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).context("key")?;
    let cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("bind {addr}"))?;
    eprintln!("lab-healthz {name} listening on {addr}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let mut buf = vec![0u8; 2048];
            let Ok(n) = tls.read(&mut buf).await else { return };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let body = if path == "/healthz" || path == "/readyz" { "ok".to_string() } else { name };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        });
    }
}

async fn get(addr: &str, ca: &str) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let sa: std::net::SocketAddr = addr.parse()?;
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(3), tokio::net::TcpStream::connect(sa)).await??;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tls = connector.connect(ServerName::IpAddress(sa.ip().into()), tcp).await?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    println!("{body}");
    Ok(())
}
