//! [`Router`]: starts the pipeline's stages over a bus, implements
//! [`Dispatch`] for the gateway (stateless checks at ingress, everything
//! slow on the router's own tasks), shuts down by draining stage after
//! stage, and offers the dead-letter admin functions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::FutureExt;
use pingme_protocol::ErrorCode;
use pingme_protocol::v1::{self, client_frame};
use pingme_storage::{ConversationId, DeadLetter, StoreError, Stores};
use tokio::runtime::Handle;
use tokio::sync::{Mutex, Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusError, BusRecord, GroupMember, InProcessBus, Topic, conversation_key};
use crate::config::RouterConfig;
use crate::directory::{Directory, LocalDirectory, Registration};
use crate::pipeline::{PipelineBus, PipelineContext, Topics};
use crate::port::{ConnRef, Dispatch, Outbox, SessionInfo};
use crate::push::{PushProvider, WebhookPush};
use crate::records::{AcceptedSend, Origin};
use crate::retry::RetryPolicy;
use crate::stages::ReplayError;
use crate::wire::{content_type_is_valid, error_frame};
use crate::{conversation_worker, fanout, requests, stages, watermarks};

/// This node's consumers of one topic, stopped together at shutdown.
struct Stage {
    /// The topic's name (logs).
    topic: String,
    /// Keeps the topic's queue-depth gauge current, if it has one.
    depth_sampler: Option<JoinHandle<()>>,
    /// This node stops producing to the topic.
    stop_producing: Box<dyn Fn() + Send + Sync>,
    /// Tells the members to finish what is queued for them and leave.
    leave: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Stage {
    /// Joins `members` members of `group` on `topic` (over `bus`, the
    /// pipeline's bus seen for this record type), each run by `worker`;
    /// with a `depth_label`, samples the group's lag into
    /// `pingme_router_queue_depth{topic=depth_label}`.
    fn start<R: BusRecord, Fut>(
        ctx: &Arc<PipelineContext>,
        topic: &Topic<R>,
        bus: Arc<dyn Bus<R>>,
        group: &str,
        members: usize,
        worker: fn(Arc<PipelineContext>, Box<dyn GroupMember<R>>) -> Fut,
        depth_label: Option<&'static str>,
    ) -> Result<Stage, BusError>
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        bus.declare(topic)?;
        let leave = CancellationToken::new();
        let mut tasks = Vec::with_capacity(members);
        for index in 0..members {
            let name = format!("{}-{}-{index}", ctx.config.gateway_id, topic.name());
            let member = bus.join(topic, group, &name, leave.clone())?;
            tasks.push(tokio::spawn(worker(ctx.clone(), member)));
        }
        let depth_sampler = depth_label.map(|label| {
            let gauge = metrics::gauge!(crate::telemetry::QUEUE_DEPTH, "topic" => label);
            tokio::spawn(sample_queue_depth(
                bus.clone(),
                topic.clone(),
                group.to_string(),
                gauge,
            ))
        });
        let stop_topic = topic.clone();
        Ok(Stage {
            topic: topic.name().to_string(),
            depth_sampler,
            stop_producing: Box::new(move || bus.stop_producing(&stop_topic)),
            leave,
            tasks,
        })
    }
}

/// How often a stage's queue depth is sampled.
const QUEUE_DEPTH_PERIOD: Duration = Duration::from_secs(1);

/// Keeps `gauge` at what `group` has not processed of `topic` (its lag),
/// sampled every [`QUEUE_DEPTH_PERIOD`] until aborted. From a timer rather
/// than from the consumers' loops, so it stays true while they are idle.
async fn sample_queue_depth<R: BusRecord>(
    bus: Arc<dyn Bus<R>>,
    topic: Topic<R>,
    group: String,
    gauge: metrics::Gauge,
) {
    let mut ticks = tokio::time::interval(QUEUE_DEPTH_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        gauge.set(bus.lag(&topic, &group) as f64);
    }
}

/// A connection's typing budget: a one-second window and its count.
#[derive(Clone, Copy)]
struct TypingWindow {
    started: Instant,
    count: u32,
}

/// The message pipeline of one node. Cheap to share (`Arc<Router>`); the
/// gateway holds it as `Arc<dyn Dispatch>`.
pub struct Router {
    ctx: Arc<PipelineContext>,
    /// This gateway's id, shared by every registration.
    gateway: Arc<str>,
    /// Registrations still on their way to the directory, so a connection's
    /// unregister never overtakes its register.
    registering: DashMap<ConnRef, JoinHandle<()>>,
    /// Renews this gateway's directory lease, if the directory has leases.
    lease_renewer: Option<JoinHandle<()>>,
    typing: DashMap<ConnRef, TypingWindow>,
    accepting: AtomicBool,
    requests: Arc<Semaphore>,
    runtime: Handle,
    stages: Mutex<Vec<Stage>>,
    /// Work a closing connection leaves (its directory unregister, its
    /// delivered watermarks), finished before the process exits.
    closing: TaskTracker,
    /// Stops the delivered-watermark writer (it writes what is pending
    /// first).
    watermark_writer: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("gateway_id", &self.ctx.config.gateway_id)
            .field("accepting", &self.accepting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Starts the single-node pipeline (in-process bus with one partition
    /// per worker, this gateway's outbox as the directory). Must be called
    /// inside a tokio runtime; the stages run on it.
    pub fn start(stores: Stores, outbox: Arc<dyn Outbox>, config: RouterConfig) -> Arc<Router> {
        let directory = Arc::new(LocalDirectory::new(
            config.gateway_id.clone(),
            outbox.clone(),
        ));
        Self::start_single_node(stores, outbox, config, directory)
    }

    /// [`Router::start`] with another directory (tests put faults in it).
    pub fn start_single_node(
        stores: Stores,
        outbox: Arc<dyn Outbox>,
        config: RouterConfig,
        directory: Arc<dyn Directory>,
    ) -> Arc<Router> {
        let config = config.normalised().single_node();
        let bus = Arc::new(InProcessBus::new(config.queue_capacity));
        // Alone on its bus: frames for its connections skip the downstream
        // topic (`PipelineContext::local_downstream`).
        Self::start_pipeline(stores, outbox, config, bus, directory, true)
            .expect("the in-process bus has a partition for every worker")
    }

    /// Starts the pipeline over any bus and directory (several nodes over
    /// a [`crate::BusCluster`] in tests, Kafka and Redis in a cluster).
    /// Every stage of this node joins its topic's consumer group; this
    /// gateway consumes its own downstream topic.
    pub fn start_with(
        stores: Stores,
        outbox: Arc<dyn Outbox>,
        config: RouterConfig,
        bus: Arc<dyn PipelineBus>,
        directory: Arc<dyn Directory>,
    ) -> Result<Arc<Router>, BusError> {
        Self::start_pipeline(stores, outbox, config, bus, directory, false)
    }

    fn start_pipeline(
        stores: Stores,
        outbox: Arc<dyn Outbox>,
        config: RouterConfig,
        bus: Arc<dyn PipelineBus>,
        directory: Arc<dyn Directory>,
        local_downstream: bool,
    ) -> Result<Arc<Router>, BusError> {
        let config = config.normalised();
        let push = push_provider(&config);
        let ctx = Arc::new(PipelineContext {
            stores,
            bus: bus.clone(),
            topics: Topics::new(&config.topics),
            directory,
            outbox,
            push,
            retry: RetryPolicy::from_config(&config),
            config,
            delivered_acks: Default::default(),
            downstream_owned: Default::default(),
            unanswered: Default::default(),
            local_downstream,
        });
        // Shutdown order: upstream stages first, so each stage drains into
        // a downstream one that is still running; answers go out last.
        let (topics, layout, role) = (&ctx.topics, &ctx.config.topics, ctx.config.role);
        let downstream = topics.downstream(&ctx.config.gateway_id);
        let mut running = Vec::new();
        if role.worker() {
            running.push(Stage::start(
                &ctx,
                &topics.accepted,
                bus.clone(),
                &layout.persistence_group,
                ctx.config.workers,
                conversation_worker::run,
                Some("accepted"),
            )?);
            running.push(Stage::start(
                &ctx,
                &topics.tasks,
                bus.clone(),
                &layout.consumer_group,
                ctx.config.fanout_workers,
                fanout::run,
                Some("fanout"),
            )?);
            running.push(Stage::start(
                &ctx,
                &topics.push,
                bus.clone(),
                &layout.push_group,
                ctx.config.push_workers,
                stages::run_push,
                Some("push"),
            )?);
            running.push(Stage::start(
                &ctx,
                &topics.dead_letters,
                bus.clone(),
                &layout.dlq_group,
                1,
                stages::run_dead_letters,
                None,
            )?);
        } else {
            // A gateway publishes sends, and replays dead letters, into
            // the workers' topics: they exist before the first send.
            Bus::declare(&*bus, &topics.accepted)?;
            Bus::declare(&*bus, &topics.tasks)?;
            Bus::declare(&*bus, &topics.push)?;
            Bus::declare(&*bus, &topics.dead_letters)?;
        }
        if role.gateway() {
            running.push(Stage::start(
                &ctx,
                &downstream,
                bus,
                downstream.name(),
                ctx.config.workers,
                stages::run_downstream,
                Some("downstream"),
            )?);
        }
        let (stop_watermarks, stopped) = oneshot::channel();
        let watermark_writer = tokio::spawn(watermarks::run(ctx.clone(), stopped));
        let max_requests = ctx.config.max_inflight_requests;
        let gateway: Arc<str> = Arc::from(ctx.config.gateway_id.as_str());
        // A worker has no connections, hence no lease to hold.
        let lease_renewer = ctx
            .directory
            .renew_every()
            .filter(|_| role.gateway())
            .map(|every| tokio::spawn(renew_lease(ctx.directory.clone(), gateway.clone(), every)));
        Ok(Arc::new(Router {
            ctx,
            gateway,
            registering: DashMap::new(),
            lease_renewer,
            typing: DashMap::new(),
            accepting: AtomicBool::new(true),
            requests: Arc::new(Semaphore::new(max_requests)),
            runtime: Handle::current(),
            stages: Mutex::new(running),
            closing: TaskTracker::new(),
            watermark_writer: Mutex::new(Some((stop_watermarks, watermark_writer))),
        }))
    }

    /// Stops taking work (new sends get `SHUTTING_DOWN`), waits for
    /// requests in flight, then stops every stage in pipeline order: this
    /// node stops producing to the stage's topic, and the stage's members
    /// finish what is queued for them and leave their group. Single node:
    /// every accepted send is stored and answered, every delivery, push and
    /// dead letter it caused is handed on. In a cluster what other nodes
    /// publish later goes to the members that stay. Idempotent.
    pub async fn shutdown(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let permits = self.ctx.config.max_inflight_requests as u32;
        let _requests_done = self.requests.acquire_many(permits).await;
        // The answers to the sends this gateway published come back through
        // its downstream topic, from whichever node's worker holds their
        // conversation: wait for them (bounded) while it is still consumed.
        if self.ctx.config.role.gateway() {
            let waited = Instant::now();
            while self.ctx.unanswered.load(Ordering::SeqCst) > 0 {
                if waited.elapsed() >= self.ctx.config.answers_wait {
                    tracing::warn!(
                        unanswered = self.ctx.unanswered.load(Ordering::SeqCst),
                        "stopping with sends unanswered: their senders retry elsewhere (idempotent)"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some((stop, writer)) = self.watermark_writer.lock().await.take() {
            let _ = stop.send(());
            if let Err(error) = writer.await {
                tracing::error!(%error, "delivered watermark writer failed");
            }
        }
        let stages = std::mem::take(&mut *self.stages.lock().await);
        for stage in stages {
            (stage.stop_producing)();
            stage.leave.cancel();
            for task in stage.tasks {
                if let Err(error) = task.await {
                    tracing::error!(%error, topic = stage.topic, "stage task failed");
                }
            }
            if let Some(sampler) = stage.depth_sampler {
                sampler.abort();
            }
        }
        // The gateway unregistered its connections as they closed; the
        // lease may lapse now.
        if let Some(renewer) = &self.lease_renewer {
            renewer.abort();
        }
    }

    /// Polls `work` once, inside the router's runtime rather than the
    /// calling shard's: a timer or socket it registers must belong to the
    /// runtime that finishes it, which outlives the shards. Whether it
    /// finished.
    fn finished_at_once<F: std::future::Future + Unpin>(&self, work: &mut F) -> bool {
        let _inside = self.runtime.enter();
        work.now_or_never().is_some()
    }

    /// Waits (up to `limit`) for what closed connections left to do: their
    /// directory unregisters and delivered watermarks. Called once the
    /// gateway closed its connections, before the store and the runtime go.
    pub async fn finish_closing(&self, limit: Duration) {
        self.closing.close();
        if tokio::time::timeout(limit, self.closing.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.closing.len(),
                "closed connections' directory and watermark writes unfinished at exit"
            );
        }
    }

    /// Dead letters with id greater than `after`, oldest first, at most
    /// `limit`.
    pub async fn dead_letters(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        self.ctx
            .stores
            .dead_letters
            .dead_letters(after, limit)
            .await
    }

    /// How many dead letters are stored.
    pub async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        self.ctx.stores.dead_letters.dead_letter_count().await
    }

    /// Runs a dead letter's work once more and removes it on success.
    pub async fn replay_dead_letter(&self, id: u64) -> Result<(), ReplayError> {
        stages::replay(&self.ctx, id).await
    }

    /// Whether this gateway's downstream consumers hold every partition of
    /// its downstream topic (always true for a worker): until then frames
    /// for its connections wait on the bus, and `/health` is not ready.
    pub fn serving_downstream(&self) -> bool {
        !self.ctx.config.role.gateway()
            || self.ctx.downstream_owned().len()
                >= self.ctx.config.topics.downstream_partitions as usize
    }

    /// The settings in effect (after normalisation).
    pub fn config(&self) -> &RouterConfig {
        &self.ctx.config
    }

    fn answer(&self, session: &SessionInfo, frame: bytes::Bytes) {
        self.ctx.outbox.to_connection(session.conn, frame);
    }

    fn refuse(
        &self,
        session: &SessionInfo,
        request_id: u64,
        code: ErrorCode,
        message: &str,
        client_msg_id: &str,
    ) {
        crate::telemetry::failed(code, 1);
        self.answer(
            session,
            error_frame(request_id, code, message, client_msg_id),
        );
    }

    /// The stateless checks of a send, then onto its conversation's worker.
    fn accept_send(&self, session: &SessionInfo, request_id: u64, send: v1::SendMessage) {
        let refuse = |code, message: &str| {
            self.refuse(session, request_id, code, message, &send.client_msg_id)
        };
        if !self.accepting.load(Ordering::Relaxed) {
            return refuse(ErrorCode::ShuttingDown, "the server is shutting down");
        }
        let config = &self.ctx.config;
        if send.client_msg_id.is_empty() || send.client_msg_id.len() > config.max_client_msg_id_len
        {
            return refuse(
                ErrorCode::InvalidArgument,
                "client_msg_id must be 1 to 128 bytes",
            );
        }
        let conversation = match addressable(&send.conversation_id, session) {
            Ok(conversation) => conversation,
            Err((code, message)) => return refuse(code, message),
        };
        if !content_type_is_valid(send.content_type) {
            return refuse(ErrorCode::InvalidArgument, "content_type must be set");
        }
        if send.body.len() > config.max_body_bytes {
            return refuse(
                ErrorCode::BodyTooLarge,
                "the body exceeds the maximum body size",
            );
        }
        let send = AcceptedSend {
            origin: Origin {
                gateway: config.gateway_id.clone(),
                conn: session.conn.into(),
                request_id,
            },
            sender: session.user,
            sender_device: session.device.to_string(),
            client_msg_id: send.client_msg_id.clone(),
            conversation,
            content_type: send.content_type,
            body: send.body,
            accepted_at_us: crate::pipeline::now_us(),
        };
        // Counted before publishing: the answer may come back first.
        self.ctx.unanswered.fetch_add(1, Ordering::SeqCst);
        if let Err(error) = self.ctx.bus.try_publish(
            &self.ctx.topics.accepted,
            conversation_key(&conversation),
            send,
        ) {
            self.ctx.unanswered.fetch_sub(1, Ordering::SeqCst);
            refuse(error.code(), &error.to_string());
        }
    }

    /// A cumulative delivery ack: checked for what needs no store, then
    /// coalesced with the device's other acks and written within
    /// [`watermarks::FLUSH_PERIOD`] (membership is checked then).
    fn delivery_ack(&self, session: &SessionInfo, request_id: u64, ack: v1::DeliveryAck) {
        let conversation = match addressable(&ack.conversation_id, session) {
            Ok(conversation) => conversation,
            Err((code, message)) => return self.refuse(session, request_id, code, message, ""),
        };
        self.ctx
            .delivered_acks
            .note(session, request_id, conversation, ack.seq);
    }

    /// Whether this connection may send one more typing frame now.
    fn typing_allowed(&self, conn: ConnRef) -> bool {
        let now = Instant::now();
        let mut window = self.typing.entry(conn).or_insert(TypingWindow {
            started: now,
            count: 0,
        });
        if now.duration_since(window.started) >= Duration::from_secs(1) {
            *window = TypingWindow {
                started: now,
                count: 0,
            };
        }
        window.count += 1;
        window.count <= self.ctx.config.typing_max_per_second
    }

    /// Bounds a presence query here; the directory answers it on the
    /// router's tasks (it may be remote).
    fn presence_query(&self, session: &SessionInfo, request_id: u64, query: v1::PresenceQuery) {
        if query.user_ids.len() > self.ctx.config.presence_query_max {
            return self.refuse(
                session,
                request_id,
                ErrorCode::InvalidArgument,
                "too many user ids in one presence query",
                "",
            );
        }
        self.spawn_request(
            session,
            request_id,
            client_frame::Body::PresenceQuery(query),
        );
    }

    fn registration(&self, session: &SessionInfo) -> Registration {
        Registration {
            user: session.user,
            device: session.device.clone(),
            gateway: self.gateway.clone(),
            conn: session.conn.into(),
        }
    }

    /// Runs a request on the router's runtime, bounded by the in-flight limit.
    fn spawn_request(&self, session: &SessionInfo, request_id: u64, body: client_frame::Body) {
        if !self.accepting.load(Ordering::Relaxed) {
            return self.refuse(
                session,
                request_id,
                ErrorCode::ShuttingDown,
                "the server is shutting down",
                "",
            );
        }
        let Ok(permit) = self.requests.clone().try_acquire_owned() else {
            return self.refuse(
                session,
                request_id,
                ErrorCode::Overloaded,
                "too many requests in flight",
                "",
            );
        };
        let ctx = self.ctx.clone();
        let session = session.clone();
        self.runtime.spawn(async move {
            requests::handle(&ctx, &session, request_id, body).await;
            drop(permit);
        });
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(renewer) = &self.lease_renewer {
            renewer.abort();
        }
    }
}

impl Dispatch for Router {
    fn connected(&self, session: &SessionInfo) {
        let directory = self.ctx.directory.clone();
        let registration = self.registration(session);
        let mut register = Box::pin(async move {
            if let Err(error) = directory.register(&registration).await {
                crate::telemetry::failed(ErrorCode::DirectoryUnavailable, 1);
                if let Some(held_back) = DIRECTORY_WRITE_ERRORS.due() {
                    tracing::error!(%error, user = registration.user, held_back, "connection not registered in the directory");
                }
            }
        });
        // The local directory answers at once: no task, and presence is
        // current when this returns. A remote one finishes on a task.
        if !self.finished_at_once(&mut register) {
            self.registering
                .insert(session.conn, self.runtime.spawn(register));
        }
    }

    fn disconnected(&self, session: &SessionInfo) {
        let pending = self.registering.remove(&session.conn).map(|(_, task)| task);
        let directory = self.ctx.directory.clone();
        let registration = self.registration(session);
        let mut unregister = Box::pin(async move {
            if let Some(register) = pending {
                let _ = register.await;
            }
            if let Err(error) = directory.unregister(&registration).await {
                crate::telemetry::failed(ErrorCode::DirectoryUnavailable, 1);
                if let Some(held_back) = DIRECTORY_WRITE_ERRORS.due() {
                    tracing::error!(%error, user = registration.user, held_back, "connection not unregistered from the directory");
                }
            }
        });
        if !self.finished_at_once(&mut unregister) {
            self.closing.spawn_on(unregister, &self.runtime);
        }
        self.typing.remove(&session.conn);
        // The device's next session syncs from what it acknowledged here.
        let acks = self
            .ctx
            .delivered_acks
            .take_device(session.user, &session.device);
        if !acks.is_empty() {
            let ctx = self.ctx.clone();
            self.closing.spawn_on(
                async move { watermarks::write(&ctx, acks).await },
                &self.runtime,
            );
        }
    }

    fn frame(&self, session: &SessionInfo, request_id: u64, body: client_frame::Body) {
        match body {
            client_frame::Body::Send(send) => self.accept_send(session, request_id, send),
            client_frame::Body::PresenceQuery(query) => {
                self.presence_query(session, request_id, query)
            }
            client_frame::Body::Typing(typing) => {
                if self.typing_allowed(session.conn) {
                    self.spawn_request(session, request_id, client_frame::Body::Typing(typing));
                } else {
                    self.refuse(
                        session,
                        request_id,
                        ErrorCode::RateLimited,
                        "too many typing events",
                        "",
                    );
                }
            }
            client_frame::Body::DeliveryAck(ack) => self.delivery_ack(session, request_id, ack),
            body @ (client_frame::Body::ReadMarker(_)
            | client_frame::Body::Sync(_)
            | client_frame::Body::Fetch(_)) => self.spawn_request(session, request_id, body),
            client_frame::Body::Hello(_)
            | client_frame::Body::Authenticate(_)
            | client_frame::Body::Ping(_) => self.refuse(
                session,
                request_id,
                ErrorCode::UnexpectedMessage,
                "handled by the gateway, not the router",
                "",
            ),
        }
    }
}

/// The checks of a conversation id that need no store: it parses, and a
/// 1:1 conversation names the session's user. Group membership is the
/// store's to check.
fn addressable(
    conversation_id: &str,
    session: &SessionInfo,
) -> Result<ConversationId, (ErrorCode, &'static str)> {
    let Ok(conversation) = conversation_id.parse::<ConversationId>() else {
        return Err((
            ErrorCode::InvalidArgument,
            "conversation_id must be dm:{a}:{b} or g:{id}",
        ));
    };
    if matches!(conversation, ConversationId::Direct { .. })
        && !conversation.is_direct_party(session.user)
    {
        return Err((ErrorCode::Forbidden, "not a member of this conversation"));
    }
    Ok(conversation)
}

/// Failed registrations and unregistrations: while the directory is down
/// every connection that comes or goes fails, so one line per 10 s says so
/// (with how many were held back); each failure is counted in the metrics.
static DIRECTORY_WRITE_ERRORS: crate::directory::ThrottledWarning =
    crate::directory::ThrottledWarning::new(Duration::from_secs(10));

/// Renews `gateway`'s directory lease every `every` until aborted at
/// shutdown. A failed renewal is retried after a short backoff (250 ms,
/// doubling up to 2 s) rather than at the next tick: the renewal is what
/// writes this gateway's connections back into a directory that lost them
/// (Redis restarted empty), and until then no other node can reach its
/// users.
async fn renew_lease(directory: Arc<dyn Directory>, gateway: Arc<str>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let longest_wait = RENEW_RETRY_MAX.min(every);
    loop {
        ticks.tick().await;
        let mut wait = RENEW_RETRY_FIRST.min(longest_wait);
        loop {
            match directory.renew_lease(&gateway).await {
                Ok(true) => break,
                Ok(false) => {
                    tracing::error!(
                        %gateway,
                        "the directory lease had lapsed: other gateways saw this gateway's users offline until now"
                    );
                    break;
                }
                Err(error) => {
                    crate::telemetry::failed(ErrorCode::DirectoryUnavailable, 1);
                    if let Some(held_back) = LEASE_RENEWAL_ERRORS.due() {
                        tracing::warn!(%error, %gateway, held_back, "directory lease not renewed; retrying");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(longest_wait);
                }
            }
        }
    }
}

/// The first and the longest wait before a failed lease renewal is retried.
const RENEW_RETRY_FIRST: Duration = Duration::from_millis(250);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(2);

/// Renewals retried through an outage fail every second or two: one line
/// per 10 s says so.
static LEASE_RENEWAL_ERRORS: crate::directory::ThrottledWarning =
    crate::directory::ThrottledWarning::new(Duration::from_secs(10));

/// The push provider the config asks for, if any.
fn push_provider(config: &RouterConfig) -> Option<Arc<dyn PushProvider>> {
    if !config.push_notification_enabled {
        return None;
    }
    let Some(url) = config.push_webhook_url.clone() else {
        tracing::warn!("push_notification_enabled without push_webhook_url: push stays off");
        return None;
    };
    match WebhookPush::new(url, config.push_timeout) {
        Ok(webhook) => Some(Arc::new(webhook)),
        Err(error) => {
            tracing::error!(%error, "push webhook client could not be built: push stays off");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::bus::Polled;
    use crate::records::{DeadLetterRecord, letter};

    /// The queue-depth gauge shows what is queued, and zero again once the
    /// consumer took it, with no batch polled after that.
    #[tokio::test(start_paused = true)]
    async fn the_queue_depth_gauge_follows_the_lag_while_consumers_idle() {
        let bus = Arc::new(InProcessBus::new(8));
        let topic = Topic::<DeadLetterRecord>::new("im-dlq", 1);
        Bus::declare(&*bus, &topic).unwrap();
        let mut member = Bus::join(&*bus, &topic, "dlq", "m0", CancellationToken::new()).unwrap();
        assert_eq!(member.poll(10).await, Polled::Assigned(vec![0]));
        for attempts in 0..3 {
            bus.try_publish(&topic, 7, letter(attempts)).unwrap();
        }
        let depth = Arc::new(AtomicU64::new(f64::NAN.to_bits()));
        let sampled = || f64::from_bits(depth.load(Ordering::SeqCst));
        let sampler = tokio::spawn(sample_queue_depth(
            bus.clone() as Arc<dyn Bus<DeadLetterRecord>>,
            topic.clone(),
            "dlq".to_string(),
            metrics::Gauge::from_arc(depth.clone()),
        ));
        // The first sample is taken at once.
        tokio::time::sleep(QUEUE_DEPTH_PERIOD / 10).await;
        assert_eq!(sampled(), 3.0);
        let Polled::Records(taken) = member.poll(10).await else {
            panic!("the three letters are queued");
        };
        assert_eq!(taken.len(), 3);
        tokio::time::sleep(QUEUE_DEPTH_PERIOD).await;
        assert_eq!(sampled(), 0.0);
        sampler.abort();
    }
}
