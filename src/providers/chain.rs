//! The fallback chain: tries providers in order until one delivers text, with a timeout
//! per provider, Retry-After memory and a circuit breaker ([`health`](super::health)), and
//! counts every attempt in [`Metrics`].
//!
//! What a failure means depends on whose fault it is ([`ProviderError::fault`]): a
//! provider's own failure counts toward its breaker and the next provider is asked; a busy
//! provider is passed over without blame; a request a provider refused for what it asks
//! (too long, an invalid parameter, blocked content) never counts against the provider.
//! Such a refusal ends the chain when asking elsewhere is pointless
//! ([`RequestFault::ends_chain`](super::RequestFault::ends_chain)); otherwise the next
//! provider is asked, and if none answers, the caller gets the refusal ([`Refused`]), not
//! the canned apology: the apology is only for when every provider is down or busy.
//!
//! A provider with an allowed wait ([`ChainBuilder::max_wait`], the local engine's
//! `--local-max-wait`) whose estimated wait for the first text
//! ([`Provider::estimated_wait`]) is longer is skipped at once (`skipped{reason="eta"}`)
//! when a later provider is available (breaker closed, no Retry-After); it is asked after
//! the others, as the last resort, if none of them answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::{self, BoxStream};
use tokio::time::{Instant, timeout};

use super::budget::Budgets;
use super::health::{Admission, BreakerPolicy, BreakerState, Health, HealthStatus};
use super::{CannedProvider, EventStream, Fault, Provider, ProviderError, RequestFault};
use crate::chat::{ChatRequest, Completion, FinishReason, StreamEvent, Timings, Usage};
use crate::i18n::{self, Lang};
use crate::metrics::{Metrics, SkipReason};

/// The timeout of providers added with [`Chain::new`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest reply passed on, in bytes: a provider streaming without end (ignoring
/// `max_tokens`) is cut off here rather than filling memory downstream.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// An answer from the chain: who gave it and its events (text deltas, then `Done`).
/// Dropping `events` cancels the reply (the local engine frees the slot).
pub struct Reply {
    /// The provider that answered.
    pub provider: &'static str,
    /// The reply's events; never an error.
    pub events: BoxStream<'static, StreamEvent>,
}

/// The request was refused for what it asks, by `provider`: the chain has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{provider} refused the request: {error}")]
pub struct Refused {
    /// The provider that refused it (the first one, when several did).
    pub provider: &'static str,
    /// Its error; [`ProviderError::fault`] is a [`Fault::Request`].
    pub error: ProviderError,
}

impl Refused {
    /// What is wrong with the request.
    pub fn fault(&self) -> RequestFault {
        match self.error.fault() {
            Fault::Request(fault) => fault,
            // Unreachable: the chain only builds a `Refused` from a request fault.
            Fault::Provider | Fault::Busy => RequestFault::InvalidRequest,
        }
    }
}

/// One provider of the chain and what the chain knows about it.
struct Entry {
    provider: Box<dyn Provider>,
    /// Time allowed until the first text, and between two events after it.
    timeout: Duration,
    /// Longest estimated wait for the first text before a later provider is preferred.
    max_wait: Option<Duration>,
    health: Arc<Mutex<Health>>,
}

/// Providers in order of preference.
pub struct Chain {
    entries: Vec<Entry>,
    breaker: BreakerPolicy,
    metrics: Arc<Metrics>,
    /// Token and request counts, budgets and rate-limit headers, if kept.
    budgets: Option<Arc<Budgets>>,
}

/// Builds a [`Chain`] with per-provider timeouts, a breaker policy and shared metrics.
pub struct ChainBuilder {
    chain: Chain,
}

impl ChainBuilder {
    /// Adds `provider`, tried after those already added, allowed `timeout` until its first
    /// text and between two pieces of text.
    pub fn provider(mut self, provider: impl Provider + 'static, timeout: Duration) -> Self {
        self.chain.entries.push(Entry {
            provider: Box::new(provider),
            timeout,
            max_wait: None,
            health: Arc::default(),
        });
        self
    }

    /// The provider added last is skipped for a request whose estimated wait for the
    /// first text ([`Provider::estimated_wait`]) is over `max_wait`, when a later provider
    /// is available; it is then asked only if none of the later ones answers.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        if let Some(entry) = self.chain.entries.last_mut() {
            entry.max_wait = Some(max_wait);
        }
        self
    }

    /// Sets the circuit breaker's policy.
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.chain.breaker = policy;
        self
    }

    /// Counts each provider's tokens and requests in `budgets`, and skips a provider past
    /// its budget or out of tokens by its rate-limit headers.
    pub fn budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.chain.budgets = Some(budgets);
        self
    }

    /// The chain.
    pub fn build(self) -> Chain {
        self.chain
    }
}

fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    // Health updates cannot leave it inconsistent; a panic elsewhere must not stop replies.
    health.lock().unwrap_or_else(|e| e.into_inner())
}

impl Chain {
    /// A chain trying `providers` in order (each with [`DEFAULT_TIMEOUT`]), then the
    /// canned apology, with its own metrics.
    pub fn new(providers: Vec<Box<dyn Provider>>) -> Self {
        Self {
            entries: providers
                .into_iter()
                .map(|provider| Entry {
                    provider,
                    timeout: DEFAULT_TIMEOUT,
                    max_wait: None,
                    health: Arc::default(),
                })
                .collect(),
            breaker: BreakerPolicy::default(),
            metrics: Arc::new(Metrics::new()),
            budgets: None,
        }
    }

    /// An empty chain recording into `metrics`, to add providers to.
    pub fn builder(metrics: Arc<Metrics>) -> ChainBuilder {
        ChainBuilder {
            chain: Chain {
                entries: Vec::new(),
                breaker: BreakerPolicy::default(),
                metrics,
                budgets: None,
            },
        }
    }

    /// The providers' names, in order (the canned apology not included).
    pub fn provider_names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.provider.name()).collect()
    }

    /// Each provider's health now (breaker, Retry-After), in chain order.
    pub fn health(&self) -> Vec<(&'static str, HealthStatus)> {
        let now = Instant::now();
        self.entries
            .iter()
            .map(|e| (e.provider.name(), lock(&e.health).status(now)))
            .collect()
    }

    /// The metrics the chain records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether entry `index` has an allowed wait, a later provider is available, and the
    /// entry's estimated wait for `request` is longer (then it is counted as skipped).
    async fn waits_too_long(&self, index: usize, request: &ChatRequest) -> bool {
        let entry = &self.entries[index];
        let Some(max_wait) = entry.max_wait else {
            return false;
        };
        let now = Instant::now();
        let later_available = self.entries[index + 1..].iter().any(|later| {
            let status = lock(&later.health).status(now);
            status.breaker == BreakerState::Closed && status.retry_after.is_zero()
        });
        if !later_available {
            return false;
        }
        let Some(eta) = entry.provider.estimated_wait(request, max_wait).await else {
            return false;
        };
        if eta <= max_wait {
            return false;
        }
        let name = entry.provider.name();
        tracing::debug!(
            provider = name,
            eta_s = format!("{:.1}", eta.as_secs_f64()),
            max_wait_s = format!("{:.1}", max_wait.as_secs_f64()),
            "provider skipped: its estimated wait for the first token is too long"
        );
        self.metrics.skipped(name, SkipReason::Eta);
        true
    }

    /// The answer of the first provider that gives one. When none does: the first
    /// refusal of the request if a provider refused it ([`Refused`]), else (every provider
    /// down or busy) the canned apology in `lang`.
    pub async fn reply(&self, request: ChatRequest, lang: Lang) -> Result<Reply, Refused> {
        let mut refused: Option<Refused> = None;
        // (entry, whether its estimated wait is still to be checked): one skipped for its
        // wait goes to the end, asked once more only if no later provider answers.
        let mut order: Vec<(usize, bool)> = (0..self.entries.len()).map(|i| (i, true)).collect();
        let mut next = 0;
        while let Some(&(index, check_wait)) = order.get(next) {
            next += 1;
            let entry = &self.entries[index];
            let name = entry.provider.name();
            if check_wait && self.waits_too_long(index, &request).await {
                order.push((index, false));
                continue;
            }
            // The budget first: a provider past it must not take the breaker's one probe.
            let skip = self
                .budgets
                .as_ref()
                .and_then(|b| b.admit(name))
                .or_else(|| match lock(&entry.health).admit(Instant::now()) {
                    Admission::Skip(reason) => Some(reason),
                    Admission::Go | Admission::Probe => None,
                });
            if let Some(reason) = skip {
                tracing::debug!(
                    provider = name,
                    reason = reason.as_str(),
                    "provider skipped"
                );
                self.metrics.skipped(name, reason);
                continue;
            }
            let attempt = Attempt::start(name, self, entry);
            let mut started = false;
            let first = timeout(
                entry.timeout,
                first_text(entry.provider.as_ref(), request.clone(), &mut started),
            )
            .await
            .unwrap_or_else(|_| {
                Err(if entry.provider.reports_start() && !started {
                    ProviderError::QueueWait
                } else {
                    ProviderError::Timeout
                })
            });
            match first {
                Ok((prompts, text, rest)) => {
                    let tail = Tail {
                        delivered: text.len(),
                        events: rest,
                        attempt,
                        idle: entry.timeout,
                        lang,
                    };
                    let head = (!text.is_empty()).then_some(StreamEvent::Delta(text));
                    return Ok(Reply {
                        provider: name,
                        events: stream::iter(prompts)
                            .chain(stream::iter(head))
                            .chain(tail.into_stream())
                            .boxed(),
                    });
                }
                Err(e) => {
                    attempt.failed(&e);
                    match e.fault() {
                        Fault::Request(fault) => {
                            let ends = fault.ends_chain();
                            tracing::info!(
                                provider = name,
                                error = %e,
                                "provider refused the request{}",
                                if ends { "" } else { "; trying the next" }
                            );
                            let refusal = refused.get_or_insert(Refused {
                                provider: name,
                                error: e,
                            });
                            if ends {
                                return Err(refusal.clone());
                            }
                        }
                        Fault::Busy | Fault::Provider => {
                            tracing::warn!(provider = name, error = %e, "provider failed; trying the next");
                        }
                    }
                }
            }
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        let canned = CannedProvider::new(lang);
        self.metrics.attempt(canned.name());
        self.metrics
            .success(canned.name(), Duration::ZERO, Duration::ZERO);
        Ok(Reply {
            provider: canned.name(),
            events: canned.events(),
        })
    }
}

/// Starts `provider` and waits for its first non-empty text; sets `started` when the
/// provider reports that the request left its queue ([`StreamEvent::Started`]). Returns the
/// prompt events to pass on (a provider asked to show its prompt sends its tokens), the
/// text and the rest.
async fn first_text(
    provider: &dyn Provider,
    request: ChatRequest,
    started: &mut bool,
) -> Result<(Vec<StreamEvent>, String, EventStream), ProviderError> {
    let mut events = provider.stream(request).await?;
    let mut prompts = Vec::new();
    loop {
        match events.next().await {
            Some(Ok(StreamEvent::Delta(text))) if !text.is_empty() => {
                return Ok((prompts, text, events));
            }
            // A call of a request's tool is the answer as much as text is.
            Some(Ok(call @ StreamEvent::ToolCall(_))) => {
                prompts.push(call);
                return Ok((prompts, String::new(), events));
            }
            Some(Ok(StreamEvent::Started)) => *started = true,
            // Log-probabilities come before the text they describe: passed on with it.
            Some(Ok(
                early @ (StreamEvent::Prompt(_)
                | StreamEvent::Logprobs(_)
                | StreamEvent::Choice(_)
                | StreamEvent::ChoiceEnd(_)),
            )) => {
                prompts.push(early);
            }
            Some(Ok(StreamEvent::Delta(_))) => {}
            // Stopped by the provider's filter before any text: that is its answer (the
            // notice), not a failure to hand to the next provider.
            Some(Ok(
                done @ StreamEvent::Done(Completion {
                    finish_reason: FinishReason::ContentFilter,
                    ..
                }),
            )) => return Ok((prompts, String::new(), stream::iter([Ok(done)]).boxed())),
            Some(Ok(StreamEvent::Done(_))) => return Err(ProviderError::Empty),
            None => return Err(ProviderError::Cut("ended before any text".into())),
            Some(Err(e)) => return Err(e),
        }
    }
}

/// One call of one provider, from the chain's decision to call it until its reply ends.
/// Records the outcome in the metrics and the provider's health exactly once; dropped
/// without an outcome, it counts as cancelled.
struct Attempt {
    provider: &'static str,
    metrics: Arc<Metrics>,
    health: Arc<Mutex<Health>>,
    breaker: BreakerPolicy,
    budgets: Option<Arc<Budgets>>,
    started: Instant,
    first_text: Option<Duration>,
    ended: bool,
}

impl Attempt {
    fn start(provider: &'static str, chain: &Chain, entry: &Entry) -> Self {
        chain.metrics.attempt(provider);
        if let Some(budgets) = &chain.budgets {
            budgets.request_sent(provider);
        }
        Self {
            provider,
            metrics: Arc::clone(&chain.metrics),
            health: Arc::clone(&entry.health),
            breaker: chain.breaker,
            budgets: chain.budgets.clone(),
            started: Instant::now(),
            first_text: None,
            ended: false,
        }
    }

    fn failed(mut self, error: &ProviderError) {
        self.ended = true;
        if *error == ProviderError::Timeout {
            self.metrics.timeout(self.provider);
        } else {
            self.metrics.error(self.provider, error.kind());
        }
        lock(&self.health).failed(Instant::now(), error, self.breaker);
    }

    fn succeeded(mut self) {
        self.ended = true;
        let total = self.started.elapsed();
        self.metrics
            .success(self.provider, self.first_text.unwrap_or(total), total);
        lock(&self.health).succeeded();
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.cancelled(self.provider);
            lock(&self.health).abandoned();
        }
    }
}

/// The rest of a reply after its first text.
struct Tail {
    events: EventStream,
    attempt: Attempt,
    /// Longest pause allowed between two events.
    idle: Duration,
    lang: Lang,
    /// Bytes of text passed on so far.
    delivered: usize,
}

impl Tail {
    fn into_stream(mut self) -> BoxStream<'static, StreamEvent> {
        self.attempt.first_text = Some(self.attempt.started.elapsed());
        stream::unfold(Some(self), |tail| async move {
            let mut tail = tail?;
            let failure = match timeout(tail.idle, tail.events.next()).await {
                Ok(Some(Ok(StreamEvent::Done(completion)))) => {
                    if let Some(budgets) = &tail.attempt.budgets {
                        budgets.answered(tail.attempt.provider, &completion.usage);
                    }
                    tail.attempt.succeeded();
                    let mut events = Vec::with_capacity(2);
                    if completion.finish_reason == FinishReason::ContentFilter {
                        let notice = i18n::content_filtered_notice(tail.lang);
                        // Alone, the notice needs no blank line before it.
                        let notice = if tail.delivered == 0 {
                            notice.trim_start()
                        } else {
                            notice
                        };
                        events.push(StreamEvent::Delta(notice.to_string()));
                    }
                    events.push(StreamEvent::Done(completion));
                    return Some((events, None));
                }
                Ok(Some(Ok(StreamEvent::Delta(text))))
                    if tail.delivered + text.len() <= MAX_REPLY_BYTES =>
                {
                    tail.delivered += text.len();
                    return Some((vec![StreamEvent::Delta(text)], Some(tail)));
                }
                Ok(Some(Ok(StreamEvent::Delta(_)))) => {
                    ProviderError::Malformed(format!("reply longer than {MAX_REPLY_BYTES} bytes"))
                }
                Ok(Some(Ok(
                    event @ (StreamEvent::Started
                    | StreamEvent::Prompt(_)
                    | StreamEvent::Logprobs(_)
                    | StreamEvent::Choice(_)
                    | StreamEvent::ChoiceEnd(_)
                    | StreamEvent::ToolCall(_)),
                ))) => {
                    return Some((vec![event], Some(tail)));
                }
                Ok(Some(Err(e))) => e,
                Ok(None) => ProviderError::Cut("ended without its end marker".into()),
                Err(_) => ProviderError::Timeout,
            };
            tracing::warn!(provider = tail.attempt.provider, error = %failure, "reply broke off midway");
            let lang = tail.lang;
            tail.attempt.failed(&failure);
            Some((
                vec![
                    StreamEvent::Delta(i18n::interrupted_notice(lang).to_string()),
                    StreamEvent::Done(Completion {
                        finish_reason: FinishReason::Stop,
                        usage: Usage::default(),
                        timings: Timings::default(),
                    }),
                ],
                None,
            ))
        })
        .flat_map(stream::iter)
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;

    use super::*;
    use crate::chat::{ChatMessage, GenerateParams};

    /// A scripted provider: each call takes the next script (the last one repeats).
    struct Scripted {
        name: &'static str,
        scripts: Vec<Script>,
        calls: Arc<AtomicUsize>,
    }

    #[derive(Clone)]
    enum Script {
        Fail(ProviderError),
        Events(Vec<Result<StreamEvent, ProviderError>>),
        /// Some events, then silence forever.
        Stall(Vec<Result<StreamEvent, ProviderError>>),
    }

    impl Provider for Scripted {
        fn name(&self) -> &'static str {
            self.name
        }

        fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            let script = self.scripts[call.min(self.scripts.len() - 1)].clone();
            Box::pin(async move {
                match script {
                    Script::Fail(e) => Err(e),
                    Script::Events(events) => Ok(stream::iter(events).boxed()),
                    Script::Stall(events) => {
                        Ok(stream::iter(events).chain(stream::pending()).boxed())
                    }
                }
            })
        }
    }

    /// A breaker that opens at the first failure and stays open for the whole test: a
    /// failure that must not count against a provider would make it skip the next call.
    const ONE_STRIKE: BreakerPolicy = BreakerPolicy {
        failures: 1,
        cooldown: Duration::from_secs(3600),
    };

    fn scripted(name: &'static str, scripts: Vec<Script>) -> (Scripted, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            Scripted {
                name,
                scripts,
                calls: Arc::clone(&calls),
            },
            calls,
        )
    }

    fn done() -> StreamEvent {
        StreamEvent::Done(Completion {
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
            timings: Timings::default(),
        })
    }

    fn answer(text: &str) -> Script {
        Script::Events(vec![Ok(StreamEvent::Delta(text.into())), Ok(done())])
    }

    fn request() -> ChatRequest {
        ChatRequest::new(vec![ChatMessage::user("hi")], GenerateParams::default())
    }

    async fn text_of(reply: Reply) -> (&'static str, String) {
        let events: Vec<_> = reply.events.collect().await;
        assert!(
            matches!(events.last(), Some(StreamEvent::Done(_))),
            "{events:?}"
        );
        let text = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Delta(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        (reply.provider, text)
    }

    fn status(code: u16) -> ProviderError {
        ProviderError::Status {
            status: code,
            detail: String::new(),
        }
    }

    #[tokio::test]
    async fn falls_over_on_errors_and_empty_replies() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted("local", vec![Script::Fail(ProviderError::Overloaded)]);
        let (b, _) = scripted("groq", vec![Script::Events(vec![Ok(done())])]);
        let (c, _) = scripted("mistral", vec![answer("bonjour")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .provider(c, DEFAULT_TIMEOUT)
            .build();
        assert_eq!(
            text_of(chain.reply(request(), Lang::En).await.unwrap()).await,
            ("mistral", "bonjour".into())
        );
        let s = metrics.snapshot();
        assert_eq!(s["local"].errors_by_kind["overloaded"], 1);
        assert_eq!(s["groq"].errors_by_kind["empty"], 1);
        assert_eq!((s["mistral"].requests, s["mistral"].success), (1, 1));
    }

    #[tokio::test]
    async fn all_down_gives_the_canned_apology() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted("groq", vec![Script::Fail(status(500))]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .build();
        let (provider, text) = text_of(chain.reply(request(), Lang::Ru).await.unwrap()).await;
        assert_eq!(provider, "canned");
        assert_eq!(text, i18n::canned_apology(Lang::Ru));
        assert_eq!(metrics.snapshot()["canned"].success, 1);
    }

    #[tokio::test]
    async fn a_break_after_text_ends_with_a_notice_not_a_second_answer() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted(
            "groq",
            vec![Script::Events(vec![
                Ok(StreamEvent::Delta("Par".into())),
                Err(ProviderError::Cut("reset".into())),
            ])],
        );
        let (b, b_calls) = scripted("mistral", vec![answer("never")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .build();
        let (provider, text) = text_of(chain.reply(request(), Lang::En).await.unwrap()).await;
        assert_eq!(provider, "groq");
        assert_eq!(text, format!("Par{}", i18n::interrupted_notice(Lang::En)));
        assert_eq!(b_calls.load(Ordering::SeqCst), 0);
        let s = metrics.snapshot();
        assert_eq!((s["groq"].errors, s["groq"].success), (1, 0));
    }

    #[tokio::test]
    async fn timeouts_before_and_after_the_first_text() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted("groq", vec![Script::Stall(Vec::new())]);
        let (b, _) = scripted(
            "mistral",
            vec![Script::Stall(vec![Ok(StreamEvent::Delta("Hi".into()))])],
        );
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, Duration::from_millis(50))
            .provider(b, Duration::from_millis(50))
            .build();
        let (provider, text) = text_of(chain.reply(request(), Lang::En).await.unwrap()).await;
        assert_eq!(provider, "mistral");
        assert!(text.starts_with("Hi\n\n"), "{text}");
        let s = metrics.snapshot();
        assert_eq!((s["groq"].timeouts, s["mistral"].timeouts), (1, 1));
    }

    #[tokio::test]
    async fn retry_after_skips_the_provider_until_then() {
        let metrics = Arc::new(Metrics::new());
        let (a, a_calls) = scripted(
            "groq",
            vec![
                Script::Fail(ProviderError::RateLimited {
                    retry_after: Some(Duration::from_millis(300)),
                }),
                answer("back"),
            ],
        );
        let (b, _) = scripted("mistral", vec![answer("m")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .build();
        assert_eq!(
            text_of(chain.reply(request(), Lang::En).await.unwrap())
                .await
                .0,
            "mistral"
        );
        assert_eq!(
            text_of(chain.reply(request(), Lang::En).await.unwrap())
                .await
                .0,
            "mistral"
        );
        assert_eq!(
            a_calls.load(Ordering::SeqCst),
            1,
            "skipped while Retry-After runs"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            text_of(chain.reply(request(), Lang::En).await.unwrap())
                .await
                .0,
            "groq"
        );
        let s = metrics.snapshot();
        assert_eq!((s["groq"].requests, s["groq"].skipped), (2, 1));
    }

    #[tokio::test]
    async fn breaker_skips_a_failing_provider_then_probes() {
        let metrics = Arc::new(Metrics::new());
        let (a, a_calls) = scripted(
            "groq",
            vec![
                Script::Fail(status(500)),
                Script::Fail(status(502)),
                answer("healed"),
            ],
        );
        let (b, _) = scripted("mistral", vec![answer("m")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .breaker(BreakerPolicy {
                failures: 2,
                cooldown: Duration::from_millis(300),
            })
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .build();
        for _ in 0..4 {
            assert_eq!(
                text_of(chain.reply(request(), Lang::En).await.unwrap())
                    .await
                    .0,
                "mistral"
            );
        }
        assert_eq!(a_calls.load(Ordering::SeqCst), 2, "open after two failures");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            text_of(chain.reply(request(), Lang::En).await.unwrap())
                .await
                .0,
            "groq"
        );
        let s = metrics.snapshot();
        assert_eq!(
            (s["groq"].requests, s["groq"].errors, s["groq"].skipped),
            (3, 2, 2)
        );
    }

    #[tokio::test]
    async fn an_endless_reply_is_cut_off() {
        let metrics = Arc::new(Metrics::new());
        let piece = "x".repeat(64 * 1024);
        let endless = stream::repeat(Ok(StreamEvent::Delta(piece))).boxed();
        struct Endless(std::sync::Mutex<Option<EventStream>>);
        impl Provider for Endless {
            fn name(&self) -> &'static str {
                "openai"
            }
            fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
                let events = self.0.lock().unwrap().take().ok_or(ProviderError::Empty);
                Box::pin(async move { events })
            }
        }
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(
                Endless(std::sync::Mutex::new(Some(endless))),
                DEFAULT_TIMEOUT,
            )
            .build();
        let (provider, text) = text_of(chain.reply(request(), Lang::En).await.unwrap()).await;
        assert_eq!(provider, "openai");
        assert!(text.len() <= MAX_REPLY_BYTES + 100, "{}", text.len());
        assert!(text.ends_with(i18n::interrupted_notice(Lang::En)));
        assert_eq!(metrics.snapshot()["openai"].errors_by_kind["malformed"], 1);
    }

    #[tokio::test]
    async fn dropping_a_reply_counts_as_cancelled() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted(
            "local",
            vec![Script::Stall(vec![Ok(StreamEvent::Delta("x".into()))])],
        );
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .build();
        let mut reply = chain.reply(request(), Lang::En).await.unwrap();
        assert_eq!(
            reply.events.next().await,
            Some(StreamEvent::Delta("x".into()))
        );
        drop(reply);
        let s = metrics.snapshot();
        assert_eq!((s["local"].requests, s["local"].cancelled), (1, 1));
    }

    fn refusal(kind: RequestFault) -> ProviderError {
        ProviderError::Refused {
            kind,
            detail: "no".into(),
        }
    }

    fn too_long() -> ProviderError {
        ProviderError::Engine(crate::engine::EngineError::Prompt(
            crate::engine::prompt::PromptError::TooLong {
                tokens: 5000,
                max: 1000,
            },
        ))
    }

    /// Regression test for issue 7 item 5: user errors opened provider breakers.
    #[tokio::test]
    async fn refusals_fall_over_without_tripping_the_breaker() {
        let metrics = Arc::new(Metrics::new());
        let (a, a_calls) = scripted("local", vec![Script::Fail(too_long())]);
        let (b, b_calls) = scripted(
            "groq",
            vec![Script::Fail(refusal(RequestFault::InvalidRequest))],
        );
        let (c, _) = scripted("mistral", vec![answer("fits here")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .breaker(ONE_STRIKE)
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .provider(c, DEFAULT_TIMEOUT)
            .build();
        for _ in 0..5 {
            assert_eq!(
                text_of(chain.reply(request(), Lang::En).await.unwrap()).await,
                ("mistral", "fits here".into())
            );
        }
        // A breaker opening after one failure would have skipped them after the first.
        assert_eq!(a_calls.load(Ordering::SeqCst), 5);
        assert_eq!(b_calls.load(Ordering::SeqCst), 5);
        let s = metrics.snapshot();
        assert_eq!(s["local"].errors_by_kind["prompt"], 5);
        assert_eq!(s["groq"].errors_by_kind["invalid_request"], 5);
        assert_eq!((s["local"].skipped, s["groq"].skipped), (0, 0));
    }

    #[tokio::test]
    async fn a_request_nobody_accepts_is_refused_not_apologised_for() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted("local", vec![Script::Fail(too_long())]);
        let (b, _) = scripted("groq", vec![Script::Fail(status(503))]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .build();
        let refused = chain.reply(request(), Lang::En).await.err().unwrap();
        assert_eq!(refused.provider, "local");
        assert_eq!(refused.fault(), RequestFault::ContextLengthExceeded);
        let canned = metrics.snapshot().get("canned").map_or(0, |c| c.requests);
        assert_eq!(canned, 0, "no apology");
    }

    #[tokio::test]
    async fn blocked_content_ends_the_chain() {
        let metrics = Arc::new(Metrics::new());
        let (a, _) = scripted(
            "gemini",
            vec![Script::Fail(refusal(RequestFault::ContentBlocked))],
        );
        let (b, b_calls) = scripted("mistral", vec![answer("never")]);
        let chain = Chain::builder(Arc::clone(&metrics))
            .breaker(ONE_STRIKE)
            .provider(a, DEFAULT_TIMEOUT)
            .provider(b, DEFAULT_TIMEOUT)
            .build();
        for _ in 0..3 {
            let refused = chain.reply(request(), Lang::En).await.err().unwrap();
            assert_eq!(
                (refused.provider, refused.fault()),
                ("gemini", RequestFault::ContentBlocked)
            );
        }
        assert_eq!(b_calls.load(Ordering::SeqCst), 0);
        assert_eq!(
            metrics.snapshot()["gemini"].skipped,
            0,
            "breaker stays shut"
        );
    }

    /// A provider that queues: it reports the start only after `wait`.
    struct Queueing {
        wait: Duration,
    }

    impl Provider for Queueing {
        fn name(&self) -> &'static str {
            "local"
        }
        fn reports_start(&self) -> bool {
            true
        }
        fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
            let wait = self.wait;
            Box::pin(async move {
                let events = stream::once(async move {
                    tokio::time::sleep(wait).await;
                    Ok(StreamEvent::Started)
                })
                .chain(stream::pending());
                Ok(events.boxed())
            })
        }
    }

    /// A chain of one [`Queueing`] provider reporting its start after `wait`, timing out
    /// after a second, its breaker opening at the first failure.
    fn queueing_chain(wait: Duration, metrics: &Arc<Metrics>) -> Chain {
        Chain::builder(Arc::clone(metrics))
            .breaker(ONE_STRIKE)
            .provider(Queueing { wait }, Duration::from_secs(1))
            .build()
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_in_the_queue_is_busy_but_a_stall_after_the_start_is_a_failure() {
        let metrics = Arc::new(Metrics::new());
        let chain = queueing_chain(Duration::from_secs(3600), &metrics);
        for _ in 0..3 {
            let (provider, _) = text_of(chain.reply(request(), Lang::En).await.unwrap()).await;
            assert_eq!(provider, "canned");
        }
        let s = metrics.snapshot();
        assert_eq!(
            (
                s["local"].errors_by_kind["queue_wait"],
                s["local"].skipped,
                s["local"].timeouts
            ),
            (3, 0, 0),
            "queue waits never open the breaker"
        );

        let metrics = Arc::new(Metrics::new());
        let chain = queueing_chain(Duration::from_millis(10), &metrics);
        for _ in 0..2 {
            let _ = text_of(chain.reply(request(), Lang::En).await.unwrap()).await;
        }
        let s = metrics.snapshot();
        assert_eq!((s["local"].timeouts, s["local"].skipped), (1, 1));
    }

    /// A provider that estimates `eta` for every request.
    struct Slow {
        inner: Scripted,
        eta: Option<Duration>,
    }

    impl Provider for Slow {
        fn name(&self) -> &'static str {
            self.inner.name()
        }

        fn stream(
            &self,
            request: ChatRequest,
        ) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
            self.inner.stream(request)
        }

        fn estimated_wait<'a>(
            &'a self,
            _: &'a ChatRequest,
            _: Duration,
        ) -> BoxFuture<'a, Option<Duration>> {
            let eta = self.eta;
            Box::pin(async move { eta })
        }
    }

    /// A local provider estimating `eta`, allowed 20 s, then groq scripted by `groq`.
    fn eta_chain(
        eta: Option<Duration>,
        groq: Vec<Script>,
    ) -> (Chain, Arc<Metrics>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let metrics = Arc::new(Metrics::new());
        let (local, local_calls) = scripted("local", vec![answer("local")]);
        let (groq, groq_calls) = scripted("groq", groq);
        let chain = Chain::builder(Arc::clone(&metrics))
            .breaker(ONE_STRIKE)
            .provider(Slow { inner: local, eta }, DEFAULT_TIMEOUT)
            .max_wait(Duration::from_secs(20))
            .provider(groq, DEFAULT_TIMEOUT)
            .build();
        (chain, metrics, local_calls, groq_calls)
    }

    #[tokio::test]
    async fn a_long_estimated_wait_goes_to_the_next_provider_at_once() {
        let (chain, metrics, local_calls, _) =
            eta_chain(Some(Duration::from_secs(100)), vec![answer("cloud")]);
        let reply = chain.reply(request(), Lang::En).await.unwrap();
        assert_eq!(text_of(reply).await, ("groq", "cloud".into()));
        assert_eq!(local_calls.load(Ordering::SeqCst), 0, "local never asked");
        let s = metrics.snapshot();
        assert_eq!((s["local"].requests, s["local"].skipped), (0, 1));
        assert_eq!(s["groq"].success, 1);
    }

    #[tokio::test]
    async fn a_short_or_unknown_wait_stays_local() {
        for eta in [
            Some(Duration::from_secs(3)),
            Some(Duration::from_secs(20)),
            None,
        ] {
            let (chain, metrics, _, groq_calls) = eta_chain(eta, vec![answer("cloud")]);
            let reply = chain.reply(request(), Lang::En).await.unwrap();
            assert_eq!(text_of(reply).await.0, "local", "{eta:?}");
            assert_eq!(groq_calls.load(Ordering::SeqCst), 0);
            assert_eq!(metrics.snapshot()["local"].skipped, 0);
        }
    }

    #[tokio::test]
    async fn with_no_later_provider_available_the_request_waits_for_local() {
        // Groq fails once: its breaker (one strike) is open, so nothing is available after
        // local, and a long wait is waited out as before.
        let (chain, metrics, local_calls, groq_calls) = eta_chain(
            Some(Duration::from_secs(100)),
            vec![Script::Fail(status(500))],
        );
        // The first request finds groq available: skipped local, groq fails, then local
        // answers as the last resort.
        let reply = chain.reply(request(), Lang::En).await.unwrap();
        assert_eq!(text_of(reply).await.0, "local");
        assert_eq!(groq_calls.load(Ordering::SeqCst), 1);
        // Now groq's breaker is open: local is not skipped.
        let reply = chain.reply(request(), Lang::En).await.unwrap();
        assert_eq!(text_of(reply).await.0, "local");
        assert_eq!(local_calls.load(Ordering::SeqCst), 2);
        let s = metrics.snapshot();
        assert_eq!(s["local"].skipped, 1, "skipped the first time only");
        assert_eq!(s["local"].success, 2);

        // Rate limited counts as unavailable too.
        let (chain, metrics, _, _) = eta_chain(
            Some(Duration::from_secs(100)),
            vec![Script::Fail(ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(60)),
            })],
        );
        for _ in 0..2 {
            let reply = chain.reply(request(), Lang::En).await.unwrap();
            assert_eq!(text_of(reply).await.0, "local");
        }
        assert_eq!(metrics.snapshot()["local"].skipped, 1);
    }
}
