//! Reaching the controller through an HTTP CONNECT proxy (a bastion's squid or tinyproxy). The
//! proxy only sees a TCP tunnel: TLS, the pinned or CA-verified server certificate and the
//! agent's client certificate all run end to end through it.
//!
//! Which proxy: the configured one (`proxy = "http://bastion:3128"`, `--proxy`), else
//! `HTTPS_PROXY`/`https_proxy`, unless the controller's host matches `NO_PROXY`/`no_proxy`
//! (comma-separated: `*`, host names (also matching their subdomains), IP addresses and CIDRs);
//! the environment's proxy is never used for `localhost` or a loopback address.
use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest proxy response head read.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("proxy {0:?}: expected http://[USER:PASSWORD@]HOST:PORT (https:// proxies are not supported)")]
    BadUrl(String),
    #[error("cannot reach the proxy {proxy}")]
    Connect {
        proxy: String,
        #[source]
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused to open a tunnel to {target}: {status}")]
    Refused { proxy: String, target: String, status: String },
    #[error("proxy {proxy} asks for credentials (407): put them in the proxy URL, http://USER:PASSWORD@HOST:PORT")]
    AuthRequired { proxy: String },
    #[error("proxy {proxy} sent no valid HTTP answer to CONNECT: {why}")]
    BadAnswer { proxy: String, why: String },
    #[error("proxy {proxy} did not answer CONNECT within {secs}s")]
    Timeout { proxy: String, secs: u64 },
}

/// An HTTP proxy: where it is and, optionally, Basic credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// HOST:PORT of the proxy.
    pub addr: String,
    credentials: Option<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        write!(f, "Proxy({}{})", self.addr, if self.credentials.is_some() { ", with credentials" } else { "" })
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.addr)
    }
}

impl Proxy {
    /// `http://[USER:PASSWORD@]HOST[:PORT]` (port 80 when none is given), or `HOST:PORT`.
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let bad = || ProxyError::BadUrl(crate::redact::secrets(url).into_owned());
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some(_) => return Err(bad()),
            None => url,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            return Err(bad());
        }
        let (credentials, hostport) = match rest.rsplit_once('@') {
            Some((cred, hp)) => {
                if !cred.contains(':') {
                    return Err(bad());
                }
                let decoded = percent_decode(cred).ok_or_else(bad)?;
                (Some(base64::engine::general_purpose::STANDARD.encode(decoded)), hp)
            }
            None => (None, rest),
        };
        let addr = match crate::dial::split_host_port(hostport) {
            Ok((h, p)) if h.contains(':') => format!("[{h}]:{p}"),
            Ok((h, p)) => format!("{h}:{p}"),
            Err(_) if !hostport.contains(':') && !hostport.is_empty() => format!("{hostport}:80"),
            Err(_) => return Err(bad()),
        };
        Ok(Proxy { addr, credentials })
    }

    /// The proxy for `target_host`: `configured` if set (an empty string means "none"), else the
    /// environment's `HTTPS_PROXY`, unless `NO_PROXY` exempts the host.
    pub fn choose(configured: Option<&str>, target_host: &str) -> Result<Option<Proxy>, ProxyError> {
        Self::choose_with(configured, target_host, |k| std::env::var(k).ok())
    }

    fn choose_with(
        configured: Option<&str>,
        target_host: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyError> {
        let pick = |keys: [&str; 2]| keys.iter().find_map(|k| env(k).filter(|v| !v.trim().is_empty()));
        let url = match configured {
            Some(c) => Some(c.to_string()),
            None => pick(["HTTPS_PROXY", "https_proxy"]),
        };
        let Some(url) = url.filter(|u| !u.trim().is_empty()) else { return Ok(None) };
        // The environment's proxy is for the world outside: never for this host itself.
        let local = target_host == "localhost"
            || target_host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if configured.is_none() && local {
            return Ok(None);
        }
        if let Some(no) = pick(["NO_PROXY", "no_proxy"]) {
            if no_proxy_matches(&no, target_host) {
                return Ok(None);
            }
        }
        Proxy::parse(&url).map(Some)
    }

    /// A TCP connection to `target` (HOST:PORT) through the proxy's CONNECT tunnel.
    pub async fn tunnel(&self, target: &str, timeout: Duration) -> Result<TcpStream, ProxyError> {
        let proxy = self.addr.clone();
        let work = async {
            let mut tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|source| ProxyError::Connect { proxy: proxy.clone(), source })?;
            tcp.set_nodelay(true).map_err(|source| ProxyError::Connect { proxy: proxy.clone(), source })?;
            let auth = match &self.credentials {
                Some(c) => format!("Proxy-Authorization: Basic {c}\r\n"),
                None => String::new(),
            };
            let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: fleetadm\r\n{auth}\r\n");
            tcp.write_all(req.as_bytes())
                .await
                .map_err(|source| ProxyError::Connect { proxy: proxy.clone(), source })?;
            // Byte by byte up to the end of the head: nothing of the tunnel may be consumed.
            let mut head = Vec::with_capacity(256);
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                let n =
                    tcp.read(&mut byte).await.map_err(|source| ProxyError::Connect { proxy: proxy.clone(), source })?;
                if n == 0 {
                    return Err(ProxyError::BadAnswer { proxy: proxy.clone(), why: "connection closed".into() });
                }
                head.push(byte[0]);
                if head.len() > MAX_HEAD {
                    return Err(ProxyError::BadAnswer { proxy: proxy.clone(), why: "answer head too long".into() });
                }
            }
            judge(&head, &proxy, target)?;
            Ok(tcp)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::Timeout { proxy, secs: timeout.as_secs() }),
        }
    }
}

/// The proxy's answer to CONNECT: a 2xx status opens the tunnel.
fn judge(head: &[u8], proxy: &str, target: &str) -> Result<(), ProxyError> {
    let text = String::from_utf8_lossy(head);
    let status_line = text.lines().next().unwrap_or_default().trim().to_string();
    let mut parts = status_line.split_whitespace();
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if !version.starts_with("HTTP/1.") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        let shown = crate::redact::for_terminal(&status_line, true).into_owned();
        return Err(ProxyError::BadAnswer { proxy: proxy.to_string(), why: format!("status line {shown:?}") });
    }
    match code {
        c if c.starts_with('2') => Ok(()),
        "407" => Err(ProxyError::AuthRequired { proxy: proxy.to_string() }),
        _ => Err(ProxyError::Refused {
            proxy: proxy.to_string(),
            target: target.to_string(),
            status: crate::redact::for_terminal(&status_line, true).into_owned(),
        }),
    }
}

/// Does `NO_PROXY` exempt `host`?
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ip: Option<IpAddr> = host.parse().ok();
    no_proxy.split(',').map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        let entry = entry.to_ascii_lowercase();
        if entry == "*" {
            return true;
        }
        // An entry may carry a port (`host:9443`); the port is not compared.
        let bare = match crate::dial::split_host_port(&entry) {
            Ok((h, _)) => h,
            Err(_) => entry.clone(),
        };
        if let (Some(ip), Some((net, len))) = (ip, bare.split_once('/')) {
            return cidr_contains(net, len, ip);
        }
        if let (Some(ip), Ok(e)) = (ip, bare.parse::<IpAddr>()) {
            return ip == e;
        }
        let domain = bare.trim_start_matches('.');
        !domain.is_empty() && (host == domain || host.ends_with(&format!(".{domain}")))
    })
}

fn cidr_contains(net: &str, len: &str, ip: IpAddr) -> bool {
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) if len <= 128 => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn urls_parse_and_credentials_are_never_shown() {
        let p = Proxy::parse("http://bastion:3128").unwrap();
        assert_eq!((p.addr.as_str(), p.credentials.is_none()), ("bastion:3128", true));
        assert_eq!(Proxy::parse("10.0.0.1:8080").unwrap().addr, "10.0.0.1:8080");
        assert_eq!(Proxy::parse("http://proxy/").unwrap().addr, "proxy:80");
        assert_eq!(Proxy::parse("http://[fd00::1]:3128").unwrap().addr, "[fd00::1]:3128");
        let p = Proxy::parse("http://al%40ice:s3cr%3At@bastion:3128").unwrap();
        assert_eq!(
            p.credentials.as_deref(),
            Some(base64::engine::general_purpose::STANDARD.encode("al@ice:s3cr:t").as_str())
        );
        assert!(!format!("{p:?} {p}").contains("s3cr"));
        for bad in ["https://bastion:3128", "socks5://b:1", "http://b:3128/path", "http://user@b:1", "http://b:x", ""] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
        let e = Proxy::parse("https://u:hunter2@b:1").unwrap_err().to_string();
        assert!(e.contains("https:// proxies are not supported"), "{e}");
    }

    #[test]
    fn configured_beats_environment_and_no_proxy_exempts() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let e = env(&[
            ("HTTPS_PROXY", "http://envproxy:3128"),
            ("NO_PROXY", "localhost,.internal,10.1.0.0/16,192.168.1.5"),
        ]);
        assert_eq!(Proxy::choose_with(None, "ctl.example.com", e).unwrap().unwrap().addr, "envproxy:3128");
        assert_eq!(Proxy::choose_with(Some("http://mine:1"), "ctl.example.com", e).unwrap().unwrap().addr, "mine:1");
        assert!(Proxy::choose_with(Some(""), "ctl.example.com", e).unwrap().is_none(), "configured empty: none");
        for exempt in ["localhost", "ctl.internal", "internal", "10.1.2.3", "192.168.1.5"] {
            assert!(Proxy::choose_with(None, exempt, e).unwrap().is_none(), "{exempt}");
        }
        for proxied in ["10.2.0.1", "192.168.1.6", "notinternal", "ctl.internal.evil.com"] {
            assert!(Proxy::choose_with(None, proxied, e).unwrap().is_some(), "{proxied}");
        }
        assert!(Proxy::choose_with(None, "127.0.0.1", e).unwrap().is_none(), "loopback: not the environment's");
        assert!(Proxy::choose_with(Some("http://p:1"), "127.0.0.1", e).unwrap().is_some(), "unless configured");
        let lower = env(&[("https_proxy", "http://low:3128"), ("no_proxy", "*")]);
        assert!(Proxy::choose_with(None, "anything", lower).unwrap().is_none(), "* exempts all");
        assert!(Proxy::choose_with(None, "x", env(&[])).unwrap().is_none());
        assert!(no_proxy_matches("[fd00::/8]", "fd00::5") || no_proxy_matches("fd00::/8", "[fd00::5]"));
    }

    /// A CONNECT proxy for one connection that answers `status`, then relays to `upstream`.
    async fn one_shot_proxy(
        status: &'static str,
        upstream: std::net::SocketAddr,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                c.read_exact(&mut b).await.unwrap();
                head.push(b[0]);
            }
            c.write_all(status.as_bytes()).await.unwrap();
            if status.contains(" 200 ") {
                let mut up = TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (addr, h)
    }

    #[tokio::test]
    async fn a_tunnel_carries_bytes_end_to_end_and_refusals_say_why() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let (addr, seen) = one_shot_proxy("HTTP/1.1 200 Connection established\r\n\r\n", echo_addr).await;
        let p = Proxy::parse(&format!("http://u:pw@{addr}")).unwrap();
        let mut t = p.tunnel("ctl.example:9443", Duration::from_secs(5)).await.unwrap();
        t.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello", "bytes after the head go through untouched");
        drop(t);
        let head = tokio::time::timeout(Duration::from_secs(5), seen).await.expect("proxy finished").unwrap();
        assert!(head.starts_with("CONNECT ctl.example:9443 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Proxy-Authorization: Basic dTpwdw=="), "{head}");

        let (addr, _) = one_shot_proxy("HTTP/1.1 403 Forbidden\r\n\r\n", echo_addr).await;
        let e = Proxy::parse(&addr).unwrap().tunnel("ctl:9443", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(&e, ProxyError::Refused { status, .. } if status.contains("403")), "{e}");
        let (addr, _) = one_shot_proxy("HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", echo_addr).await;
        let e = Proxy::parse(&addr).unwrap().tunnel("ctl:9443", Duration::from_secs(5)).await.unwrap_err();
        assert!(e.to_string().contains("credentials"), "{e}");
        let (addr, _) = one_shot_proxy("SSH-2.0-OpenSSH\r\n\r\n", echo_addr).await;
        let e = Proxy::parse(&addr).unwrap().tunnel("ctl:9443", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(e, ProxyError::BadAnswer { .. }), "{e}");
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = silent.local_addr().unwrap().to_string();
        let e = Proxy::parse(&a).unwrap().tunnel("ctl:9443", Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, ProxyError::Timeout { .. }), "{e}");
        drop(silent);
        let e = Proxy::parse(&a).unwrap().tunnel("ctl:9443", Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(e, ProxyError::Connect { .. }), "{e}");
    }
}
