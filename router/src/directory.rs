//! Where users are connected: which gateway holds a connection of which
//! user. The delivery stages ask the [`Directory`] to split a member list
//! per gateway (one downstream envelope per gateway) and to name the
//! offline members (push). Single node: [`LocalDirectory`] over this
//! gateway's [`Outbox`]; cluster: a Redis directory with leases.

use std::sync::Arc;

use async_trait::async_trait;
use pingme_storage::UserId;

use crate::port::Outbox;

/// Users split by where they are connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// Per gateway id, the users with a connection there.
    pub online: Vec<(String, Vec<UserId>)>,
    /// Users connected nowhere (filled only when asked for).
    pub offline: Vec<UserId>,
}

/// The presence directory the delivery stages consult.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Splits `users` per gateway. When `need_offline` is false the
    /// directory may skip the precise lookup and list users under a gateway
    /// that will find them not connected (cheaper for the common case of a
    /// single gateway without push).
    async fn locate(&self, users: &[UserId], need_offline: bool) -> Result<Located, String>;
}

/// The single-node directory: every connection is on this gateway.
pub struct LocalDirectory {
    gateway: String,
    outbox: Arc<dyn Outbox>,
}

impl LocalDirectory {
    /// The directory of the gateway `gateway` whose connections `outbox` holds.
    pub fn new(gateway: String, outbox: Arc<dyn Outbox>) -> Self {
        Self { gateway, outbox }
    }
}

#[async_trait]
impl Directory for LocalDirectory {
    async fn locate(&self, users: &[UserId], need_offline: bool) -> Result<Located, String> {
        if !need_offline {
            return Ok(Located {
                online: vec![(self.gateway.clone(), users.to_vec())],
                offline: Vec::new(),
            });
        }
        let flags = self.outbox.online(users);
        let (mut online, mut offline) = (Vec::new(), Vec::new());
        for (user, is_online) in users.iter().zip(flags) {
            if is_online {
                online.push(*user);
            } else {
                offline.push(*user);
            }
        }
        Ok(Located {
            online: if online.is_empty() {
                Vec::new()
            } else {
                vec![(self.gateway.clone(), online)]
            },
            offline,
        })
    }
}
