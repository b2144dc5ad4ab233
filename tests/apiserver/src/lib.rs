//! Test-only in-process double of the Kubernetes API server.
//!
//! [`ApiServer::start`] binds `127.0.0.1:0` and serves the Kubernetes HTTP/JSON
//! API for a fixed table of resources (see [`resources::RESOURCES`]) faithfully
//! enough for a real `kube::Client`: CRUD, list with selectors and pagination,
//! watch (with bookmarks, resumption, 410 Expired and streaming lists),
//! merge / JSON / server-side-apply patches, the status subresource,
//! finalizers and deletion, discovery, plus a request log and fault injection
//! for tests. What it does *not* prove is listed in `tests/apiserver/README.md`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = keyway_apiserver_double::ApiServer::start().await?;
//! let client = server.client()?;
//! server.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"), "operator-token")?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```

pub mod discovery;
pub mod error;
pub mod kubeconfig;
pub mod patch;
pub mod resources;
pub mod selector;
mod server;
pub mod store;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, oneshot};

use crate::error::ApiError;
use crate::store::{Change, Outcome, Store};

/// Server options. Use `Options { .., ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Close every watch stream after `min(timeoutSeconds, cap)` (or after
    /// `cap` when the client sent no `timeoutSeconds`). `None`: only the
    /// client's `timeoutSeconds` applies.
    pub watch_timeout_cap: Option<Duration>,
    /// Period of `BOOKMARK` events on watches with `allowWatchBookmarks=true` (default 1s).
    pub bookmark_interval: Duration,
    /// Number of changes kept for watch resumption and paginated lists
    /// (default 10 000). Watching from an older resourceVersion answers
    /// 410 Expired, as after an etcd compaction.
    pub history_limit: usize,
    /// How many changes a watch may fall behind before its stream is ended
    /// (default 1024). Writers never wait for watchers.
    pub watch_buffer: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            watch_timeout_cap: None,
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            watch_buffer: 1024,
        }
    }
}

/// One request the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method (`GET`, `PATCH`, ...).
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw (still percent-encoded) query string, `""` if none.
    pub query: String,
    /// Bearer token from `Authorization: Bearer <token>`, if any.
    pub user: Option<String>,
    /// The request's `Content-Type`.
    pub content_type: Option<String>,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    /// HTTP status answered (200 for watches, which stream after it).
    pub status: u16,
}

#[derive(Debug)]
struct Fault {
    method: String,
    plural: String,
    remaining: usize,
    code: u16,
}

/// State shared by the handlers.
pub(crate) struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<Change>>,
    requests: Mutex<Vec<RequestRecord>>,
    faults: Mutex<Vec<Fault>>,
    opts: Options,
    /// Bumped to end every open watch stream.
    close: tokio::sync::watch::Sender<u64>,
    addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn lock_store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Runs a write under the store lock and broadcasts its changes before unlocking.
    pub(crate) fn write<F>(&self, f: F) -> Result<Outcome, ApiError>
    where
        F: FnOnce(&mut Store) -> Result<Outcome, ApiError>,
    {
        let mut store = self.lock_store();
        let out = f(&mut store)?;
        for c in &out.changes {
            // No receivers is fine.
            let _ = self.events.send(c.clone());
        }
        drop(store);
        Ok(out)
    }

    pub(crate) fn record(&self, r: RequestRecord) {
        lock(&self.requests).push(r);
    }

    pub(crate) fn take_fault(&self, method: &str, plural: &str) -> Option<u16> {
        let mut faults = lock(&self.faults);
        let idx = faults.iter().position(|f| {
            f.remaining > 0
                && (f.method == "*" || f.method.eq_ignore_ascii_case(method))
                && (f.plural == "*" || f.plural == plural)
        })?;
        let f = &mut faults[idx];
        f.remaining -= 1;
        let code = f.code;
        if f.remaining == 0 {
            faults.remove(idx);
        }
        Some(code)
    }
}

/// A running API server double. Dropping it stops the server and ends every watch stream.
pub struct ApiServer {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl ApiServer {
    /// Starts a server with default [`Options`] on `127.0.0.1:0`, on the current tokio runtime.
    pub async fn start() -> anyhow::Result<ApiServer> {
        Self::start_with(Options::default()).await
    }

    /// Starts a server with the given options on `127.0.0.1:0`, on the current tokio runtime.
    pub async fn start_with(opts: Options) -> anyhow::Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(opts.watch_buffer.max(1));
        let (close, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(opts.history_limit)),
            events,
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            opts,
            close,
            addr,
        });
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(shared.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!("apiserver double stopped: {e}");
            }
        });
        Ok(ApiServer {
            shared,
            task,
            stop: Some(stop_tx),
        })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A `kube::Client` for this server (no credentials). Must be called inside a tokio runtime.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        // The workspace compiles rustls with two providers (ring, and
        // aws-lc-rs via libp2p's QUIC); choose one before kube builds TLS.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    /// Writes a kubeconfig (YAML) whose current context points at this server
    /// and authenticates with `token: <user_token>`; default namespace `default`.
    pub fn write_kubeconfig(&self, path: &std::path::Path, user_token: &str) -> anyhow::Result<()> {
        std::fs::write(path, kubeconfig::render(&self.url(), user_token)?)?;
        Ok(())
    }

    /// Every request answered so far, in the order answered.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Makes the next `count` requests for resource `plural` (`"*"`: any resource)
    /// with HTTP `method` (`"*"`: any) answer `code` with a `Status` body
    /// (reason derived from the code, e.g. 500 InternalError, 503
    /// ServiceUnavailable, 409 Conflict, 429 TooManyRequests). Only resource
    /// requests (not discovery) are affected; watches are `GET`s. Rules are
    /// consumed in the order added.
    pub fn fail_next(&self, method: &str, plural: &str, count: usize, code: u16) {
        if count == 0 {
            return;
        }
        lock(&self.shared.faults).push(Fault {
            method: method.to_string(),
            plural: plural.to_string(),
            remaining: count,
            code,
        });
    }

    /// Reads a stored object directly (`group` is `""` for core resources;
    /// `namespace` is ignored for cluster-scoped resources).
    pub fn object(
        &self,
        group: &str,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let res = resources::find_by_plural(group, plural)?;
        self.shared
            .lock_store()
            .get(res, namespace.unwrap_or(""), name)
            .ok()
    }

    /// Every stored object of a resource, all namespaces, sorted by namespace then name.
    pub fn objects(&self, group: &str, plural: &str) -> Vec<Value> {
        match resources::find_by_plural(group, plural) {
            Some(res) => self.shared.lock_store().all(res),
            None => Vec::new(),
        }
    }

    /// How many objects of a kind satisfy `pred` (nothing is copied).
    pub fn count(&self, group: &str, plural: &str, pred: impl Fn(&Value) -> bool) -> usize {
        match resources::find_by_plural(group, plural) {
            Some(res) => self.shared.lock_store().count(res, pred),
            None => 0,
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().resource_version()
    }

    /// Ends every open watch stream now (clients re-watch from their last resourceVersion),
    /// like an apiserver restart or a dropped connection.
    pub fn close_watches(&self) {
        self.shared.close.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Drops all retained history, as an etcd compaction would: resuming a
    /// watch from any resourceVersion older than the current one then gets
    /// 410 Expired, as do outstanding continue tokens.
    pub fn compact(&self) {
        self.shared.lock_store().compact();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.close_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::WriteOptions;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const DEADLINE: Duration = Duration::from_secs(20);

    /// Opens a raw watch and returns the socket once the response headers arrived
    /// (at which point the watch is subscribed).
    async fn open_watch(server: &ApiServer, query: &str) -> (tokio::net::TcpStream, Vec<u8>) {
        let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let req = format!(
            "GET /api/v1/namespaces/ns/configmaps?watch=true&{query} HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed before headers");
            buf.extend_from_slice(&chunk[..n]);
        }
        (s, buf)
    }

    async fn read_rest(mut s: tokio::net::TcpStream, mut buf: Vec<u8>) -> String {
        let mut chunk = [0u8; 65536];
        // Stop at the end of the chunked body (the connection is kept alive) or at EOF.
        while !buf.ends_with(b"0\r\n\r\n") {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("stream did not end: {}", String::from_utf8_lossy(&buf)))
                .unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).to_string()
    }

    fn create_cm(server: &ApiServer, name: &str) {
        let res = resources::find("", "v1", "configmaps").unwrap();
        server
            .shared
            .write(|s| {
                s.create(
                    res,
                    "ns",
                    json!({"metadata": {"name": name}}),
                    &WriteOptions::default(),
                )
            })
            .unwrap();
    }

    #[tokio::test]
    async fn slow_watchers_are_cut_off_not_waited_for() {
        let server = ApiServer::start_with(Options {
            watch_buffer: 4,
            ..Default::default()
        })
        .await
        .unwrap();
        let (s, buf) = open_watch(&server, "resourceVersion=0").await;
        // 100 writes without yielding: the watch task cannot keep up with a
        // 4-event buffer, and the writes do not wait for it.
        for i in 0..100 {
            create_cm(&server, &format!("c{i}"));
        }
        let text = read_rest(s, buf).await;
        let events = text.matches("\"type\":\"ADDED\"").count();
        assert!(events < 100, "watch should have been cut off, got {events}");
        assert_eq!(server.objects("", "configmaps").len(), 100);
    }

    #[tokio::test]
    async fn dropping_the_server_ends_watches() {
        let server = ApiServer::start().await.unwrap();
        create_cm(&server, "a");
        let (s, buf) = open_watch(&server, "resourceVersion=0").await;
        drop(server);
        let text = read_rest(s, buf).await;
        assert!(text.contains("\"type\":\"ADDED\""));
    }

    #[tokio::test]
    async fn close_watches_and_compact() {
        let server = ApiServer::start().await.unwrap();
        create_cm(&server, "a");
        let rv = server.resource_version();
        create_cm(&server, "b");
        let (s, buf) = open_watch(&server, &format!("resourceVersion={rv}")).await;
        server.close_watches();
        let text = read_rest(s, buf).await;
        assert_eq!(text.matches("\"type\":\"ADDED\"").count(), 1, "{text}");
        assert!(text.contains("\"name\":\"b\""));
        server.compact();
        let (s, buf) = open_watch(&server, &format!("resourceVersion={rv}")).await;
        let text = read_rest(s, buf).await;
        assert!(text.contains("\"type\":\"ERROR\""), "{text}");
        assert!(text.contains("\"code\":410"));
        assert!(text.contains("too old resource version"));
    }
}
