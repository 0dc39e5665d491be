//! Where offline push goes: the [`PushProvider`] port the push workers
//! (in `stages`) hand push events to, and the provider shipped here, an
//! HTTP webhook (one JSON POST per event; any 2xx is success).

use std::time::Duration;

use async_trait::async_trait;

use crate::records::PushEvent;

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
