//! The OpenAI-compatible provider over several servers (`--openai-base-url a,b,c`): a
//! fleet of llama-server, vLLM, TGI, SGLang or mistral-bot processes behind one front.
//!
//! Each request goes to its conversation's server ([`route`]: rendezvous hashing of the
//! affinity key with bounded load), so a returning chat reaches the server holding its KV
//! cache. A server that fails (cannot be reached, answers 5xx, breaks its stream before
//! any text) is marked down and the request is tried on the conversation's next server at
//! once; a task probes the down server until it answers, and then its conversations return
//! to it. The probe asks `GET /ready` (mistral-bot's readiness: 503 while its model loads,
//! when its `/health` already answers 200), else `GET /health` (llama-server's, vLLM's,
//! TGI's and SGLang's), else `GET /v1/models`; a server without the route (404) is asked
//! the next one, any other answer is the server's. Only when every server has failed
//! does the chain see a failure. A request refused for what it asks (400, 413) is not the
//! server's fault and is not tried elsewhere; a busy server (429) is passed over for this
//! request without being marked down.
//!
//! Per-server figures go to [`Metrics::set_fleet_source`] (`/metrics`, `/dialogue_metrics`,
//! the dashboard).

pub mod route;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream;
use url::Url;

use super::openai::endpoint;
use super::{EventStream, Fault, OpenAiFlavor, OpenAiProvider, Provider, ProviderError};
use crate::chat::{AffinityKey, ChatMessage, ChatRequest, Role, StreamEvent};
use crate::config::CloudConfig;
use crate::metrics::{Metrics, ServerFigures};
use route::{Router, ServerLoad, server_id};

/// The first wait before probing a server marked down again.
const PROBE_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two probes of a down server.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One server of the fleet.
struct Server {
    /// Its base URL, as configured (the metric label).
    url: String,
    /// The client of its API.
    provider: OpenAiProvider,
    /// `GET {root}/ready` then `GET {root}/health`: the readiness routes, in the order asked.
    readiness: [Option<Url>; 2],
    /// `GET {base}/models`, every OpenAI-compatible server's.
    models: Option<Url>,
    /// Marked down after a failure, until a probe succeeds.
    down: AtomicBool,
    /// A probe task runs for it.
    probing: AtomicBool,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// What the provider and its probe tasks share.
struct Shared {
    servers: Vec<Server>,
    router: Mutex<Router>,
    client: reqwest::Client,
    api_key: Option<crate::config::Secret>,
}

/// The generic OpenAI-compatible provider over a fleet of servers.
pub struct FleetProvider {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FleetProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.shared.servers.iter().map(|s| s.url.as_str()).collect();
        f.debug_struct("FleetProvider")
            .field("servers", &urls)
            .finish_non_exhaustive()
    }
}

/// `{base without a trailing /v1}/{route}`: where the servers put their health routes.
fn root_url(base: &Url, route: &str) -> Option<Url> {
    let trimmed = base.as_str().trim_end_matches('/');
    let root = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    Url::parse(&format!("{root}/{route}")).ok()
}

impl FleetProvider {
    /// A fleet of `urls`, each served as `config` says (key, model, timeout), recording
    /// its per-server figures in `metrics`.
    pub fn new(
        client: reqwest::Client,
        config: &CloudConfig,
        urls: &[Url],
        metrics: &Metrics,
    ) -> Self {
        let servers: Vec<Server> = urls
            .iter()
            .map(|url| {
                let server_config = CloudConfig {
                    base_url: url.clone(),
                    ..config.clone()
                };
                Server {
                    url: url.as_str().trim_end_matches('/').to_string(),
                    provider: OpenAiProvider::new(
                        OpenAiFlavor::Generic,
                        client.clone(),
                        &server_config,
                    ),
                    readiness: [root_url(url, "ready"), root_url(url, "health")],
                    models: endpoint(url, "models").ok(),
                    down: AtomicBool::new(false),
                    probing: AtomicBool::new(false),
                    in_flight: AtomicUsize::new(0),
                    requests: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                }
            })
            .collect();
        let router = Router::new(servers.iter().map(|s| server_id(&s.url)).collect());
        let shared = Arc::new(Shared {
            servers,
            router: Mutex::new(router),
            client,
            api_key: config.api_key.clone(),
        });
        let weak = Arc::downgrade(&shared);
        metrics.set_fleet_source(move || weak.upgrade().map(|s| s.figures()).unwrap_or_default());
        Self { shared }
    }

    /// Each server's figures now.
    pub fn figures(&self) -> Vec<ServerFigures> {
        self.shared.figures()
    }
}

/// The routing key of a request: its affinity key, or (an API client that named no
/// session) a hash of how its conversation began — the system prompt and the first user
/// message, which every later turn of it repeats.
fn route_key(request: &ChatRequest) -> u64 {
    if let Some(key) = request.affinity {
        return key.route_hash();
    }
    let first = |role: Role| {
        request
            .messages
            .iter()
            .find(|m| m.role == role)
            .map_or("", |m: &ChatMessage| m.content.as_str())
    };
    let opening = format!("{}\u{0}{}", first(Role::System), first(Role::User));
    AffinityKey::of(&opening, 0).route_hash()
}

fn lock(router: &Mutex<Router>) -> std::sync::MutexGuard<'_, Router> {
    // The router's maps stay consistent whatever panicked while it was held.
    router.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a failed attempt on one server means for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The server failed: mark it down, try the next.
    Down,
    /// The server is busy: try the next, leave it up.
    Busy,
    /// The request itself (or the set-up shared by every server): give up at once.
    Final,
}

fn verdict(error: &ProviderError) -> Verdict {
    match error {
        ProviderError::Connect(_)
        | ProviderError::Timeout
        | ProviderError::Cut(_)
        | ProviderError::Malformed(_)
        | ProviderError::Empty => Verdict::Down,
        ProviderError::Status { status, .. } if *status >= 500 => Verdict::Down,
        _ => match error.fault() {
            Fault::Busy => Verdict::Busy,
            Fault::Provider | Fault::Request(_) => Verdict::Final,
        },
    }
}

/// Holds one request's place on a server; dropping it frees the place.
struct InFlight {
    shared: Arc<Shared>,
    server: usize,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(server) = self.shared.servers.get(self.server) {
            server.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Shared {
    fn figures(&self) -> Vec<ServerFigures> {
        self.servers
            .iter()
            .map(|s| ServerFigures {
                url: s.url.clone(),
                up: !s.down.load(Ordering::Relaxed),
                in_flight: s.in_flight.load(Ordering::Relaxed),
                requests: s.requests.load(Ordering::Relaxed),
                errors: s.errors.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Picks the server for `key` among those up and not `tried`, and takes a place on it
    /// (under the router's lock, so concurrent placements see each other's load).
    fn place(self: &Arc<Self>, key: u64, tried: &[bool]) -> Option<InFlight> {
        let mut router = lock(&self.router);
        let loads: Vec<ServerLoad> = self
            .servers
            .iter()
            .zip(tried)
            .map(|(s, tried)| ServerLoad {
                up: !tried && !s.down.load(Ordering::Relaxed),
                in_flight: s.in_flight.load(Ordering::Relaxed),
            })
            .collect();
        let server = router.route(key, &loads)?;
        let chosen = self.servers.get(server)?;
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        chosen.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            shared: Arc::clone(self),
            server,
        })
    }

    /// `server` failed with `error`: count it and, when it is the server's fault, mark it
    /// down and start probing it.
    fn failed(self: &Arc<Self>, server: usize, error: &ProviderError) {
        let Some(s) = self.servers.get(server) else {
            return;
        };
        s.errors.fetch_add(1, Ordering::Relaxed);
        if verdict(error) != Verdict::Down {
            return;
        }
        if !s.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(server = %s.url, error = %error, "fleet server marked down; its conversations move to their next server");
        }
        if !s.probing.swap(true, Ordering::Relaxed) {
            tokio::spawn(probe_task(Arc::downgrade(self), server));
        }
    }

    /// Whether `server` is ready: the first of its readiness routes it has says so (or,
    /// without any, it lists its models).
    async fn probe(&self, server: usize) -> bool {
        let Some(s) = self.servers.get(server) else {
            return false;
        };
        let get = |url: &Url| {
            let mut request = self.client.get(url.clone()).timeout(PROBE_TIMEOUT);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key.expose());
            }
            request.send()
        };
        for url in s.readiness.iter().flatten() {
            let Ok(response) = get(url).await else {
                continue;
            };
            let status = response.status();
            if status.is_success() {
                return true;
            }
            // Anything but "no such route" is the server's answer: not ready.
            if status != reqwest::StatusCode::NOT_FOUND {
                return false;
            }
        }
        match &s.models {
            Some(url) => get(url).await.is_ok_and(|r| r.status().is_success()),
            None => false,
        }
    }
}

/// Probes a down server, with growing pauses, until it answers; then marks it up.
async fn probe_task(shared: Weak<Shared>, server: usize) {
    let mut wait = PROBE_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.probe(server).await {
            if let Some(s) = shared.servers.get(server) {
                s.down.store(false, Ordering::Relaxed);
                s.probing.store(false, Ordering::Relaxed);
                tracing::info!(server = %s.url, "fleet server is back; its conversations return to it");
            }
            return;
        }
        wait = (wait * 2).min(PROBE_MAX);
    }
}

/// Waits for the first text of `events` (or its end), keeping what came before it, so a
/// server that breaks before saying anything can be replaced by the next.
async fn first_text(
    mut events: EventStream,
) -> Result<(Vec<Result<StreamEvent, ProviderError>>, EventStream), ProviderError> {
    let mut head = Vec::new();
    loop {
        match events.next().await {
            Some(Ok(StreamEvent::Delta(text))) if !text.is_empty() => {
                head.push(Ok(StreamEvent::Delta(text)));
                return Ok((head, events));
            }
            Some(Ok(done @ StreamEvent::Done(_))) => {
                head.push(Ok(done));
                return Ok((head, events));
            }
            Some(Ok(other)) => head.push(Ok(other)),
            Some(Err(e)) => return Err(e),
            None => return Err(ProviderError::Cut("ended before any text".into())),
        }
    }
}

impl Provider for FleetProvider {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let shared = &self.shared;
            let key = route_key(&request);
            let mut tried = vec![false; shared.servers.len()];
            let mut last = None;
            while let Some(place) = shared.place(key, &tried) {
                let server = place.server;
                tried[server] = true;
                let Some(s) = shared.servers.get(server) else {
                    break;
                };
                let attempt = async { first_text(s.provider.stream(request.clone()).await?).await };
                match attempt.await {
                    Ok((head, rest)) => {
                        let watcher = Arc::clone(shared);
                        let rest = rest.inspect(move |event| {
                            let _held = &place;
                            if let Err(e) = event {
                                watcher.failed(server, e);
                            }
                        });
                        return Ok(stream::iter(head).chain(rest).boxed());
                    }
                    Err(e) => {
                        shared.failed(server, &e);
                        if verdict(&e) == Verdict::Final {
                            return Err(e);
                        }
                        tracing::info!(server = %s.url, error = %e, "fleet server failed; trying the conversation's next server");
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| {
                ProviderError::Connect("every server of the fleet is marked down".into())
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_routes_are_at_the_servers_root() {
        let url = |u: &str| Url::parse(u).unwrap();
        let health = |u: &str| root_url(&url(u), "health").unwrap().to_string();
        assert_eq!(health("http://a:8080/v1"), "http://a:8080/health");
        assert_eq!(health("http://a:8080/v1/"), "http://a:8080/health");
        assert_eq!(health("http://a/llm/v1"), "http://a/llm/health");
        assert_eq!(health("http://a:9000"), "http://a:9000/health");
        assert_eq!(
            root_url(&url("http://a:8080/v1"), "ready")
                .unwrap()
                .as_str(),
            "http://a:8080/ready"
        );
    }

    /// A server on loopback answering `routes` (path, status) and 404 elsewhere.
    async fn server(routes: &'static [(&'static str, u16)]) -> Url {
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| async move {
            let status = routes
                .iter()
                .find(|(path, _)| *path == uri.path())
                .map_or(404, |(_, status)| *status);
            axum::http::StatusCode::from_u16(status).unwrap()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Url::parse(&format!("http://{address}/v1")).unwrap()
    }

    #[tokio::test]
    async fn a_server_is_ready_when_its_first_readiness_route_says_so() {
        let cases: [(&'static [(&'static str, u16)], bool); 7] = [
            // mistral-bot loading its model: alive, not ready.
            (&[("/ready", 503), ("/health", 200)], false),
            (&[("/ready", 200), ("/health", 200)], true),
            // llama-server, vLLM, TGI, SGLang: no /ready.
            (&[("/health", 200)], true),
            (&[("/health", 503)], false),
            // A bare OpenAI-compatible server.
            (&[("/v1/models", 200)], true),
            (&[("/v1/models", 500)], false),
            (&[], false),
        ];
        let config = CloudConfig {
            base_url: Url::parse("http://unused/v1").unwrap(),
            api_key: None,
            key_required: false,
            model: "m".into(),
            timeout: Duration::from_secs(5),
        };
        for (routes, ready) in cases {
            let url = server(routes).await;
            let fleet = FleetProvider::new(
                reqwest::Client::new(),
                &config,
                std::slice::from_ref(&url),
                &Metrics::new(),
            );
            assert_eq!(fleet.shared.probe(0).await, ready, "{routes:?}");
        }
    }

    #[test]
    fn a_conversation_without_a_session_is_keyed_by_its_opening() {
        let params = crate::chat::GenerateParams::default();
        let round = |n: usize| {
            let mut messages = vec![ChatMessage::system("Be brief."), ChatMessage::user("hi")];
            for i in 0..n {
                messages.push(ChatMessage::assistant(format!("a{i}")));
                messages.push(ChatMessage::user(format!("q{i}")));
            }
            ChatRequest::new(messages, params.clone())
        };
        assert_eq!(route_key(&round(0)), route_key(&round(3)));
        let other = ChatRequest::new(vec![ChatMessage::user("hello")], params.clone());
        assert_ne!(route_key(&round(0)), route_key(&other));
        let keyed = round(0).with_affinity(AffinityKey::of("telegram:1", 9));
        assert_eq!(
            route_key(&keyed),
            AffinityKey::of("telegram:1", 9).route_hash()
        );
    }

    #[test]
    fn failures_are_told_apart() {
        assert_eq!(
            verdict(&ProviderError::Connect("refused".into())),
            Verdict::Down
        );
        assert_eq!(
            verdict(&ProviderError::Status {
                status: 502,
                detail: String::new()
            }),
            Verdict::Down
        );
        assert_eq!(
            verdict(&ProviderError::RateLimited { retry_after: None }),
            Verdict::Busy
        );
        assert_eq!(
            verdict(&ProviderError::Refused {
                kind: super::super::RequestFault::ContextLengthExceeded,
                detail: String::new()
            }),
            Verdict::Final
        );
        assert_eq!(
            verdict(&ProviderError::Status {
                status: 401,
                detail: String::new()
            }),
            Verdict::Final
        );
    }
}
