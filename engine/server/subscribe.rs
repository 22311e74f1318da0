//! Subscribers: WebSocket `/subscribe`, JSON control messages in, batch frames out.
//!
//! A reader task turns the client's frames into requests; this connection's task owns the write
//! half and its [`Mailbox`]. When the hub signals the mailbox, the task takes everything in it and
//! writes it with one flush: `dropped` notices first, then control messages and batches in order,
//! then the conflated `latest` values. A batch frame is `{"type":"batch","topic":T,"seq":S,
//! "items":…}`, where the items array was encoded once by the hub and `seq` counts this
//! subscriber's batches of that topic from 0, without gaps.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fastwebsockets::{upgrade::UpgradeFut, OpCode, WebSocketError};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::json::{write_int, write_str};
use crate::{Key, Topic};

use super::hub::{error_message, HubControl, Mode, Subscribe};
use super::mailbox::{Mailbox, Outgoing};
use super::metrics::Metrics;
use super::ws::{self, Outbound, WsWrite};
use super::State;

/// Largest control message a subscriber may send.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Subscribe {
        topic: String,
        keys: Option<Vec<serde_json::Value>>,
        #[serde(default)]
        mode: ModeName,
        #[serde(default)]
        snapshot: bool,
    },
    Unsubscribe {
        topic: String,
    },
    Topics {},
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    #[default]
    All,
    Latest,
}

enum Inbound {
    Request(Vec<u8>),
    Send(Outbound),
}

/// Serves one subscriber's WebSocket.
pub async fn websocket(state: Arc<State>, upgrade: UpgradeFut) {
    let Ok(ws) = upgrade.await else { return };
    let _conn = state.metrics.connection("subscribe");
    let id = state.next_subscriber.fetch_add(1, Ordering::Relaxed);
    let mailbox = Arc::new(Mailbox::new(
        state.config.subscriber_queue_bytes,
        state.config.slow_consumer_timeout,
    ));
    let (mut read, mut write) = ws::split(ws, MAX_REQUEST_BYTES);
    let (tx, mut rx) = mpsc::channel::<Inbound>(64);
    let liveness = ws::Liveness::default();
    liveness.heard();
    let reader_liveness = liveness.clone();
    let reader = tokio::spawn(async move {
        loop {
            let obliged = tx.clone();
            let mut send_fn = move |frame| {
                let obliged = obliged.clone();
                let msg = Inbound::Send(ws::obligated(frame));
                async move {
                    obliged
                        .send(msg)
                        .await
                        .map_err(|_| WebSocketError::ConnectionClosed)
                }
            };
            let frame = match read.read_frame(&mut send_fn).await {
                Ok(frame) => frame,
                Err(e) => {
                    if let Some((code, reason)) = ws::close_for(&e) {
                        let _ = tx.send(Inbound::Send(Outbound::Close(code, reason))).await;
                    }
                    break;
                }
            };
            reader_liveness.heard();
            let request = match frame.opcode {
                OpCode::Text | OpCode::Binary => Inbound::Request(frame.payload.to_vec()),
                OpCode::Close => break,
                _ => continue,
            };
            if tx.send(request).await.is_err() {
                break;
            }
        }
    });

    let mut seqs: HashMap<Topic, u64> = HashMap::new();
    let mut closing = state.closing.subscribe();
    let mut ticker = tokio::time::interval(state.config.ping_interval);
    ticker.tick().await;
    // A client that reads nothing at all blocks our writes; past this it is dropped without a
    // close frame (there is no room left to send one).
    let stuck_after = state.config.slow_consumer_timeout + state.config.ping_interval * 2;
    loop {
        let ended = tokio::select! {
            msg = rx.recv() => match msg {
                Some(Inbound::Request(text)) => {
                    request(&state, id, &mailbox, &text).await;
                    Ok(false)
                }
                Some(Inbound::Send(out)) => match ws::write(&mut write, out).await {
                    Ok(done) => write.flush().await.map(|_| done),
                    Err(e) => Err(e),
                },
                None => Ok(true),
            },
            _ = mailbox.notify.notified() => {
                let delivered = tokio::time::timeout(
                    stuck_after,
                    deliver(&mailbox, &mut write, &mut seqs, &state.metrics),
                );
                match delivered.await.unwrap_or(Err(WebSocketError::ConnectionClosed)) {
                    Ok(Some(code)) => {
                        let _ = ws::write(&mut write, Outbound::Close(code, "slow consumer")).await;
                        let _ = write.flush().await;
                        Ok(true)
                    }
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            _ = ticker.tick() => {
                if liveness.silent_for() > state.config.ping_interval * 2 {
                    let _ = ws::write(&mut write, Outbound::Close(ws::close::GOING_AWAY, "no pong")).await;
                    let _ = write.flush().await;
                    Ok(true)
                } else {
                    match ws::ping(&mut write).await {
                        Ok(()) => write.flush().await.map(|_| false),
                        Err(e) => Err(e),
                    }
                }
            }
            _ = closing.changed() => {
                // The hub has handed over everything produced before shutdown.
                let _ = deliver(&mailbox, &mut write, &mut seqs, &state.metrics).await;
                let _ = ws::write(&mut write, Outbound::Close(ws::close::GOING_AWAY, "server shutting down")).await;
                let _ = write.flush().await;
                Ok(true)
            }
        };
        if !matches!(ended, Ok(false)) {
            break;
        }
    }
    reader.abort();
    state
        .hub
        .send(HubControl::Disconnect { subscriber: id })
        .await;
}

/// Handles one client request; answers go through the mailbox, in order with everything else.
async fn request(state: &State, id: u64, mailbox: &Arc<Mailbox>, text: &[u8]) {
    let request: Request = match serde_json::from_slice(text) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "bad request: {e}; expected {{\"op\":\"subscribe\"|\"unsubscribe\"|\"topics\", …}}"
            );
            mailbox.push_control(error_message(&msg).into());
            return;
        }
    };
    let control = match request {
        Request::Subscribe {
            topic,
            keys,
            mode,
            snapshot,
        } => {
            let keys =
                match keys.map(|k| k.iter().map(key_of).collect::<Result<Vec<Key>, String>>()) {
                    Some(Err(e)) => {
                        mailbox.push_control(error_message(&e).into());
                        return;
                    }
                    Some(Ok(keys)) => Some(keys),
                    None => None,
                };
            HubControl::Subscribe(Subscribe {
                subscriber: id,
                mailbox: Arc::clone(mailbox),
                topic,
                keys,
                mode: match mode {
                    ModeName::All => Mode::All,
                    ModeName::Latest => Mode::Latest,
                },
                snapshot,
            })
        }
        Request::Unsubscribe { topic } => HubControl::Unsubscribe {
            subscriber: id,
            topic,
            mailbox: Arc::clone(mailbox),
        },
        Request::Topics {} => HubControl::Topics {
            subscriber: id,
            mailbox: Arc::clone(mailbox),
        },
    };
    state.hub.send(control).await;
}

fn key_of(value: &serde_json::Value) -> Result<Key, String> {
    match value {
        serde_json::Value::String(s) => Ok(Key::Str(s.as_str().into())),
        serde_json::Value::Bool(b) => Ok(Key::Bool(*b)),
        serde_json::Value::Number(n) if n.is_i64() => Ok(Key::Int(n.as_i64().unwrap_or(0))),
        serde_json::Value::Null => Ok(Key::None),
        other => Err(format!(
            "keys must be strings, integers or booleans, found {other}"
        )),
    }
}

/// Writes everything in the mailbox with one flush. Returns the close code when the subscriber
/// must be closed.
async fn deliver(
    mailbox: &Mailbox,
    write: &mut WsWrite,
    seqs: &mut HashMap<Topic, u64>,
    metrics: &Metrics,
) -> Result<Option<u16>, WebSocketError> {
    let inbox = mailbox.take();
    for (topic, items) in &inbox.dropped {
        let mut msg = b"{\"type\":\"dropped\",\"topic\":".to_vec();
        write_str(&mut msg, topic);
        msg.extend_from_slice(b",\"items\":");
        write_int(&mut msg, *items as i64);
        msg.push(b'}');
        ws::write(write, Outbound::Text(msg.into())).await?;
    }
    let mut stamps = Vec::new();
    for out in inbox.queue {
        match out {
            Outgoing::Control(msg) => {
                ws::write(write, Outbound::Text(msg)).await?;
            }
            Outgoing::Batch {
                topic,
                items,
                count,
                ingest,
                published,
            } => {
                ws::write(write, Outbound::Text(batch_frame(seqs, &topic, &items))).await?;
                stamps.push((published, ingest, count));
            }
        }
    }
    if let Some((published, ingest)) = inbox.latest_since {
        let count = inbox.latest.values().map(|p| p.len() as u64).sum();
        stamps.push((published, ingest, count));
    }
    for (topic, pending) in &inbox.latest {
        let mut items =
            Vec::with_capacity(pending.values().map(|v| v.len() + 1).sum::<usize>() + 2);
        items.push(b'[');
        for (i, element) in pending.values().enumerate() {
            if i > 0 {
                items.push(b',');
            }
            items.extend_from_slice(element);
        }
        items.push(b']');
        ws::write(write, Outbound::Text(batch_frame(seqs, topic, &items))).await?;
    }
    write.flush().await?;
    let now = Instant::now();
    let us = |t: Instant| now.duration_since(t).as_micros() as u64;
    let samples: Vec<(u64, Option<u64>, u64)> = stamps
        .into_iter()
        .map(|(published, ingest, count)| (us(published), ingest.map(us), count))
        .collect();
    metrics.record_socket(&samples);
    Ok(inbox.close)
}

fn batch_frame(seqs: &mut HashMap<Topic, u64>, topic: &Topic, items: &[u8]) -> Bytes {
    let seq = seqs.entry(Arc::clone(topic)).or_insert(0);
    let mut frame = Vec::with_capacity(items.len() + topic.len() + 48);
    frame.extend_from_slice(b"{\"type\":\"batch\",\"topic\":");
    write_str(&mut frame, topic);
    frame.extend_from_slice(b",\"seq\":");
    write_int(&mut frame, *seq as i64);
    frame.extend_from_slice(b",\"items\":");
    frame.extend_from_slice(items);
    frame.push(b'}');
    *seq += 1;
    frame.into()
}
