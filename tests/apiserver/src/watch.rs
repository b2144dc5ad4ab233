//! Watch streams: newline-delimited JSON `WatchEvent`s over a chunked response.
//!
//! A watch subscribes to the store's broadcast channel while holding the store
//! lock (writes broadcast under the same lock), so no change between the
//! initial state it is sent and the live stream can be missed. A watcher that
//! falls more than the channel capacity behind gets its stream ended (the
//! client re-watches, and re-lists if its resourceVersion has left the history);
//! writers never wait for watchers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::Shared;
use crate::error::ApiError;
use crate::resources::ResourceDef;
use crate::selector::Selectors;
use crate::server::to_partial_metadata;
use crate::store::{Change, event_for};

/// Parameters of one watch request.
pub(crate) struct WatchRequest {
    pub res: &'static ResourceDef,
    pub ns: Option<String>,
    pub sel: Selectors,
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    pub metadata_only: bool,
}

struct WatchState {
    pending: VecDeque<Bytes>,
    finished: bool,
    rx: broadcast::Receiver<Arc<Change>>,
    close: watch::Receiver<u64>,
    deadline: Option<Instant>,
    bookmarks: Option<Interval>,
    last_rv: u64,
    req: WatchRequest,
}

fn line(ty: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": ty, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

impl WatchState {
    fn render(&self, ty: &str, obj: &Value) -> Bytes {
        if self.req.metadata_only {
            line(ty, &to_partial_metadata(obj))
        } else {
            line(ty, obj)
        }
    }

    fn bookmark(&self, initial_end: bool) -> Bytes {
        let (kind, api_version) = if self.req.metadata_only {
            (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            )
        } else {
            (self.req.res.kind.to_string(), self.req.res.api_version())
        };
        let mut metadata = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}),
        )
    }

    async fn next(&mut self) -> Option<Bytes> {
        if let Some(b) = self.pending.pop_front() {
            return Some(b);
        }
        if self.finished {
            return None;
        }
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let deadline = self.deadline.unwrap_or(far);
        loop {
            let step = {
                let close = &mut self.close;
                let rx = &mut self.rx;
                let bookmarks = &mut self.bookmarks;
                tokio::select! {
                    biased;
                    _ = close.changed() => Step::Closed,
                    r = rx.recv() => Step::Change(r),
                    _ = tokio::time::sleep_until(deadline) => Step::Closed,
                    _ = tick(bookmarks) => Step::Bookmark,
                }
            };
            match step {
                Step::Closed => return None,
                // Lagged (fell too far behind) or closed: end the stream.
                Step::Change(Err(_)) => return None,
                Step::Change(Ok(change)) => {
                    if change.rv <= self.last_rv {
                        continue;
                    }
                    self.last_rv = change.rv;
                    if let Some((ty, obj)) =
                        event_for(&change, self.req.res, self.req.ns.as_deref(), &self.req.sel)
                    {
                        return Some(self.render(ty, obj));
                    }
                }
                Step::Bookmark => return Some(self.bookmark(false)),
            }
        }
    }
}

enum Step {
    Closed,
    Change(Result<Arc<Change>, broadcast::error::RecvError>),
    Bookmark,
}

async fn tick(bookmarks: &mut Option<Interval>) {
    match bookmarks {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Starts a watch and builds the streaming response.
pub(crate) fn start(shared: &Arc<Shared>, req: WatchRequest) -> Result<Response<Body>, ApiError> {
    let (rx, start) = {
        let store = shared.lock_store();
        let rx = shared.events.subscribe();
        let start = store.watch_start(
            req.res,
            req.ns.as_deref(),
            &req.sel,
            req.resource_version.as_deref(),
            req.send_initial_events,
        )?;
        (rx, start)
    };
    let timeout = match (req.timeout, shared.opts.watch_timeout_cap) {
        (Some(t), Some(cap)) => Some(t.min(cap)),
        (t, cap) => t.or(cap),
    };
    let bookmarks = req.bookmarks.then(|| {
        let period = shared.opts.bookmark_interval.max(Duration::from_millis(10));
        let mut i = tokio::time::interval_at(Instant::now() + period, period);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let mut state = WatchState {
        pending: VecDeque::new(),
        finished: false,
        rx,
        close: shared.close.subscribe(),
        // An absurdly large timeout overflows `Instant`: treat it as no timeout.
        deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
        bookmarks,
        last_rv: start.start_rv,
        req,
    };
    if let Some(err) = start.expired {
        state.pending.push_back(line("ERROR", &err.to_status()));
        state.finished = true;
    } else {
        for (ty, obj) in &start.initial {
            let b = state.render(ty, obj);
            state.pending.push_back(b);
        }
        if state.req.send_initial_events {
            let b = state.bookmark(true);
            state.pending.push_back(b);
        }
    }
    let stream = futures::stream::unfold(state, |mut st| async move {
        st.next().await.map(|b| (Ok::<Bytes, Infallible>(b), st))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
