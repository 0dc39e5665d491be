//! [`Pingme`], the entry object: it owns the tokio runtime, calls the HTTP
//! API (register, login, groups) through the client's `HttpApi`, and turns
//! a [`ConnectConfig`] into the client's `Endpoint` and `ClientConfig` to
//! connect a [`PingmeClient`].

use std::sync::Arc;
use std::time::Duration;

use pingme_client::{Client, ClientConfig, ClientError, Endpoint, HttpApi};

use crate::client::PingmeClient;
use crate::error::PingmeError;
use crate::runtime::Runtime;
use crate::types::{ConnectConfig, Group, Login, Trust};

/// One per app: the runtime the clients run on, and the HTTP API of one
/// pingme deployment.
#[derive(uniffi::Object)]
pub struct Pingme {
    // Declared first so it is dropped before the runtime it needs.
    api: HttpApi,
    runtime: Arc<Runtime>,
}

#[uniffi::export]
impl Pingme {
    /// Starts the runtime, for the HTTP API at `api_url`, e.g.
    /// `https://chat.example.com` (certificate checked against Mozilla's
    /// roots) or `http://127.0.0.1:8080` in development.
    #[uniffi::constructor]
    pub fn new(api_url: String) -> Result<Arc<Pingme>, PingmeError> {
        let runtime = Runtime::new()?;
        let api = runtime.enter(|| HttpApi::new(api_url));
        Ok(Arc::new(Pingme {
            api,
            runtime: Arc::new(runtime),
        }))
    }

    /// Like `new`, with the `https://` certificate of `api_url` checked by
    /// `trust` (the app's own CA, or the development certificate), the
    /// policy its TLS and QUIC connections use.
    #[uniffi::constructor]
    pub fn with_trust(api_url: String, trust: Trust) -> Result<Arc<Pingme>, PingmeError> {
        let runtime = Runtime::new()?;
        let api = runtime.enter(|| HttpApi::with_trust(api_url, &client_trust(trust)))?;
        Ok(Arc::new(Pingme {
            api,
            runtime: Arc::new(runtime),
        }))
    }

    /// The HTTP API's base URL.
    pub fn api_url(&self) -> String {
        self.api.base_url().to_string()
    }

    /// Creates a user; returns its id. A taken name fails with
    /// `PingmeError.Api` code 10008 (`USERNAME_TAKEN`).
    pub async fn register(&self, username: String, password: String) -> Result<u64, PingmeError> {
        let api = self.api.clone();
        self.runtime
            .run(async move { api.register(&username, &password).await })
            .await
    }

    /// Logs `device_id` of a user in; the token goes into
    /// `ConnectConfig.token`.
    pub async fn login(
        &self,
        username: String,
        password: String,
        device_id: String,
    ) -> Result<Login, PingmeError> {
        let api = self.api.clone();
        self.runtime
            .run(async move { api.login(&username, &password, &device_id).await })
            .await
            .map(Login::from)
    }

    /// Creates a group owned by the user of `token`, with `members` (at
    /// most 10,000; more with `Pingme.add_members`).
    pub async fn create_group(
        &self,
        token: String,
        name: String,
        members: Vec<u64>,
    ) -> Result<Group, PingmeError> {
        let api = self.api.clone();
        self.runtime
            .run(async move { api.create_group(&token, &name, &members).await })
            .await
            .map(Group::from)
    }

    /// Adds up to 10,000 users to a group; returns its member count after.
    pub async fn add_members(
        &self,
        token: String,
        group_id: u64,
        user_ids: Vec<u64>,
    ) -> Result<u64, PingmeError> {
        let api = self.api.clone();
        self.runtime
            .run(async move { api.add_members(&token, group_id, &user_ids).await })
            .await
    }

    /// Connects, says hello and authenticates. A failure of this first
    /// connection is returned; once connected, the client reconnects by
    /// itself (events `Reconnecting`, `Connected`, `Synced`).
    pub async fn connect(&self, config: ConnectConfig) -> Result<Arc<PingmeClient>, PingmeError> {
        let (endpoint, config) = self
            .runtime
            // Resolving the gateway's name blocks.
            .run_blocking(move || endpoint(&config).map(|endpoint| (endpoint, config)))
            .await?;
        let (client, events) = self
            .runtime
            .run(Client::connect(client_config(endpoint, config)))
            .await?;
        Ok(Arc::new(PingmeClient::new(
            client,
            events,
            self.runtime.clone(),
        )))
    }
}

/// The client's endpoint for `config`: `Endpoint::parse` for the address
/// and transport, then the trust policy and certificate name of the
/// config, not the development defaults `parse` picks for command lines.
fn endpoint(config: &ConnectConfig) -> Result<Endpoint, PingmeError> {
    let gateway = config.gateway.as_str();
    let invalid = |detail: String| PingmeError::InvalidArgument { detail };
    let mut endpoint = Endpoint::parse(gateway).map_err(|e| match e {
        // Unknown scheme, or a name that resolves to nothing.
        ClientError::Protocol(detail) => invalid(format!("gateway {gateway:?}: {detail}")),
        other => other.into(),
    })?;
    if let Endpoint::Tls {
        server_name, trust, ..
    }
    | Endpoint::Quic {
        server_name, trust, ..
    } = &mut endpoint
    {
        let chosen = config.trust.clone().ok_or_else(|| {
            invalid(format!(
                "gateway {gateway:?} needs a trust policy: a CA, or Trust.DevCertificate \
                 for a development server"
            ))
        })?;
        *trust = client_trust(chosen);
        *server_name = match &config.server_name {
            Some(name) => name.clone(),
            None => host_of(gateway).to_string(),
        };
    }
    Ok(endpoint)
}

/// The client's trust policy for the binding's.
fn client_trust(trust: Trust) -> pingme_client::Trust {
    match trust {
        Trust::DevCertificate => pingme_client::Trust::AcceptAnyDevCert,
        Trust::CaFile { path } => pingme_client::Trust::CaFile(path.into()),
        Trust::CaPem { pem } => pingme_client::Trust::CaPem(pem.into_bytes()),
    }
}

/// The host part of `scheme://host:port/path` (brackets of an IPv6
/// literal removed).
fn host_of(gateway: &str) -> &str {
    let rest = gateway.split_once("://").map_or(gateway, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _port)| host)
}

fn client_config(endpoint: Endpoint, config: ConnectConfig) -> ClientConfig {
    let mut client = ClientConfig::new(endpoint, config.token);
    client.watermarks = config
        .watermarks
        .into_iter()
        .map(|w| (w.conversation_id, w.seq))
        .collect();
    if let Some(ms) = config.request_timeout_ms {
        client.request_timeout = Duration::from_millis(ms);
    }
    if let Some(name) = config.client_name {
        client.client_name = name;
    }
    if let Some(ms) = config.ack_delay_ms {
        client.ack_delay = Duration::from_millis(ms);
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Watermark;

    fn config(gateway: &str, trust: Option<Trust>) -> ConnectConfig {
        ConnectConfig {
            gateway: gateway.into(),
            token: "t".into(),
            trust,
            server_name: None,
            watermarks: Vec::new(),
            request_timeout_ms: None,
            client_name: None,
            ack_delay_ms: None,
        }
    }

    #[test]
    fn tls_and_quic_need_a_trust_policy_and_check_the_gateway_host() {
        let error = endpoint(&config("tls://127.0.0.1:7443", None)).unwrap_err();
        assert!(
            matches!(error, PingmeError::InvalidArgument { .. }),
            "{error:?}"
        );

        let pem = Trust::CaPem { pem: "PEM".into() };
        match endpoint(&config("quic://127.0.0.1:7443", Some(pem))).unwrap() {
            Endpoint::Quic {
                addr,
                server_name,
                trust: pingme_client::Trust::CaPem(pem),
            } => {
                assert_eq!(addr.to_string(), "127.0.0.1:7443");
                assert_eq!(server_name, "127.0.0.1");
                assert_eq!(pem, b"PEM");
            }
            other => panic!("expected QUIC with the CA, got {other:?}"),
        }

        let mut named = config("tls://localhost:7443", Some(Trust::DevCertificate));
        named.server_name = Some("chat.example".into());
        assert!(matches!(
            endpoint(&named).unwrap(),
            Endpoint::Tls { server_name, trust: pingme_client::Trust::AcceptAnyDevCert, .. }
                if server_name == "chat.example"
        ));
    }

    #[test]
    fn plain_transports_ignore_trust_and_bad_gateways_are_invalid_arguments() {
        assert!(matches!(
            endpoint(&config("tcp://127.0.0.1:7000", Some(Trust::DevCertificate))).unwrap(),
            Endpoint::Tcp(_)
        ));
        assert!(matches!(
            endpoint(&config("ws://127.0.0.1:8080/v1/ws", None)).unwrap(),
            Endpoint::WebSocket { url, .. } if url == "ws://127.0.0.1:8080/v1/ws"
        ));
        let error = endpoint(&config("smtp://127.0.0.1:25", None)).unwrap_err();
        assert!(
            matches!(error, PingmeError::InvalidArgument { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn hosts_come_out_of_gateway_urls() {
        assert_eq!(host_of("quic://chat.example:7443"), "chat.example");
        assert_eq!(host_of("tls://[::1]:7443"), "::1");
        assert_eq!(host_of("ws://h:1/v1/ws"), "h");
    }

    #[test]
    fn the_config_carries_watermarks_and_timeouts_into_the_client() {
        let mut bindings = config("tcp://127.0.0.1:7000", None);
        bindings.watermarks = vec![Watermark {
            conversation_id: "g:1".into(),
            seq: 9,
        }];
        bindings.request_timeout_ms = Some(1500);
        bindings.client_name = Some("app/1".into());
        bindings.ack_delay_ms = Some(0);
        let endpoint = endpoint(&bindings).unwrap();
        let client = client_config(endpoint, bindings);
        assert_eq!(client.watermarks, vec![("g:1".to_string(), 9)]);
        assert_eq!(client.request_timeout, Duration::from_millis(1500));
        assert_eq!(client.client_name, "app/1");
        assert_eq!(client.ack_delay, Duration::ZERO);
        assert_eq!(client.token, "t");

        let defaults = client_config(
            Endpoint::Tcp("127.0.0.1:7000".parse().unwrap()),
            config("tcp://127.0.0.1:7000", None),
        );
        assert_eq!(defaults.ack_delay, Duration::from_millis(100));
    }
}
