//! `chat`: a terminal chat on the pingme client SDK. Logs in (optionally
//! registering first), connects, prints incoming messages and sends what
//! you type to the current conversation. See `client/README.md`.

use std::io::Write;

use clap::Parser;
use pingme_client::v1::ContentType;
use pingme_client::{Client, ClientConfig, Endpoint, Event, HttpApi};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Terminal chat over pingme.
#[derive(Parser, Debug)]
struct Args {
    /// HTTP API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "PINGME_API")]
    api: String,
    /// Gateway: tcp://host:port, tls://host:port, quic://host:port (dev
    /// certificates accepted) or ws://host:port/v1/ws.
    #[arg(long, default_value = "tcp://127.0.0.1:7000", env = "PINGME_GATEWAY")]
    gateway: String,
    /// Username.
    #[arg(long)]
    user: String,
    /// Password.
    #[arg(long)]
    password: String,
    /// This installation's device id.
    #[arg(long, default_value = "chat-cli")]
    device: String,
    /// Register the user first (ignored if the name is taken).
    #[arg(long)]
    register: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let api = HttpApi::new(&args.api);
    if args.register {
        match api.register(&args.user, &args.password).await {
            Ok(user_id) => println!("registered {} as user {user_id}", args.user),
            Err(e) if e.code() == Some(pingme_client::ErrorCode::UsernameTaken) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let login = api.login(&args.user, &args.password, &args.device).await?;
    let me = login.user_id;
    let endpoint = Endpoint::parse(&args.gateway)?;
    let (client, mut events) = Client::connect(ClientConfig::new(endpoint, login.token)).await?;
    println!("connected as user {me}. /to <user_id>, /group <id>, /quit; other lines are sent.");

    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Message(m) => println!(
                    "[{} #{}] {}: {}",
                    m.conversation_id,
                    m.seq,
                    m.sender_id,
                    String::from_utf8_lossy(&m.body)
                ),
                Event::Typing(t) if t.active => {
                    println!("[{}] {} is typing", t.conversation_id, t.user_id)
                }
                Event::Presence(p) => println!(
                    "user {} is {}",
                    p.user_id,
                    if p.online { "online" } else { "offline" }
                ),
                Event::Reconnecting { delay, reason, .. } => {
                    println!("(disconnected: {reason}; retrying in {delay:?})")
                }
                Event::Connected {
                    reconnected: true, ..
                } => println!("(reconnected)"),
                Event::GoAway(g) => println!("(server: go away, {:?} {})", g.reason(), g.message),
                Event::Closed { reason } => {
                    println!("(closed: {reason})");
                    std::process::exit(1);
                }
                _ => {}
            }
        }
    });

    let mut conversation: Option<String> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    prompt(&conversation);
    while let Some(line) = lines.next_line().await? {
        let line = line.trim();
        if let Some(peer) = line.strip_prefix("/to ") {
            match peer.trim().parse::<u64>() {
                Ok(peer) => conversation = Some(format!("dm:{}:{}", me.min(peer), me.max(peer))),
                Err(_) => println!("usage: /to <user_id>"),
            }
        } else if let Some(group) = line.strip_prefix("/group ") {
            conversation = Some(format!("g:{}", group.trim()));
        } else if line == "/quit" {
            break;
        } else if !line.is_empty() {
            match &conversation {
                None => println!("pick a conversation first: /to <user_id> or /group <id>"),
                Some(id) => match client.send(id, ContentType::Text, line.to_string()).await {
                    Ok(ack) => println!("  (sent #{})", ack.seq),
                    Err(e) => println!("  (not sent: {e})"),
                },
            }
        }
        prompt(&conversation);
    }
    client.close();
    Ok(())
}

fn prompt(conversation: &Option<String>) {
    print!("{}> ", conversation.as_deref().unwrap_or(""));
    let _ = std::io::stdout().flush();
}
