//! HTTP CONNECT proxies: the last rung of the ladder.
//!
//! The agent asks the proxy for a TCP tunnel to a broker address (always an
//! address already checked against the published CIDR, never a name the
//! proxy could resolve elsewhere) and runs TLS through it, so the proxy sees
//! only ciphertext and cannot impersonate the broker.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Environment variables consulted, in order, when no proxy is configured.
pub const PROXY_ENV: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];

/// An HTTP proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// `Proxy-Authorization: Basic` credentials (base64 of `user:pass`).
    auth: Option<String>,
    /// Where it came from (`config` or the variable's name).
    pub source: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credentials.
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("auth", &self.auth.as_ref().map(|_| "<set>"))
            .field("source", &self.source)
            .finish()
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// Why a proxy could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The URL is unusable.
    #[error(
        "proxy {url:?} ({source_name}) is not usable: {reason}; expected http://[user:pass@]host:port"
    )]
    BadUrl {
        /// The URL (credentials removed).
        url: String,
        /// Where it came from.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// The proxy could not be reached.
    #[error("cannot reach the proxy {proxy}: {reason}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// Why.
        reason: String,
    },
    /// The proxy answered with an error.
    #[error("the proxy {proxy} refused to connect to {target}: HTTP {status} {reason}{hint}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// The broker address asked for.
        target: SocketAddr,
        /// Status.
        status: u16,
        /// Reason phrase.
        reason: String,
        /// What to do.
        hint: &'static str,
    },
    /// The proxy's answer was not HTTP.
    #[error("the proxy {proxy} answered something that is not HTTP: {what}")]
    Garbled {
        /// The proxy.
        proxy: String,
        /// What went wrong.
        what: String,
    },
}

fn strip_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port]` (port 8080 by default, as
    /// curl does for HTTP proxies; a bare `host:port` is accepted too).
    pub fn parse(url: &str, source: &str) -> Result<Self, ProxyError> {
        let bad = |reason: &str| ProxyError::BadUrl {
            url: strip_credentials(url),
            source_name: source.to_string(),
            reason: reason.to_string(),
        };
        let text = url.trim();
        let rest = match text.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "only http:// proxies are supported, not {scheme}://"
                )));
            }
            None => text,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(bad("a proxy URL has no path"));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let decoded = tether_proto::connect_ip::percent_decode(userinfo)
                    .ok_or_else(|| bad("bad percent-encoding in the credentials"))?;
                if !decoded.contains(':') {
                    return Err(bad("credentials must be user:password"));
                }
                (
                    Some(data_encoding::BASE64.encode(decoded.as_bytes())),
                    hostport,
                )
            }
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("the port is not a number"))?,
                None if after.is_empty() => 8080,
                None => return Err(bad("junk after the host")),
            };
            (host.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| bad("the port is not a number"))?,
                ),
                None => (hostport.to_string(), 8080),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            host,
            port,
            auth,
            source: source.to_string(),
        })
    }

    /// The configured proxy, else the one in `HTTPS_PROXY`/`https_proxy`.
    pub fn from_config_or_env(configured: Option<&str>) -> Result<Option<Self>, ProxyError> {
        if let Some(url) = configured.filter(|u| !u.trim().is_empty()) {
            return Self::parse(url, "configuration").map(Some);
        }
        for var in PROXY_ENV {
            if let Ok(url) = std::env::var(var)
                && !url.trim().is_empty()
            {
                return Self::parse(&url, var).map(Some);
            }
        }
        Ok(None)
    }

    /// Whether credentials are set.
    pub fn has_credentials(&self) -> bool {
        self.auth.is_some()
    }

    /// Opens a TCP tunnel to `target` through the proxy.
    pub async fn connect(
        &self,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<TcpStream, ProxyError> {
        let shown = self.to_string();
        let unreachable = |reason: String| ProxyError::Unreachable {
            proxy: shown.clone(),
            reason,
        };
        let mut tcp =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| unreachable(format!("no answer within {} s", timeout.as_secs_f64())))?
                .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.auth {
            request.push_str(&format!("Proxy-Authorization: Basic {auth}\r\n"));
        }
        request.push_str("\r\n");
        let exchange = async {
            tcp.write_all(request.as_bytes()).await?;
            // Read the answer head byte by byte: nothing of the TLS stream
            // behind it may be consumed here.
            let mut head = Vec::with_capacity(256);
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() > 8192 {
                    return Ok(None);
                }
                if tcp.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the proxy closed the connection",
                    ));
                }
                head.push(byte[0]);
            }
            Ok::<_, std::io::Error>(Some(head))
        };
        let head = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {} s", timeout.as_secs_f64())))?
            .map_err(|e| unreachable(e.to_string()))?
            .ok_or_else(|| ProxyError::Garbled {
                proxy: shown.clone(),
                what: "an answer head over 8 KiB".into(),
            })?;
        let text = String::from_utf8_lossy(&head);
        let status_line = text.lines().next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let (version, status) = (parts.next(), parts.next().and_then(|s| s.parse().ok()));
        let reason = parts.next().unwrap_or_default().trim().to_string();
        let status: u16 = match (version, status) {
            (Some(v), Some(s)) if v.starts_with("HTTP/1.") => s,
            _ => {
                return Err(ProxyError::Garbled {
                    proxy: shown,
                    what: format!("{status_line:?}"),
                });
            }
        };
        if (200..300).contains(&status) {
            return Ok(tcp);
        }
        let hint = match status {
            407 if self.auth.is_some() => {
                " (the proxy rejected the credentials; check the user and password in the proxy URL)"
            }
            407 => {
                " (the proxy wants credentials: set http://user:password@host:port as the proxy)"
            }
            403 => {
                " (ask hospital IT to let the proxy CONNECT to the published CIDR on port 443; `tether firewall-rule` prints it)"
            }
            _ => "",
        };
        Err(ProxyError::Refused {
            proxy: shown,
            target,
            status,
            reason,
            hint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        let p = Proxy::parse("http://proxy.hospital.example:3128", "test").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.hospital.example", 3128));
        assert!(!p.has_credentials());
        let p = Proxy::parse("http://us%40er:p%3Ass@10.0.0.1:8080/", "test").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", 8080));
        assert_eq!(
            p.auth.as_deref(),
            Some(data_encoding::BASE64.encode(b"us@er:p:ss").as_str())
        );
        let p = Proxy::parse("[fd00::1]:3128", "test").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", 3128));
        assert_eq!(p.to_string(), "http://[fd00::1]:3128");
        assert_eq!(Proxy::parse("proxy", "t").unwrap().port, 8080);
        let err = Proxy::parse("socks5://user:secret@proxy:1080", "HTTPS_PROXY").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("only http://"), "{text}");
        assert!(!text.contains("secret"), "credentials leaked: {text}");
        assert!(Proxy::parse("http://proxy:port", "t").is_err());
        assert!(Proxy::parse("http://user@proxy:1", "t").is_err());
        // Debug output hides the credentials.
        let p = Proxy::parse("http://u:secret@proxy:1", "t").unwrap();
        assert!(!format!("{p:?}").contains("secret"));
    }

    /// A proxy that answers every CONNECT with `status`.
    async fn fake_proxy(status: &'static str) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(format!("HTTP/1.1 {status}\r\n\r\nafter").as_bytes())
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        (addr, task)
    }

    #[tokio::test]
    async fn connect_sends_credentials_and_reads_only_the_head() {
        let (addr, task) = fake_proxy("200 Connection established").await;
        let proxy = Proxy::parse(&format!("http://u:pw@{addr}"), "t").unwrap();
        let target: SocketAddr = "203.0.113.10:443".parse().unwrap();
        let mut tcp = proxy.connect(target, Duration::from_secs(5)).await.unwrap();
        let request = task.await.unwrap();
        assert!(request.starts_with("CONNECT 203.0.113.10:443 HTTP/1.1\r\n"));
        assert!(request.contains(&format!(
            "Proxy-Authorization: Basic {}",
            data_encoding::BASE64.encode(b"u:pw")
        )));
        // The bytes after the head belong to the tunnel.
        let mut rest = [0u8; 5];
        tcp.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"after");
    }

    #[tokio::test]
    async fn refusals_say_what_to_do() {
        let (addr, _task) = fake_proxy("407 Proxy Authentication Required").await;
        let proxy = Proxy::parse(&addr.to_string(), "t").unwrap();
        let err = proxy
            .connect("203.0.113.10:443".parse().unwrap(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("wants credentials"), "{err}");
    }
}
