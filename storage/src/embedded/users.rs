//! [`UserStore`] on fjall: users (by id, and by name through `usernames`)
//! and their devices with token generations. Writes are read-modify-writes
//! under the admin mutex, synced before returning.

use async_trait::async_trait;

use super::keys;
use super::{EmbeddedStore, Inner, check_id, db, from_json, to_json};
use crate::checks::check_username;
use crate::{DeviceRecord, StoreError, StoreResult, UserId, UserRecord, UserStore};

impl Inner {
    fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        check_username(username)?;
        let mut counters = self.admin();
        if db(self.tables.usernames.contains_key(username))? {
            return Err(StoreError::Conflict(format!(
                "username {username:?} is taken"
            )));
        }
        let user = UserRecord {
            id: counters.next_user,
            username: username.to_string(),
            password_hash: password_hash.to_string(),
            created_ms: now_ms,
        };
        let mut batch = self.db.batch();
        batch.insert(&self.tables.users, user.id.to_be_bytes(), to_json(&user));
        batch.insert(&self.tables.usernames, username, user.id.to_be_bytes());
        self.commit(batch)?;
        counters.next_user += 1;
        Ok(user)
    }

    fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        db(self.tables.devices.get(keys::device_key(user, device_id)))?
            .map(|value| from_json(&value, "device"))
            .transpose()
    }

    fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        check_id("device_id", device_id, false)?;
        let _admin = self.admin();
        self.require_users([user])?;
        let mut device = self.device(user, device_id)?.unwrap_or(DeviceRecord {
            user,
            device_id: device_id.to_string(),
            token_generation: 0,
            last_login_ms: now_ms,
        });
        device.last_login_ms = now_ms;
        self.put_device(&device)?;
        Ok(device)
    }

    fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        let _admin = self.admin();
        let mut device = self
            .device(user, device_id)?
            .ok_or_else(|| StoreError::NotFound(format!("device {device_id:?} of user {user}")))?;
        device.token_generation += 1;
        self.put_device(&device)?;
        Ok(device.token_generation)
    }

    /// Writes a device record (durably, like every account change).
    fn put_device(&self, device: &DeviceRecord) -> StoreResult<()> {
        let mut batch = self.db.batch();
        batch.insert(
            &self.tables.devices,
            keys::device_key(device.user, &device.device_id),
            to_json(device),
        );
        self.commit(batch)
    }
}

#[async_trait]
impl UserStore for EmbeddedStore {
    async fn create_user(
        &self,
        username: &str,
        password_hash: &str,
        now_ms: i64,
    ) -> StoreResult<UserRecord> {
        let (username, password_hash) = (username.to_string(), password_hash.to_string());
        self.blocking(move |inner| inner.create_user(&username, &password_hash, now_ms))
            .await
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<UserRecord>> {
        match db(self.inner.tables.usernames.get(username))? {
            Some(id) => self.inner.user(keys::value_u64(&id)?),
            None => Ok(None),
        }
    }

    async fn user_by_id(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        self.inner.user(id)
    }

    async fn touch_device(
        &self,
        user: UserId,
        device_id: &str,
        now_ms: i64,
    ) -> StoreResult<DeviceRecord> {
        let device_id = device_id.to_string();
        self.blocking(move |inner| inner.touch_device(user, &device_id, now_ms))
            .await
    }

    async fn device(&self, user: UserId, device_id: &str) -> StoreResult<Option<DeviceRecord>> {
        self.inner.device(user, device_id)
    }

    async fn bump_token_generation(&self, user: UserId, device_id: &str) -> StoreResult<u64> {
        let device_id = device_id.to_string();
        self.blocking(move |inner| inner.bump_token_generation(user, &device_id))
            .await
    }
}
