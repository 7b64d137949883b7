//! The Telegram bot: long polling or a webhook, who may talk, per-chat ordering, streamed
//! answers.
//!
//! # Data path
//! poller (`getUpdates`, offset and unanswered updates saved in [`state`]), or in webhook
//! mode the HTTP API's webhook route (`webhook`: the update saved in [`state`] before
//! Telegram hears 200) →
//! [`incoming::classify`] (groups: only when addressed; access list; commands) →
//! quick replies (`/stop`, `/stats`, `/help`, refusals, "text only") in their own tasks, or
//! the chat's queue → the chat's worker task: the [`Responder`] (stored history, system
//! prompt, provider chain), [`draft::deliver`] (typing, drafts or paced edits
//! ([`stream::deliver`]), final HTML), then the turn is committed to the conversation store
//! with the text as delivered. A message for the model is admitted by [`limits`] (per-user
//! limits, run-time access) before it is queued; [`persona`] serves `/mode` (and its
//! button presses), `/system` and the persona line of `/stats`.
//!
//! # Ordering
//! Each conversation (chat, forum topic) has one worker task answering its messages in
//! order: a message sent while an answer is being written waits its turn silently (up to
//! [`CHAT_QUEUE`] waiting; beyond that the user is asked to resend later). Different
//! conversations run in parallel up to the engine's slots (its queue holds the rest; when
//! that is full the chain answers with the "busy" apology). `/stop` and `/stats` bypass
//! the queue, so they are never stuck behind an answer.
//!
//! # Failures
//! Every piece of per-update work (classifying, a quick reply, a conversation's job) runs
//! behind the panic boundary of [`guard`]: a panic is logged with the update id, the user
//! gets an apology, and the update is marked done, so a restart cannot crash-loop on a
//! "poison" update. A task that still dies is logged with what it was doing, and its
//! chat gets the apology. An update is marked done only once its reply was delivered, or
//! can never be (the user blocked the bot, the chat is gone); a reply Telegram kept
//! refusing with transient errors until [`api::DELIVERY_DEADLINE`] stays pending and is
//! answered after the next restart.
//!
//! A Bot API that cannot be reached (at start or later) is waited out with backoff for as
//! long as it takes (`connect` at start, the poll loop later), while the rest of the
//! process serves; [`BotDeps::link`] tells `/ready`. Only a rejected token stops the bot.
//!
//! May use: `responder`, `providers` (errors), `conversation` (keys), `engine` (stats
//! only), `link`, `i18n`, `config`, `chat`.

pub mod api;
mod connect;
pub mod document;
pub mod draft;
pub mod format;
pub mod guard;
pub mod incoming;
pub mod inputs;
pub mod limits;
pub mod media;
pub mod persona;
pub mod reply_context;
pub mod split;
pub mod state;
pub mod stream;
pub mod updates;
mod webhook;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use teloxide::Bot;
use teloxide::types::{BotCommand, ChatId, Update, UpdateKind};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

use crate::config::TelegramConfig;
use crate::conversation::{ConversationKey, StoreError};
use crate::engine::EngineHandle;
use crate::i18n::{self, Lang};
use crate::link::TelegramLink;
use crate::responder::Responder;
use api::{ApiCallError, DeliveryRetry, Persistence, Target, TelegramApi};
use draft::DraftSupport;
use incoming::{Action, BotIdentity, Command, Origin};
use limits::{FairUse, Sender};
use state::{PollState, Seq, StateError};
use stream::DeliveryError;

/// Messages that may wait in one conversation behind the answer being written.
pub const CHAT_QUEUE: usize = 4;
/// How long a long poll waits for updates (below teloxide's 17 s client timeout).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Updates received and not yet answered, at most; polling pauses beyond this.
const MAX_PENDING: usize = 256;
/// How long an idle conversation keeps its worker task.
const WORKER_IDLE: Duration = Duration::from_secs(300);
/// How long shutdown waits for answers being written; unfinished ones are answered again
/// after the restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// The longest wait between failed polls.
const MAX_POLL_BACKOFF: Duration = Duration::from_secs(30);

/// Why the bot stopped.
#[derive(Debug, thiserror::Error)]
pub enum TelegramError {
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client for the Bot API")]
    Client(#[source] reqwest::Error),
    /// A Bot API call that the bot cannot run without failed.
    #[error("a Telegram Bot API call failed")]
    Api(#[from] ApiCallError),
    /// The polling state cannot be loaded.
    #[error(transparent)]
    State(#[from] StateError),
    /// The usage windows or access changes cannot be loaded.
    #[error("cannot load the per-user usage from the conversation store")]
    Usage(#[source] StoreError),
    /// The OS gave no randomness for the webhook's secret.
    #[error("cannot draw the webhook's secret token from the OS")]
    Secret(#[source] getrandom::Error),
}

/// What the bot answers with.
pub struct BotDeps {
    /// Answers conversations: stored history, system prompt, the provider chain.
    pub responder: Arc<Responder>,
    /// The local engine, for `/stats`; `None` in a front without a local model.
    pub engine: Option<EngineHandle>,
    /// The model named in the greeting when there is no local engine.
    pub model_id: String,
    /// Replies, voice notes, files and photos made into questions.
    pub inputs: inputs::Inputs,
    /// Whether the Bot API is reached, for `/ready`.
    pub link: TelegramLink,
    /// Webhook mode: where the HTTP API hands the updates Telegram posts; `None`: long
    /// polling.
    pub webhook: Option<crate::webhook::WebhookInbox>,
}

impl BotDeps {
    /// The model's name, as the greeting and `/stats` give it.
    fn model_name(&self) -> String {
        self.engine
            .as_ref()
            .map_or_else(|| self.model_id.clone(), |e| e.info().name.clone())
    }
}

/// Runs the bot until `shutdown` completes (then finishes the answers being written, for
/// a while) or a fatal error (the token rejected).
pub async fn run(
    config: TelegramConfig,
    deps: BotDeps,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TelegramError> {
    let client = teloxide::net::default_reqwest_settings()
        .build()
        .map_err(TelegramError::Client)?;
    let mut bot = Bot::with_client(config.token.expose(), client);
    if let Some(url) = &config.api_url {
        bot = bot.set_api_url(url.clone());
    }
    let api = TelegramApi::new(bot);
    let data_dir = config.data_dir.clone();
    let state = tokio::task::spawn_blocking(move || PollState::load(&data_dir))
        .await
        .map_err(|e| {
            StateError::Thread(std::io::Error::other(format!(
                "loading the state failed: {e}"
            )))
        })??;
    tokio::pin!(shutdown);

    // Waits out a Bot API that cannot be reached, however long: the process serves on.
    let Some(me) = connect::identify(&api, &deps.link, &mut shutdown).await? else {
        return Ok(());
    };
    let me = BotIdentity {
        id: me.user.id.0,
        username: me.user.username.clone().unwrap_or_default(),
    };
    // Webhook mode sets the webhook (waiting out a Bot API that cannot be reached);
    // polling deletes one left set, which would make getUpdates answer 409.
    let mut pushed_rx = match &deps.webhook {
        Some(inbox) => match webhook::register(&api, inbox, &mut shutdown).await? {
            Some(pushed_rx) => Some(pushed_rx),
            None => return Ok(()),
        },
        None => {
            if let Err(e) = api.delete_webhook().await {
                tracing::warn!(error = %e, "deleteWebhook failed; polling may conflict with a webhook");
            }
            None
        }
    };
    for (lang, code) in [(Lang::En, None), (Lang::Ru, Some("ru"))] {
        let commands = i18n::command_menu(lang)
            .iter()
            .map(|(c, d)| BotCommand::new(*c, *d))
            .collect();
        if let Err(e) = api.set_commands(commands, code).await {
            tracing::warn!(error = %e, "setMyCommands failed");
        }
    }

    let fair = FairUse::load(
        deps.responder.store().clone(),
        config.allowed_users,
        config.policy.admins,
        config.policy.limits,
        limits::Clock::default(),
    )
    .await
    .map_err(TelegramError::Usage)?;
    let pending = state.pending();
    let bot = Arc::new(BotCore {
        api,
        me,
        fair,
        drafts: DraftSupport::new(config.policy.streaming),
        deps,
        answers: AtomicU64::new(0),
        state: Mutex::new(state),
        chats: Mutex::new(HashMap::new()),
    });
    let mut tasks = Tasks::default();
    if !pending.is_empty() {
        tracing::info!(
            count = pending.len(),
            "answering updates left unanswered before the restart"
        );
    }
    for (seq, update) in pending {
        bot.dispatch(seq, update, Instant::now(), &mut tasks);
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        while let Some(joined) = tasks.set.try_join_next_with_id() {
            bot.reap(joined, &mut tasks);
        }
        if let Some(pushed_rx) = &mut pushed_rx {
            match webhook::next(&bot, pushed_rx, &mut tasks, &mut shutdown).await {
                std::ops::ControlFlow::Continue(()) => continue,
                std::ops::ControlFlow::Break(()) => break,
            }
        }
        if bot.state().pending_len() >= MAX_PENDING && !tasks.set.is_empty() {
            // Backpressure: Telegram keeps the updates until we ask for them.
            tokio::select! {
                joined = tasks.set.join_next_with_id() => {
                    if let Some(joined) = joined {
                        bot.reap(joined, &mut tasks);
                    }
                    continue;
                }
                () = &mut shutdown => break,
            }
        }
        let offset = bot.state().offset();
        let result = tokio::select! {
            result = bot.api.get_updates(offset, POLL_TIMEOUT) => result,
            () = &mut shutdown => break,
        };
        let received = Instant::now();
        let wait = match result {
            Ok(updates) => {
                backoff = Duration::from_secs(1);
                if let Some(down) = bot.deps.link.reached() {
                    tracing::info!(
                        down_s = down.as_secs(),
                        "the Telegram Bot API is reachable again"
                    );
                }
                let batch = bot.state().receive(offset, updates);
                if let Some((asked, lowest)) = batch.restarted {
                    tracing::warn!(
                        asked,
                        lowest,
                        "Telegram restarted its update_id sequence lower; adopting it"
                    );
                }
                if batch.duplicates > 0 {
                    tracing::info!(
                        count = batch.duplicates,
                        "updates received before were dropped"
                    );
                }
                for (seq, update) in batch.fresh {
                    bot.dispatch(seq, update, received, &mut tasks);
                }
                // The next poll confirms this batch to Telegram: it must be on disk first.
                if let Err(e) = batch.saved.wait().await {
                    // Answer anyway; only the restart guarantee is lost.
                    tracing::error!(error = %e, "cannot save the polling state");
                }
                continue;
            }
            Err(ApiCallError::Unauthorized) => return Err(ApiCallError::Unauthorized.into()),
            Err(ApiCallError::RetryAfter(wait)) => wait,
            Err(e) => {
                if matches!(e, ApiCallError::Transient(_)) {
                    bot.deps.link.lost();
                }
                tracing::warn!(error = %e, "getUpdates failed; retrying");
                if e == ApiCallError::WebhookActive {
                    // A webhook set since start, or one deleteWebhook could not remove
                    // then: polling works only once it is gone.
                    if let Err(e) = bot.api.delete_webhook().await {
                        tracing::warn!(error = %e, "deleteWebhook failed");
                    }
                }
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_POLL_BACKOFF);
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = &mut shutdown => break,
        }
    }

    tracing::info!("shutting down the Telegram bot");
    // Closing the queues lets each worker finish what it holds and exit.
    bot.lock_chats().clear();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(joined) = tasks.set.join_next_with_id().await {
            bot.reap(joined, &mut tasks);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "answers still being written at shutdown; they will be answered again after restart"
        );
        tasks.set.shutdown().await;
    }
    let flushed = bot.state().flush();
    if let Err(e) = flushed.wait().await {
        tracing::error!(error = %e, "cannot save the polling state at shutdown");
    }
    Ok(())
}

/// The bot's tasks, and what each is doing (for the log when one dies).
#[derive(Default)]
struct Tasks {
    set: JoinSet<()>,
    running: HashMap<tokio::task::Id, TaskInfo>,
}

/// What a task is doing.
#[derive(Debug, Clone)]
struct TaskInfo {
    what: &'static str,
    /// The update it answers, if it answers one.
    update_id: Option<u32>,
    /// The chat to apologise to if it dies.
    origin: Origin,
}

impl Tasks {
    fn spawn(&mut self, info: TaskInfo, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.running.insert(handle.id(), info);
    }
}

/// What a conversation's worker does next.
#[derive(Debug)]
enum Work {
    /// Answer a message (its text, what it replies to, its file).
    Ask(Box<inputs::Request>),
    /// Answer the last question again.
    Retry,
    /// Forget the conversation.
    Reset,
    /// Choose a persona (and start afresh).
    Persona(crate::persona::Persona),
}

/// What a conversation's worker answers.
#[derive(Debug)]
enum Question {
    /// A new message.
    New(String),
    /// The last stored question, again (`/retry`).
    Again,
}

/// One queued piece of work.
#[derive(Debug)]
struct Job {
    /// The update's local sequence number (what marks it done).
    seq: Seq,
    /// The update's id, for logs.
    update_id: u32,
    origin: Origin,
    work: Work,
    /// When the poller received the update (for the overhead figure).
    received: Instant,
    /// Who sent it (the tokens of the answer count for them).
    sender: Option<Sender>,
}

/// Stops the answer being written: `/stop`, or the stop button of its draft.
struct Stopper {
    /// The question's message id, which seeds the answer's draft ids.
    message: i32,
    tx: oneshot::Sender<()>,
}

impl Stopper {
    /// Stops the answer; whether it was still being written.
    fn stop(self) -> bool {
        self.tx.send(()).is_ok()
    }
}

/// A conversation's worker, as the dispatcher sees it.
struct ChatSlot {
    jobs_tx: mpsc::Sender<Job>,
    /// Stops the answer being written, if any.
    stop: Arc<Mutex<Option<Stopper>>>,
}

/// Everything the tasks share.
struct BotCore {
    api: TelegramApi,
    me: BotIdentity,
    /// Per-user limits, admins, and the access list (`--allowed-users`, `/allow`, `/deny`).
    fair: FairUse,
    /// How answers stream, per chat.
    drafts: DraftSupport,
    deps: BotDeps,
    /// Answers delivered since start.
    answers: AtomicU64,
    state: Mutex<PollState>,
    chats: Mutex<HashMap<ConversationKey, ChatSlot>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is short and leaves the data consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BotCore {
    fn state(&self) -> MutexGuard<'_, PollState> {
        lock(&self.state)
    }

    fn lock_chats(&self) -> MutexGuard<'_, HashMap<ConversationKey, ChatSlot>> {
        lock(&self.chats)
    }

    /// Marks an update answered, and waits until that is on disk.
    async fn done(&self, seq: Seq) {
        let durable = self.state().done(seq);
        if let Err(e) = durable.wait().await {
            tracing::error!(error = %e, "cannot save the polling state");
        }
    }

    /// Settles an update after its work: done when delivered or undeliverable for good;
    /// after a panic, an apology and done (a poison update must not come back); after
    /// transient failures past the deadline, left pending for the next start.
    async fn settle(
        &self,
        seq: Seq,
        update_id: u32,
        origin: &Origin,
        result: Result<Result<(), DeliveryError>, String>,
    ) {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_permanent() => {
                tracing::warn!(
                    update_id,
                    chat = origin.chat_id,
                    error = %e,
                    "the reply can never be delivered (bot blocked, chat gone); dropping it"
                );
            }
            Ok(Err(e)) => {
                tracing::error!(
                    update_id,
                    chat = origin.chat_id,
                    error = %e,
                    "the reply was not delivered; it stays pending and is answered after a restart"
                );
                return;
            }
            Err(panic) => {
                tracing::error!(
                    update_id,
                    chat = origin.chat_id,
                    panic = %panic,
                    "handling an update panicked; apologising and marking it done"
                );
                self.apologise(origin).await;
            }
        }
        self.done(seq).await;
    }

    /// Tells the user something went wrong on our side (a failure to deliver it is only
    /// logged).
    async fn apologise(&self, origin: &Origin) {
        let text = i18n::internal_error(origin.lang);
        match guard::guarded(self.say(origin, text)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(chat = origin.chat_id, error = %e, "could not send the apology")
            }
            Err(panic) => {
                tracing::error!(chat = origin.chat_id, panic = %panic, "sending the apology panicked")
            }
        }
    }

    /// Handles a finished task: a task that died is logged with what it was doing, and
    /// its chat gets an apology.
    fn reap(self: &Arc<Self>, joined: Result<(tokio::task::Id, ()), JoinError>, tasks: &mut Tasks) {
        let error = match joined {
            Ok((id, ())) => {
                tasks.running.remove(&id);
                return;
            }
            Err(error) => error,
        };
        let info = tasks.running.remove(&error.id());
        if !error.is_panic() {
            // Cancelled: only at shutdown.
            return;
        }
        let panic = guard::panic_message(error.into_panic().as_ref());
        let Some(info) = info else {
            tracing::error!(panic = %panic, "an unknown Telegram task panicked");
            return;
        };
        tracing::error!(
            task = info.what,
            update_id = info.update_id,
            chat = info.origin.chat_id,
            panic = %panic,
            "a Telegram task panicked; its unanswered updates stay pending until a restart"
        );
        let bot = Arc::clone(self);
        let origin = info.origin.clone();
        tasks.spawn(
            TaskInfo {
                what: "apology",
                update_id: None,
                origin: info.origin,
            },
            async move { bot.apologise(&origin).await },
        );
    }

    /// Routes one update.
    fn dispatch(self: &Arc<Self>, seq: Seq, update: Update, received: Instant, tasks: &mut Tasks) {
        let update_id = update.id.0;
        if let UpdateKind::CallbackQuery(query) = &update.kind {
            return self.callback(seq, update_id, query, received, tasks);
        }
        if let Some(press) = updates::stopped(&update) {
            self.stop_pressed(press);
            drop(self.state().done(seq));
            return;
        }
        let sender = Sender::of(&update);
        let classified = guard::guarded_sync(|| {
            incoming::classify(&update, &self.me, self.fair.allowed_for(sender.as_ref()))
        });
        let incoming = match classified {
            Ok(incoming) => incoming,
            Err(panic) => {
                tracing::error!(update_id, panic = %panic, "classifying an update panicked");
                let bot = Arc::clone(self);
                match raw_origin(&update) {
                    Some(origin) => tasks.spawn(
                        TaskInfo {
                            what: "poison update",
                            update_id: Some(update_id),
                            origin: origin.clone(),
                        },
                        async move { bot.settle(seq, update_id, &origin, Err(panic)).await },
                    ),
                    None => drop(self.state().done(seq)),
                }
                return;
            }
        };
        let Some(origin) = incoming.origin else {
            drop(self.state().done(seq));
            return;
        };
        tracing::debug!(
            update_id,
            chat = origin.chat_id,
            action = incoming.action.kind(),
            "update"
        );
        let lang = origin.lang;
        let quick = |text: String, tasks: &mut Tasks| {
            let bot = Arc::clone(self);
            let info = TaskInfo {
                what: "quick reply",
                update_id: Some(update_id),
                origin: origin.clone(),
            };
            let origin = origin.clone();
            tasks.spawn(info, async move {
                let result = guard::guarded(bot.say(&origin, &text)).await;
                let result = result.map(|sent| sent.map_err(DeliveryError::from));
                bot.settle(seq, update_id, &origin, result).await;
            });
        };
        let mut action = incoming.action;
        if action != Action::Ignore && self.fair.denied(sender.as_ref()) {
            action = Action::Refuse;
        }
        let admin = sender.as_ref().is_some_and(|s| self.fair.is_admin(s));
        match action {
            Action::Ignore => drop(self.state().done(seq)),
            Action::Refuse => quick(i18n::refused(lang).into(), tasks),
            Action::NotText => quick(i18n::text_only(lang).into(), tasks),
            Action::Edited => quick(i18n::edited_ignored(lang).into(), tasks),
            Action::Empty => quick(i18n::empty_hint(lang).into(), tasks),
            Action::Command(Command::Start) => {
                quick(i18n::greeting(lang, &self.deps.model_name()), tasks)
            }
            Action::Command(Command::Help) => quick(i18n::help(lang).into(), tasks),
            Action::Command(Command::Stats) => self.stats(seq, update_id, origin, tasks),
            Action::Command(Command::StatsAll | Command::Allow(_) | Command::Deny(_)) if !admin => {
                quick(limits::admins_only(lang).into(), tasks)
            }
            Action::Command(Command::StatsAll) => self.stats_all(seq, update_id, origin, tasks),
            Action::Command(Command::Allow(who)) => {
                self.access(seq, update_id, origin, &who, true, tasks)
            }
            Action::Command(Command::Deny(who)) => {
                self.access(seq, update_id, origin, &who, false, tasks)
            }
            Action::Command(Command::Usage) => {
                let (messages, tokens) = sender.as_ref().map_or((0, 0), |s| self.fair.usage(s));
                let limits = self.fair.limits();
                quick(
                    limits::usage_text(lang, messages, tokens, limits, admin),
                    tasks,
                )
            }
            Action::Command(Command::Mode) => self.mode_menu(seq, update_id, origin, tasks),
            Action::Command(Command::System(text)) => {
                self.system_command(seq, update_id, origin, text, received, sender, tasks)
            }
            Action::Command(Command::Stop) => {
                let stopped = self
                    .lock_chats()
                    .get(&origin.conversation())
                    .and_then(|slot| lock(&slot.stop).take())
                    .is_some_and(Stopper::stop);
                let text = if stopped {
                    i18n::stopped(lang)
                } else {
                    i18n::nothing_to_stop(lang)
                };
                quick(text.into(), tasks);
            }
            Action::Command(Command::Reset) => {
                self.enqueue(seq, update_id, origin, Work::Reset, received, sender, tasks)
            }
            Action::Command(Command::Retry) | Action::Ask(_) => {
                // Admitted before anything is queued: a refused message costs a reply only.
                if let Some(refusal) = self.admission(sender.as_ref(), &origin) {
                    return quick(refusal, tasks);
                }
                let work = match action {
                    Action::Ask(text) => {
                        Work::Ask(Box::new(inputs::Request::new(text, &update, &self.me)))
                    }
                    _ => Work::Retry,
                };
                self.enqueue(seq, update_id, origin, work, received, sender, tasks)
            }
        }
    }

    /// The user pressed the stop button of a draft: stops that answer as `/stop` does (what
    /// was written is delivered), unless the chat has moved on to another answer.
    fn stop_pressed(&self, press: updates::GenerationStopped) {
        let key = ConversationKey {
            chat: press.chat,
            topic: press.thread,
        };
        let stopper = self.lock_chats().get(&key).and_then(|slot| {
            let mut stop = lock(&slot.stop);
            let same = stop
                .as_ref()
                .is_some_and(|s| draft::is_draft_of(press.draft_id, s.message));
            if same { stop.take() } else { None }
        });
        let stopped = stopper.is_some_and(Stopper::stop);
        tracing::info!(
            chat = press.chat,
            draft_id = press.draft_id,
            stopped,
            "the user pressed a draft's stop button"
        );
    }

    /// Answers an update with a text made by `text`, in its own task.
    fn reply(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        text: impl Future<Output = String> + Send + 'static,
        tasks: &mut Tasks,
    ) {
        let bot = Arc::clone(self);
        let info = TaskInfo {
            what: "reply",
            update_id: Some(update_id),
            origin: origin.clone(),
        };
        tasks.spawn(info, async move {
            let result = guard::guarded(async {
                let text = text.await;
                bot.say(&origin, &text).await.map_err(DeliveryError::from)
            })
            .await;
            bot.settle(seq, update_id, &origin, result).await;
        });
    }

    /// `/stats`: the engine's figures and this conversation's persona.
    fn stats(self: &Arc<Self>, seq: Seq, update_id: u32, origin: Origin, tasks: &mut Tasks) {
        let bot = Arc::clone(self);
        let asked = origin.clone();
        let text = async move {
            let persona = bot.persona_line(&asked).await;
            format!("{}\n{persona}", bot.stats_text(asked.lang))
                .trim_end()
                .to_string()
        };
        self.reply(seq, update_id, origin, text, tasks);
    }

    fn stats_text(&self, lang: Lang) -> String {
        let stats = self
            .deps
            .engine
            .as_ref()
            .map(EngineHandle::stats)
            .unwrap_or_default();
        i18n::stats(
            lang,
            &i18n::StatsFigures {
                model: &self.deps.model_name(),
                slots_busy: stats.slots_busy,
                slots: stats.slots,
                queue_len: stats.queue_len,
                answers: self.answers.load(Ordering::Relaxed),
                tokens_per_second: stats.avg_tokens_per_second,
            },
        )
    }

    /// Puts work in its conversation's queue, starting a worker if there is none.
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        self: &Arc<Self>,
        seq: Seq,
        update_id: u32,
        origin: Origin,
        work: Work,
        received: Instant,
        sender: Option<Sender>,
        tasks: &mut Tasks,
    ) {
        let key = origin.conversation();
        let mut job = Job {
            seq,
            update_id,
            origin,
            work,
            received,
            sender,
        };
        let mut chats = self.lock_chats();
        if let Some(slot) = chats.get(&key) {
            match slot.jobs_tx.try_send(job) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(back)) => {
                    drop(chats);
                    let bot = Arc::clone(self);
                    let info = TaskInfo {
                        what: "chat busy reply",
                        update_id: Some(back.update_id),
                        origin: back.origin.clone(),
                    };
                    tasks.spawn(info, async move {
                        let text = i18n::chat_busy(back.origin.lang);
                        let result = guard::guarded(bot.say(&back.origin, text)).await;
                        let result = result.map(|sent| sent.map_err(DeliveryError::from));
                        bot.settle(back.seq, back.update_id, &back.origin, result)
                            .await;
                    });
                    return;
                }
                // The worker went idle and exited (or died): start a new one.
                Err(mpsc::error::TrySendError::Closed(back)) => job = back,
            }
        }
        let (jobs_tx, jobs_rx) = mpsc::channel(CHAT_QUEUE);
        let stop = Arc::new(Mutex::new(None));
        let info = TaskInfo {
            what: "conversation worker",
            update_id: None,
            origin: job.origin.clone(),
        };
        if let Err(e) = jobs_tx.try_send(job) {
            // Cannot happen with a fresh channel of capacity ≥ 1.
            tracing::error!(error = %e, "a new conversation queue refused its first job");
            return;
        }
        chats.insert(
            key,
            ChatSlot {
                jobs_tx,
                stop: Arc::clone(&stop),
            },
        );
        drop(chats);
        let bot = Arc::clone(self);
        tasks.spawn(info, async move { bot.worker(key, jobs_rx, stop).await });
    }

    /// A conversation's worker: answers its jobs in order; exits when idle.
    async fn worker(
        self: Arc<Self>,
        key: ConversationKey,
        mut jobs_rx: mpsc::Receiver<Job>,
        stop: Arc<Mutex<Option<Stopper>>>,
    ) {
        loop {
            match tokio::time::timeout(WORKER_IDLE, jobs_rx.recv()).await {
                Ok(Some(job)) => self.handle(job, &stop).await,
                Ok(None) => break,
                Err(_) => {
                    jobs_rx.close();
                    while let Ok(job) = jobs_rx.try_recv() {
                        self.handle(job, &stop).await;
                    }
                    break;
                }
            }
        }
        let mut chats = self.lock_chats();
        if chats.get(&key).is_some_and(|slot| slot.jobs_tx.is_closed()) {
            chats.remove(&key);
        }
    }

    /// Does one job behind the panic boundary, then settles its update.
    async fn handle(&self, job: Job, stop: &Mutex<Option<Stopper>>) {
        let result = guard::guarded(self.work(&job, stop)).await;
        // A panic may have left the stop handle set.
        lock(stop).take();
        self.settle(job.seq, job.update_id, &job.origin, result)
            .await;
    }

    async fn work(&self, job: &Job, stop: &Mutex<Option<Stopper>>) -> Result<(), DeliveryError> {
        let key = job.origin.conversation();
        let lang = job.origin.lang;
        match &job.work {
            Work::Reset => {
                let text = match self.deps.responder.reset(key).await {
                    Ok(()) => i18n::reset_done(lang),
                    Err(e) => {
                        tracing::error!(chat = key.chat, error = %e, "cannot forget a conversation");
                        i18n::history_unavailable(lang)
                    }
                };
                Ok(self.say(&job.origin, text).await?)
            }
            Work::Persona(persona) => self.set_persona(&job.origin, persona).await,
            Work::Retry => self.answer(job, Question::Again, stop).await,
            Work::Ask(request) => {
                let inputs = &self.deps.inputs;
                let question = match inputs
                    .prepare(&self.api, &job.origin, request, &self.deps.responder)
                    .await
                {
                    inputs::Prepared::Ask { question, notice } => {
                        if let Some(notice) = notice {
                            self.say(&job.origin, &notice).await?;
                        }
                        question
                    }
                    inputs::Prepared::Say(text) => return Ok(self.say(&job.origin, &text).await?),
                    inputs::Prepared::Nothing => return Ok(()),
                };
                self.answer(job, Question::New(question), stop).await
            }
        }
    }
    /// Where replies to `origin` go.
    fn target(origin: &Origin) -> Target {
        Target {
            chat: ChatId(origin.chat_id),
            thread: origin.thread,
            reply_to: (!origin.private).then_some(origin.message_id),
        }
    }

    /// Sends one of the bot's own messages, retrying until delivered, refused for good,
    /// or the deadline.
    async fn say(&self, origin: &Origin, text: &str) -> Result<(), ApiCallError> {
        let mut retry = DeliveryRetry::default();
        loop {
            match self
                .api
                .send(Self::target(origin), text, false, Persistence::Deliver)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => retry.wait("sendMessage", e).await?,
            }
        }
    }

    /// Answers `question` in `origin`'s conversation, streaming; commits the turn once
    /// the answer is delivered.
    async fn answer(
        &self,
        job: &Job,
        question: Question,
        stop: &Mutex<Option<Stopper>>,
    ) -> Result<(), DeliveryError> {
        let (origin, received) = (&job.origin, job.received);
        let key = origin.conversation();
        let target = Self::target(origin);
        let typing = stream::typing(&self.api, target);
        let (tx, mut stop_rx) = oneshot::channel();
        *lock(stop) = Some(Stopper {
            message: origin.message_id.0,
            tx,
        });

        let responder = &self.deps.responder;
        let started = async move {
            match question {
                // The message id makes a message answered again after a crash keep one
                // turn.
                Question::New(text) => {
                    let source = Some(i64::from(origin.message_id.0));
                    responder
                        .ask(key, text, source, origin.lang)
                        .await
                        .map(Some)
                }
                Question::Again => responder.retry(key, origin.lang).await,
            }
        };
        let started = tokio::select! {
            started = started => started,
            _ = &mut stop_rx => {
                lock(stop).take();
                return Ok(());
            }
        };
        let stored = match started {
            Ok(Some(stored)) => stored,
            Ok(None) => {
                lock(stop).take();
                drop(typing);
                return Ok(self
                    .say(origin, i18n::nothing_to_retry(origin.lang))
                    .await?);
            }
            Err(e) => {
                lock(stop).take();
                drop(typing);
                tracing::error!(chat = origin.chat_id, error = %e, "cannot read the chat's history");
                return Ok(self
                    .say(origin, i18n::history_unavailable(origin.lang))
                    .await?);
            }
        };
        let turn = stored.turn;
        let reply = match stored.reply {
            Ok(reply) => reply,
            Err(refused) => {
                // The user's own message was refused (too long, blocked…): a polite,
                // specific reply, and nothing enters the conversation.
                lock(stop).take();
                drop(typing);
                tracing::info!(chat = origin.chat_id, error = %refused, "request refused");
                return Ok(self
                    .say(origin, refused.fault().user_text(origin.lang))
                    .await?);
            }
        };
        let provider = reply.provider;
        let delivered = draft::deliver(
            &self.api,
            &self.drafts,
            target,
            origin.private,
            origin.message_id.0,
            reply.events,
            stop_rx,
            typing,
        )
        .await;
        lock(stop).take();
        let delivered = delivered?;
        if delivered.messages == 0 && !delivered.stopped {
            // A blank answer shows nothing: say so rather than leave the user waiting.
            self.say(origin, i18n::empty_answer(origin.lang)).await?;
        }
        let answer = delivered.text.trim();
        // What the answer cost its sender: the provider's count, or (an answer stopped
        // before its closing record) an estimate of four bytes a token.
        let tokens = delivered.completion.as_ref().map_or_else(
            || (turn.question().len() + delivered.text.len()).div_ceil(4) as u64,
            |c| u64::from(c.usage.prompt_tokens) + u64::from(c.usage.completion_tokens),
        );
        if let Some(sender) = &job.sender {
            self.fair.spent(sender, origin.chat_id, provider, tokens);
        }
        // Kept as delivered (a stopped answer as far as it went); the canned apology is not
        // kept, so /retry can ask again.
        if let Err(e) = turn.delivered(answer).await {
            tracing::error!(chat = origin.chat_id, error = %e, "answer delivered but not saved in the history");
        }
        self.answers.fetch_add(1, Ordering::Relaxed);
        let to_first_send = delivered.first_send.map(|t| t.duration_since(received));
        let ttft = delivered
            .completion
            .map(|c| c.timings.queued + c.timings.prompt);
        let overhead = match (to_first_send, ttft) {
            (Some(send), Some(ttft)) => Some(send.saturating_sub(ttft)),
            _ => None,
        };
        tracing::info!(
            chat = origin.chat_id,
            provider,
            chars = answer.chars().count(),
            messages = delivered.messages,
            tokens,
            stopped = delivered.stopped,
            to_first_send_us = to_first_send.map(|d| d.as_micros() as u64),
            ttft_us = ttft.map(|d| d.as_micros() as u64),
            overhead_us = overhead.map(|d| d.as_micros() as u64),
            "answer delivered"
        );
        Ok(())
    }
}

/// Where to apologise for an update that could not even be classified: its chat and
/// message, from the raw update.
fn raw_origin(update: &Update) -> Option<Origin> {
    let (UpdateKind::Message(message) | UpdateKind::EditedMessage(message)) = &update.kind else {
        return None;
    };
    Some(Origin {
        chat_id: message.chat.id.0,
        thread: message
            .is_topic_message
            .then_some(message.thread_id)
            .flatten(),
        message_id: message.id,
        private: message.chat.is_private(),
        lang: Lang::from_code(
            message
                .from
                .as_ref()
                .and_then(|u| u.language_code.as_deref()),
        ),
    })
}
