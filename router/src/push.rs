//! Offline push: the push workers take push events off the push topic and
//! hand them to a [`PushProvider`], retrying with backoff; an event that
//! exhausts its tries becomes a dead letter. The provider shipped here is
//! an HTTP webhook (one JSON POST per event; any 2xx is success).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::Instrument;

use crate::bus::{GroupMember, Polled, text_key};
use crate::pipeline::Pipeline;
use crate::records::PushEvent;
use crate::telemetry;

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
pub(crate) async fn run(ctx: Arc<Pipeline>, mut member: Box<dyn GroupMember<PushEvent>>) {
    loop {
        let events = match member.poll(64).await {
            Polled::Records(events) => events,
            Polled::Assigned(_) | Polled::Revoked(_) => continue,
            Polled::Left => break,
        };
        metrics::gauge!(telemetry::QUEUE_DEPTH, "topic" => "push")
            .set(ctx.bus.lag(&ctx.topics.push, &ctx.config.topics.push_group) as f64);
        let mut calls = tokio::task::JoinSet::new();
        for event in events.into_iter().map(|consumed| consumed.record) {
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
        if let Err(error) = member.commit().await {
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
            let key = text_key(&event.conversation_id);
            ctx.dead_letter(key, &event, error, attempts).await;
        }
    }
}
