//! A TCP proxy between a worker process and Postgres that a test can cut, to
//! put the worker on the far side of a network partition while the test (and
//! other workers) still reach the database directly.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards loopback connections to the test database's server until `cut`.
pub struct Proxy {
    /// The database URL rewritten to go through the proxy.
    pub url: String,
    cut: CancellationToken,
    stop: CancellationToken,
    /// Connections accepted after the cut: held open, never answered.
    blackholed: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Starts a proxy for `database_url` (which must name a TCP host and port)
    /// on a free loopback port.
    pub async fn start(database_url: &str) -> Self {
        let mut url = url::Url::parse(database_url).expect("the database URL parses");
        let host = url
            .host_str()
            .expect("the database URL names a host")
            .to_owned();
        let port = url.port().unwrap_or(5432);
        let upstream: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .expect("resolve the database host")
            .next()
            .expect("the database host has an address");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("address");
        url.set_host(Some("127.0.0.1")).expect("set host");
        url.set_port(Some(local.port())).expect("set port");
        let proxy = Proxy {
            url: url.to_string(),
            cut: CancellationToken::new(),
            stop: CancellationToken::new(),
            blackholed: Arc::default(),
        };
        tokio::spawn(accept(
            listener,
            upstream,
            proxy.cut.clone(),
            proxy.stop.clone(),
            proxy.blackholed.clone(),
        ));
        proxy
    }

    /// Drops every open connection and blackholes new ones: they are accepted
    /// and never forwarded nor answered, as behind a partition.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.cancel();
        if let Ok(mut held) = self.blackholed.lock() {
            held.clear();
        }
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: CancellationToken,
    stop: CancellationToken,
    blackholed: Arc<Mutex<Vec<TcpStream>>>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else { continue };
        if cut.is_cancelled() {
            if let Ok(mut held) = blackholed.lock() {
                held.push(client);
            }
            continue;
        }
        tokio::spawn(forward(client, upstream, cut.clone()));
    }
}

/// Copies bytes both ways until either side closes or the proxy is cut; then
/// both sockets are dropped, which closes them.
async fn forward(mut client: TcpStream, upstream: SocketAddr, cut: CancellationToken) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
    }
}
