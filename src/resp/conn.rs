//! One RESP connection: reads into a buffer, frames every complete command in it, runs them in
//! order and answers the whole batch with one write (so a pipeline of N commands costs one
//! read and one write, not N); between batches, delivers the client-tracking invalidations
//! queued for it. Closes on QUIT, on a protocol error (after answering it), on the idle timeout,
//! and at shutdown once the batch in hand is answered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::frame::{self, Limits};
use super::reply::Reply;
use super::session::Session;
use super::tracking::{Note, Sink};
use super::{ClientInfo, Front};

/// How long a refused connection gets to read its error before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Answers a connection over `max_clients` and closes it.
pub async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(b"-ERR max number of clients reached\r\n").await?;
        stream.shutdown().await
    })
    .await;
}

/// Serves one connection until it closes (see the module docs).
pub async fn serve_connection(
    front: Arc<Front>,
    mut stream: TcpStream,
    info: Arc<ClientInfo>,
    stop: CancellationToken,
) {
    let (sink, mut notes) = Sink::new();
    front.tracking.connect(info.id, sink.clone());
    let limits = Limits {
        max_inline: front.config.max_inline_bytes,
        max_bulk: front.config.max_bulk_bytes,
        max_multibulk: front.config.max_multibulk_len,
        max_query: front.config.max_query_bytes,
    };
    let mut s = Session {
        id: info.id,
        info,
        proto: 2,
        authed: front.config.password.is_none(),
        tracking: None,
        caching: None,
        subscribed: false,
        closing: false,
        counts: Vec::new(),
    };
    let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(READ_CHUNK);
    let idle = front.config.idle_timeout;
    loop {
        if inbuf.capacity() - inbuf.len() < READ_CHUNK / 4 {
            inbuf.reserve(READ_CHUNK);
        }
        let idle_sleep = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            note = notes.recv() => {
                let Some(note) = note else { break };
                push_note(&s, note, &mut out);
                while let Ok(more) = notes.try_recv() {
                    push_note(&s, more, &mut out);
                }
            }
            read = stream.read_buf(&mut inbuf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                front.metrics.bytes_in.inc_by(n as u64);
                let mut fatal = false;
                loop {
                    match frame::next_command(&mut inbuf, &limits) {
                        Ok(Some(args)) if args.is_empty() => continue,
                        Ok(Some(args)) => {
                            let reply = super::admin::execute(&front, &mut s, args).await;
                            reply.encode(&mut out, s.proto);
                            if s.closing {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            s.tally(None, false);
                            Reply::err(format!("ERR {e}")).encode(&mut out, s.proto);
                            fatal = true;
                            break;
                        }
                    }
                }
                if fatal {
                    s.closing = true;
                }
            }
            _ = idle_sleep => break,
        }
        s.flush_counts(&front);
        if sink.overflowed.swap(false, Ordering::AcqRel) {
            push_note(&s, Note::Flush, &mut out);
        }
        if !out.is_empty() {
            front.metrics.bytes_out.inc_by(out.len() as u64);
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if s.closing {
            let _ = stream.shutdown().await;
            break;
        }
    }
}

/// Encodes an invalidation for this connection: a RESP3 `invalidate` push, or in RESP2 a
/// message on `__redis__:invalidate` when subscribed to it (else RESP2 cannot carry it, and it
/// is dropped, as Redis does).
fn push_note(s: &Session, note: Note, out: &mut BytesMut) {
    let keys = match note {
        Note::Keys(k) => Reply::Array(k.into_iter().map(Reply::Bulk).collect()),
        Note::Flush => Reply::NilArray,
    };
    if s.proto >= 3 {
        Reply::Push(vec![Reply::Bulk(Bytes::from_static(b"invalidate")), keys]).encode(out, 3);
    } else if s.subscribed {
        Reply::Push(vec![
            Reply::Bulk(Bytes::from_static(b"message")),
            Reply::Bulk(Bytes::from_static(super::admin::INVALIDATE_CHANNEL.as_bytes())),
            keys,
        ])
        .encode(out, 2);
    }
}
