//! The HTTP server's connections: an accept loop over hyper's HTTP/1 server that no
//! client, however slow, can use to lock the others out.
//!
//! `axum::serve` waits for a request head as long as the client likes and accepts
//! connections until the process runs out of file descriptors; then `accept` fails with
//! EMFILE in a loop, and every client (and every outgoing connection to Telegram or a
//! provider) is locked out. Here:
//! - **Timeouts for a client that keeps the server waiting**: a request head must arrive
//!   within [`ConnectionLimits::header_timeout`] (from the connection's start, or from its
//!   first byte on a kept-alive connection), a request body within
//!   [`ConnectionLimits::body_timeout`] of its head; a kept-alive connection may sit idle for
//!   [`ConnectionLimits::idle_timeout`]; a response the client does not read may stall for
//!   [`ConnectionLimits::write_timeout`]. hyper's own `header_read_timeout` is off: it
//!   starts when the previous response ends, so it cannot tell an idle kept-alive
//!   connection from a slow head.
//! - **A cap on open connections** ([`ConnectionLimits::max_connections`], derived from the
//!   open-file limit with a reserve for everything else: see `crate::host::nofile`). At the
//!   cap, a new connection sheds the one that has kept the server waiting longest (a slow
//!   head or body, an idle kept-alive connection, a client not reading its response); a
//!   connection whose request the server is working on (a completion being generated, an
//!   SSE stream being read) is never shed nor timed out. A new client's request arrives at
//!   once, so it is the last to be shed: well-behaved clients and `/health` always get in.
//! - **Accept errors do not spin**: out of descriptors (EMFILE, ENFILE) or memory, the
//!   longest-waiting connection is shed and accepting pauses (10 ms, doubling to 1 s);
//!   the warning is logged at most once per [`WARN_EVERY`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

/// How often, at most, a warning about the same kind of trouble is logged.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// The largest read buffer of a connection (hyper's default is ~400 KiB): a request head
/// must fit in it, so this also bounds a header flood's memory.
const MAX_BUF: usize = 64 * 1024;
/// The first pause after an accept error; doubled up to [`MAX_ACCEPT_BACKOFF`].
const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause after an accept error.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// What a connection beyond the cap is told when none can be shed for it.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
    retry-after: 1\r\nconnection: close\r\ncontent-length: 85\r\n\r\n\
    {\"error\":{\"message\":\"too many open connections\",\"type\":\"server_error\",\"code\":\"busy\"}}";

/// How many connections the server holds, and how long a client may keep it waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once; beyond it the longest-waiting one is shed.
    pub max_connections: usize,
    /// How long a request head may take: from the connection's start, or from the first
    /// byte of the next request on a kept-alive connection.
    pub header_timeout: Duration,
    /// How long a request body may take, from the end of its head.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a response may wait for the client to read it.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits for at most `max_connections` open connections, with the default
    /// timeouts: 10 s for a head, 30 s for a body, 60 s idle, 60 s of a stalled write.
    pub fn with_max_connections(max_connections: usize) -> Self {
        Self {
            max_connections: max_connections.max(1),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        }
    }
}

impl Default for ConnectionLimits {
    /// The limits under systemd's default open-file limit (1024).
    fn default() -> Self {
        Self::with_max_connections(crate::host::nofile::http_connection_cap(Some(
            crate::host::nofile::ASSUMED_SOFT_LIMIT,
        )))
    }
}

/// Milliseconds on the server's clock (since it started); [`NEVER`] for "not set".
type Millis = u64;
const NEVER: Millis = u64::MAX;
/// How long a response must have waited for its client to read it before its
/// connection may be shed (a moment's back-pressure is normal).
const STALL_SHEDDABLE: Duration = Duration::from_secs(5);

fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(NEVER)
}

/// What a connection is doing, as the watchdog and the shedding see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    /// When it started waiting for its client (accepted, or its last response ended).
    waiting_since: Millis,
    /// When the first byte of the next request arrived, if one did since.
    head_since: Millis,
    /// When the request now open had its head read, if one is open.
    request_since: Millis,
    /// Whether the server is working on a request (its whole request arrived, or its
    /// response started).
    working: bool,
    /// When writing the response last blocked on the client, if it is blocked now.
    write_stalled_since: Millis,
    /// Requests finished on this connection.
    served: u64,
}

impl Snapshot {
    /// When the connection times out, if it can.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Millis> {
        let after = |since: Millis, timeout: Duration| Some(since.saturating_add(millis(timeout)));
        if self.working {
            return match self.write_stalled_since {
                NEVER => None,
                since => after(since, limits.write_timeout),
            };
        }
        if self.request_since != NEVER {
            after(self.request_since, limits.body_timeout)
        } else if self.served == 0 {
            after(self.waiting_since, limits.header_timeout)
        } else if self.head_since != NEVER {
            after(self.head_since, limits.header_timeout)
        } else {
            after(self.waiting_since, limits.idle_timeout)
        }
    }

    /// Since when the connection has kept the server waiting at `now`, if it has: the
    /// smallest is shed first. A connection the server works on is never shed, unless its
    /// client has not read its response for [`STALL_SHEDDABLE`].
    fn waiting_since(&self, now: Millis) -> Option<Millis> {
        if !self.working {
            Some(self.waiting_since)
        } else if self.write_stalled_since != NEVER
            && now.saturating_sub(self.write_stalled_since) >= millis(STALL_SHEDDABLE)
        {
            Some(self.write_stalled_since)
        } else {
            None
        }
    }
}

/// One connection's live state, shared by its task, its I/O, its requests and the registry.
struct Activity {
    clock: Clock,
    waiting_since: AtomicU64,
    head_since: AtomicU64,
    request_since: AtomicU64,
    /// Requests the server works on (0 or 1 on HTTP/1; a count keeps it honest).
    working: AtomicU32,
    write_stalled_since: AtomicU64,
    served: AtomicU64,
    /// Set when the connection is to be closed to make room.
    shed: AtomicBool,
    /// Wakes the connection's task: its state changed, or it is shed.
    changed: Notify,
}

impl Activity {
    fn new(clock: Clock) -> Self {
        let now = clock.now();
        Self {
            clock,
            waiting_since: AtomicU64::new(now),
            head_since: AtomicU64::new(NEVER),
            request_since: AtomicU64::new(NEVER),
            working: AtomicU32::new(0),
            write_stalled_since: AtomicU64::new(NEVER),
            served: AtomicU64::new(0),
            shed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            waiting_since: self.waiting_since.load(Ordering::Relaxed),
            head_since: self.head_since.load(Ordering::Relaxed),
            request_since: self.request_since.load(Ordering::Relaxed),
            working: self.working.load(Ordering::Relaxed) > 0,
            write_stalled_since: self.write_stalled_since.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
        }
    }

    /// Bytes arrived: the first of a request head starts its timeout.
    fn on_read(&self) {
        if self.request_since.load(Ordering::Relaxed) == NEVER
            && self.head_since.load(Ordering::Relaxed) == NEVER
        {
            self.head_since.store(self.clock.now(), Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// A write blocked on the client (`true`) or went through (`false`).
    fn on_write(&self, blocked: bool) {
        let stalled = self.write_stalled_since.load(Ordering::Relaxed) != NEVER;
        if blocked && !stalled {
            self.write_stalled_since
                .store(self.clock.now(), Ordering::Relaxed);
            self.changed.notify_one();
        } else if !blocked && stalled {
            self.write_stalled_since.store(NEVER, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }

    /// Marks the connection to be closed to make room; false if it already was.
    fn shed(&self) -> bool {
        let first = !self.shed.swap(true, Ordering::Relaxed);
        self.changed.notify_one();
        first
    }
}

/// Milliseconds since the server started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> Millis {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn instant(&self, at: Millis) -> Instant {
        self.0 + Duration::from_millis(at)
    }
}

/// One request on a connection: the head has been read. The connection is working on it
/// once its body has all arrived or its response has started; it is finished when both
/// its request body and its response body are dropped.
struct RequestGuard {
    conn: Arc<Activity>,
    working: AtomicBool,
}

impl RequestGuard {
    fn begin(conn: Arc<Activity>) -> Arc<Self> {
        conn.request_since
            .store(conn.clock.now(), Ordering::Relaxed);
        conn.head_since.store(NEVER, Ordering::Relaxed);
        conn.changed.notify_one();
        Arc::new(Self {
            conn,
            working: AtomicBool::new(false),
        })
    }

    /// The server has all it needs from the client for this request.
    fn work(&self) {
        if !self.working.swap(true, Ordering::Relaxed) {
            self.conn.working.fetch_add(1, Ordering::Relaxed);
            self.conn.changed.notify_one();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let conn = &self.conn;
        if *self.working.get_mut() {
            conn.working.fetch_sub(1, Ordering::Relaxed);
        }
        conn.request_since.store(NEVER, Ordering::Relaxed);
        conn.head_since.store(NEVER, Ordering::Relaxed);
        conn.waiting_since
            .store(conn.clock.now(), Ordering::Relaxed);
        conn.served.fetch_add(1, Ordering::Relaxed);
        conn.changed.notify_one();
    }
}

/// A request body that tells its request when it has all arrived.
struct RequestBody {
    inner: Incoming,
    guard: Arc<RequestGuard>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.guard.work();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request open until it is sent (or dropped).
struct ResponseBody {
    inner: Body,
    _guard: Arc<RequestGuard>,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client's socket, telling its connection when bytes arrive and when writes block.
struct Watched {
    stream: TcpStream,
    conn: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.conn.on_write(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.conn.on_write(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.conn.on_write(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The open connections.
struct Registry {
    clock: Clock,
    conns: Mutex<HashMap<u64, Arc<Activity>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        // Every critical section is a map operation: nothing is left half-done.
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open connections not already shed.
    fn open(&self) -> usize {
        self.lock()
            .values()
            .filter(|c| !c.shed.load(Ordering::Relaxed))
            .count()
    }

    /// Sheds the connection that has kept the server waiting longest; false if every
    /// connection is being worked on.
    fn shed_one(&self) -> bool {
        let now = self.clock.now();
        let conns = self.lock();
        let victim = conns
            .values()
            .filter(|c| !c.shed.load(Ordering::Relaxed))
            .filter_map(|c| c.snapshot().waiting_since(now).map(|since| (since, c)))
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, conn)) => conn.shed(),
            None => false,
        }
    }
}

/// Counts and rate-limits warnings of one kind.
struct Warner {
    last: Option<Instant>,
    count: u64,
}

impl Warner {
    fn new() -> Self {
        Self {
            last: None,
            count: 0,
        }
    }

    /// Counts one event; returns how many happened since the last warning when it is time
    /// to warn again.
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let due = self.last.is_none_or(|last| last.elapsed() >= WARN_EVERY);
        if due {
            self.last = Some(Instant::now());
            Some(std::mem::take(&mut self.count))
        } else {
            None
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets the
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let registry = Arc::new(Registry {
        clock: Clock(Instant::now()),
        conns: Mutex::new(HashMap::new()),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut backoff = FIRST_ACCEPT_BACKOFF;
    let mut shed_warner = Warner::new();
    let mut refused_warner = Warner::new();
    let mut error_warner = Warner::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            // The client gave up before it was accepted: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: make room, and do not spin.
                let shed = registry.shed_one();
                if let Some(count) = error_warner.tick() {
                    tracing::warn!(
                        error = %e,
                        count,
                        shed,
                        pause_ms = backoff.as_millis() as u64,
                        "HTTP accept failed; shedding the longest-waiting connection and pausing"
                    );
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_ACCEPT_BACKOFF;
        if registry.open() >= limits.max_connections {
            if registry.shed_one() {
                if let Some(count) = shed_warner.tick() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        count,
                        "HTTP connections at the cap: shedding the longest-waiting ones"
                    );
                }
            } else {
                // Every connection is being served: this one is told to come back.
                if let Some(count) = refused_warner.tick() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        count,
                        "HTTP connections at the cap, all busy: refusing new ones with 503"
                    );
                }
                let _ = stream.try_write(BUSY_RESPONSE);
                continue;
            }
        }
        // Replies stream token by token: do not hold small writes back.
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Activity::new(registry.clock));
        registry.lock().insert(id, Arc::clone(&conn));
        let registry = Arc::clone(&registry);
        let router = router.clone();
        let stop_rx = stop_rx.clone();
        tasks.spawn(async move {
            let _registered = Registered { registry, id };
            serve_connection(stream, conn, router, limits, stop_rx).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Errors of one connection attempt (the client left before it was accepted), as hyper
/// and axum tell them apart from errors of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Why a connection ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    Shed,
    TimedOut,
}

/// Takes a connection out of the registry when its task ends, however it ends.
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Serves one connection until it ends, times out, or is shed; on shutdown, finishes
/// the request in flight and closes.
async fn serve_connection(
    stream: TcpStream,
    conn: Arc<Activity>,
    router: Router,
    limits: ConnectionLimits,
    mut stop_rx: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Watched {
        stream,
        conn: Arc::clone(&conn),
    });
    let requests = Arc::clone(&conn);
    let service = service_fn(move |request: Request<Incoming>| {
        let (parts, incoming) = request.into_parts();
        let guard = RequestGuard::begin(Arc::clone(&requests));
        if incoming.is_end_stream() {
            guard.work();
        }
        let body = RequestBody {
            inner: incoming,
            guard: Arc::clone(&guard),
        };
        let request = Request::from_parts(parts, Body::new(body));
        let router = router.clone();
        async move {
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            // The response has started: from here the server is the one working.
            guard.work();
            Ok::<_, Infallible>(response.map(|inner| ResponseBody {
                inner,
                _guard: guard,
            }))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_BUF);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut draining = false;
    let closed = loop {
        if conn.shed.load(Ordering::Relaxed) {
            break Some(Closed::Shed);
        }
        let deadline = conn.snapshot().deadline(&limits);
        if deadline.is_some_and(|deadline| deadline <= conn.clock.now()) {
            break Some(Closed::TimedOut);
        }
        let timeout = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(conn.clock.instant(deadline)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                break None;
            }
            () = conn.changed.notified() => {}
            () = timeout => {}
            _ = stop_rx.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    };
    if let Some(closed) = closed {
        tracing::debug!(?closed, "HTTP connection closed by the server");
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::{get, post};
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        max_connections: 100,
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(60),
        write_timeout: Duration::from_secs(60),
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            waiting_since: 1_000,
            head_since: NEVER,
            request_since: NEVER,
            working: false,
            write_stalled_since: NEVER,
            served: 0,
        }
    }

    #[test]
    fn each_wait_has_its_timeout() {
        // A new connection: its head must arrive within the header timeout of the accept.
        let new = snapshot();
        assert_eq!(new.deadline(&LIMITS), Some(11_000));
        // Kept alive and idle: the idle timeout.
        let idle = Snapshot { served: 1, ..new };
        assert_eq!(idle.deadline(&LIMITS), Some(61_000));
        // Kept alive, the next head has begun: the header timeout from its first byte.
        let head = Snapshot {
            head_since: 5_000,
            ..idle
        };
        assert_eq!(head.deadline(&LIMITS), Some(15_000));
        // Head read, body coming: the body timeout from the head.
        let body = Snapshot {
            request_since: 7_000,
            ..head
        };
        assert_eq!(body.deadline(&LIMITS), Some(37_000));
        // The server works on it: no timeout, unless the client stops reading.
        let working = Snapshot {
            working: true,
            ..body
        };
        assert_eq!(working.deadline(&LIMITS), None);
        let stalled = Snapshot {
            write_stalled_since: 9_000,
            ..working
        };
        assert_eq!(stalled.deadline(&LIMITS), Some(69_000));
    }

    #[test]
    fn only_clients_that_keep_the_server_waiting_are_shed() {
        let waiting = snapshot();
        assert_eq!(waiting.waiting_since(50_000), Some(1_000));
        let working = Snapshot {
            working: true,
            ..waiting
        };
        assert_eq!(working.waiting_since(50_000), None);
        let stalled = Snapshot {
            write_stalled_since: 48_000,
            ..working
        };
        assert_eq!(
            stalled.waiting_since(50_000),
            None,
            "a moment's back-pressure"
        );
        assert_eq!(stalled.waiting_since(60_000), Some(48_000));
    }

    #[test]
    fn the_busy_response_is_well_formed() {
        let text = std::str::from_utf8(BUSY_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    /// A server over a few test routes: `/fast`, `/stream` (ten chunks, 100 ms apart) and
    /// `/echo` (reads the body).
    async fn server(limits: ConnectionLimits) -> SocketAddr {
        let router = Router::new()
            .route("/fast", get(|| async { "ok" }))
            .route(
                "/stream",
                get(|| async {
                    let chunks = futures::stream::iter(0..10).then(|i| async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Infallible>(format!("chunk {i}\n"))
                    });
                    Body::from_stream(chunks)
                }),
            )
            .route("/echo", post(|body: Bytes| async move { body }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, router, limits, std::future::pending()));
        addr
    }

    /// Whether the server closes `stream` within `within` (reading and dropping any bytes).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    /// Sends a GET for `path` on `stream` and reads one response (until `end` is seen).
    async fn get_on(stream: &mut TcpStream, path: &str, end: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(Duration::from_secs(10), async {
            while !String::from_utf8_lossy(&seen).contains(end) {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        String::from_utf8_lossy(&seen).into_owned()
    }

    fn short(max_connections: usize) -> ConnectionLimits {
        ConnectionLimits {
            max_connections,
            header_timeout: Duration::from_millis(300),
            body_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(1500),
            write_timeout: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn a_slow_head_or_body_is_closed_but_an_idle_connection_waits_longer() {
        let addr = server(short(100)).await;
        let mut head = TcpStream::connect(addr).await.unwrap();
        head.write_all(b"GET /fast HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut head, Duration::from_secs(5)).await);

        let mut body = TcpStream::connect(addr).await.unwrap();
        body.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        assert!(closed_within(&mut body, Duration::from_secs(5)).await);

        // Kept alive: idle past the header timeout, then a second request is served.
        let mut kept = TcpStream::connect(addr).await.unwrap();
        assert!(
            get_on(&mut kept, "/fast", "ok")
                .await
                .starts_with("HTTP/1.1 200")
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            get_on(&mut kept, "/fast", "ok")
                .await
                .starts_with("HTTP/1.1 200")
        );
        // Past the idle timeout, it is closed.
        assert!(closed_within(&mut kept, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_stream_outlives_every_timeout() {
        let addr = server(short(100)).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // Ten chunks 100 ms apart: three times the header, body and write timeouts.
        let response = get_on(&mut stream, "/stream", "chunk 9").await;
        assert!(response.contains("chunk 0"), "{response}");
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_waiting_connection_makes_room() {
        let mut limits = short(3);
        limits.header_timeout = Duration::from_secs(30);
        let addr = server(limits).await;
        let mut slow = Vec::new();
        for _ in 0..3 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(b"GET /fast HTTP/1.1\r\n").await.unwrap();
            slow.push(stream);
            // Distinct waiting times.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut client = TcpStream::connect(addr).await.unwrap();
        assert!(
            get_on(&mut client, "/fast", "ok")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            closed_within(&mut slow[0], Duration::from_secs(5)).await,
            "the oldest is shed"
        );
        assert!(!closed_within(&mut slow[2], Duration::from_millis(200)).await);
    }

    #[tokio::test]
    async fn at_the_cap_with_every_connection_working_a_new_one_is_told_to_retry() {
        let addr = server(short(1)).await;
        let mut streaming = TcpStream::connect(addr).await.unwrap();
        streaming
            .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), refused.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 503"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), streaming.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&rest).contains("chunk 9"));
    }
}
