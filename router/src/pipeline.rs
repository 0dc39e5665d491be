//! What every stage shares: the stores, the transport, the directory, the
//! push provider and the settings, plus the few helpers all stages use to
//! publish (answers, frames for users, dead letters).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pingme_protocol::ErrorCode;
use pingme_storage::{Stores, UserId};
use tracing::Instrument;

use crate::config::RouterConfig;
use crate::directory::Directory;
use crate::port::Outbox;
use crate::push::PushProvider;
use crate::records::{
    ConnAddress, DeadLetterRecord, DownstreamEnvelope, DownstreamTarget, Origin, Record,
};
use crate::retry::RetryPolicy;
use crate::transport::{Topic, Transport, TransportError};
use crate::watermarks::DeliveredAcks;

/// The shared context of the stages.
pub(crate) struct Pipeline {
    pub stores: Stores,
    pub transport: Arc<dyn Transport>,
    pub directory: Arc<dyn Directory>,
    pub outbox: Arc<dyn Outbox>,
    pub push: Option<Arc<dyn PushProvider>>,
    pub config: RouterConfig,
    pub retry: RetryPolicy,
    /// Delivery acks waiting to be written (see [`crate::watermarks`]).
    pub delivered_acks: DeliveredAcks,
}

/// Wall clock in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Pipeline {
    /// Publishes `frame` for the connection of `origin` (on its gateway).
    pub async fn reply(&self, origin: &Origin, key: u64, frame: Bytes) {
        let envelope = DownstreamEnvelope {
            target: DownstreamTarget::Connection(origin.conn),
            frame,
            messages: 0,
        };
        let topic = Topic::Downstream(origin.gateway.clone());
        if let Err(error) = self
            .transport
            .publish(&topic, key, Record::Downstream(envelope))
            .await
        {
            tracing::warn!(%error, "answer to a connection dropped");
        }
    }

    /// Publishes `frame` for the connected devices of `users`, one envelope
    /// per gateway, leaving out `skip` (a gateway and connection). `frame`
    /// delivers `messages` messages (0: not a delivery). Returns the users
    /// connected nowhere when `need_offline`.
    pub async fn to_users(
        &self,
        users: &[UserId],
        frame: &Bytes,
        skip: Option<&(String, ConnAddress)>,
        key: u64,
        messages: u32,
        need_offline: bool,
    ) -> Result<Vec<UserId>, String> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let located = self.directory.locate(users, need_offline).await?;
        for (gateway, users) in located.online {
            let skip = skip
                .filter(|(skip_gateway, _)| *skip_gateway == gateway)
                .map(|(_, conn)| *conn);
            let envelope = DownstreamEnvelope {
                target: DownstreamTarget::Users { users, skip },
                frame: frame.clone(),
                messages,
            };
            self.transport
                .publish(
                    &Topic::Downstream(gateway),
                    key,
                    Record::Downstream(envelope),
                )
                .await
                .map_err(|e: TransportError| e.to_string())?;
        }
        Ok(located.offline)
    }

    /// Hands work that exhausted its retries to the dead-letter stage.
    pub async fn dead_letter(
        &self,
        kind: &str,
        key: u64,
        work: &Record,
        error: String,
        attempts: u32,
    ) {
        let span = tracing::debug_span!(
            "dead_letter",
            kind,
            msg_id = work.msg_id().unwrap_or_default(),
        );
        self.dead_letter_in_span(kind, key, work, error, attempts)
            .instrument(span)
            .await
    }

    async fn dead_letter_in_span(
        &self,
        kind: &str,
        key: u64,
        work: &Record,
        error: String,
        attempts: u32,
    ) {
        crate::telemetry::failed(ErrorCode::KafkaRetryExhaustedSentToDlq, 1);
        if !self.config.enable_dlq {
            tracing::error!(kind, %error, attempts, code = ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
                "retries exhausted; dead-letter queue disabled, work dropped");
            return;
        }
        tracing::warn!(kind, %error, attempts, code = ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
            "retries exhausted; sent to the dead-letter queue");
        let letter = DeadLetterRecord {
            kind: kind.to_string(),
            payload: work.encode(),
            code: ErrorCode::KafkaRetryExhaustedSentToDlq.code(),
            error,
            attempts,
        };
        if let Err(error) = self
            .transport
            .publish(&Topic::DeadLetter, key, Record::DeadLetter(letter))
            .await
        {
            crate::telemetry::failed(ErrorCode::KafkaDlqSendFailed, 1);
            tracing::error!(%error, code = ErrorCode::KafkaDlqSendFailed.code(), "dead letter lost");
        }
    }
}
