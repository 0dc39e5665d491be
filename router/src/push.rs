//! Offline push: the push workers take push events off the push topic and
//! hand them to a [`PushProvider`], retrying with backoff; an event that
//! exhausts its tries becomes a dead letter. The provider shipped here is
//! an HTTP webhook (one JSON POST per event; any 2xx is success).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use crate::pipeline::Pipeline;
use crate::records::{PushEvent, Record};
use crate::telemetry;
use crate::transport::{Subscription, Topic};

/// Where offline-push events go (APNs/FCM bridges, a webhook, ...).
#[async_trait]
pub trait PushProvider: Send + Sync + 'static {
    /// Sends one event; an error is retried, then dead-lettered.
    async fn notify(&self, event: &PushEvent) -> Result<(), String>;
}

/// Posts each event as JSON to a URL.
#[derive(Debug, Clone)]
pub struct WebhookPush {
    client: reqwest::Client,
    url: String,
}

impl WebhookPush {
    /// A webhook provider posting to `url`, each call bounded by `timeout`.
    pub fn new(url: String, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { client, url })
    }
}

#[async_trait]
impl PushProvider for WebhookPush {
    async fn notify(&self, event: &PushEvent) -> Result<(), String> {
        let response = self
            .client
            .post(&self.url)
            .json(event)
            .send()
            .await
            .map_err(|e| format!("webhook unreachable: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", response.status()))
        }
    }
}

/// One push worker: sends the events of its partition until closed. The
/// events of one batch are sent concurrently (order does not matter for
/// notifications), so one slow call does not serialise the rest.
pub(crate) async fn run(ctx: Arc<Pipeline>, mut subscription: Box<dyn Subscription>) {
    loop {
        let records = subscription.next_batch(64).await;
        if records.is_empty() {
            break;
        }
        metrics::gauge!(telemetry::QUEUE_DEPTH, "topic" => "push")
            .set(ctx.transport.depth(&Topic::Push) as f64);
        let mut calls = tokio::task::JoinSet::new();
        for record in records {
            let Record::Push(event) = record else {
                tracing::warn!("unexpected record on the push topic");
                continue;
            };
            let span = tracing::debug_span!(
                "push",
                msg_id = %event.preview.msg_id,
                conversation = %event.conversation_id,
                seq = event.seq,
                recipients = event.recipients.len(),
            );
            calls.spawn(notify(ctx.clone(), event).instrument(span));
        }
        calls.join_all().await;
        if let Err(error) = subscription.commit().await {
            tracing::warn!(%error, "commit of the push topic failed");
        }
    }
}

/// Sends one event with retries; dead-letters it when they run out.
async fn notify(ctx: Arc<Pipeline>, event: PushEvent) {
    let Some(provider) = ctx.push.clone() else {
        return;
    };
    match ctx.retry.run("push", || provider.notify(&event)).await {
        Ok(()) => metrics::counter!(telemetry::PUSHED).increment(event.recipients.len() as u64),
        Err((error, attempts)) => {
            let key = crate::transport::text_key(&event.conversation_id);
            ctx.dead_letter("push", key, &Record::Push(event), error, attempts)
                .await;
        }
    }
}
