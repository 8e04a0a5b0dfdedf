//! The Cache service's response streams, counted per session and per
//! connection.
//!
//! Each stream holds a NAR reader (and, while a chunk is read, a file) with
//! a few chunks of buffers until its peer takes the bytes. A peer that opens
//! streams and never reads them would otherwise hold descriptors and memory
//! until the builder could not accept another client. A stream is counted
//! from the call's start until its response ends, fails or is dropped (the
//! peer reset it or went away), whichever comes first.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
};

use futures::Stream;

use super::error::{Budget, ServerError};
use crate::proto::MAX_CACHE_STREAMS_PER_SESSION;

/// Cache streams one connection may have open at once, over all its
/// sessions: two sessions fetching at full speed. A client reading the
/// outputs of one build at a time needs only the session's share.
pub const MAX_CACHE_STREAMS_PER_CONNECTION: usize = 2 * MAX_CACHE_STREAMS_PER_SESSION;

#[derive(Debug, Default)]
struct Counts {
    /// Open streams by session id; only sessions with some.
    sessions: HashMap<String, usize>,
    /// Open streams by connection number; only connections with some.
    connections: HashMap<usize, usize>,
}

/// The open Cache streams of every session and connection.
#[derive(Debug, Default)]
pub struct CacheStreams {
    counts: Mutex<Counts>,
}

impl CacheStreams {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more stream of `session` on `connection`, or refuses it if
    /// either already has its share open.
    pub fn open(
        self: &Arc<Self>,
        session: &str,
        connection: usize,
    ) -> Result<StreamPermit, ServerError> {
        let mut counts = self.counts();
        let in_session = counts.sessions.get(session).copied().unwrap_or(0);
        if in_session >= MAX_CACHE_STREAMS_PER_SESSION {
            return Err(too_many(format!(
                "this session already has {in_session} cache streams open, the most one session \
                 may have; read them to their end (or cancel them) before opening more"
            )));
        }
        let on_connection = counts.connections.get(&connection).copied().unwrap_or(0);
        if on_connection >= MAX_CACHE_STREAMS_PER_CONNECTION {
            return Err(too_many(format!(
                "this connection already has {on_connection} cache streams open, the most one \
                 connection may have; read them to their end (or cancel them) before opening more"
            )));
        }
        *counts.sessions.entry(session.to_owned()).or_default() += 1;
        *counts.connections.entry(connection).or_default() += 1;
        Ok(StreamPermit {
            streams: self.clone(),
            session: session.to_owned(),
            connection,
        })
    }
}

fn too_many(message: String) -> ServerError {
    ServerError::OverBudget(Budget::CacheStreams, message)
}

/// Decrements `key`'s count, forgetting it at zero.
fn release<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// One open Cache stream, counted until dropped.
#[derive(Debug)]
pub struct StreamPermit {
    streams: Arc<CacheStreams>,
    session: String,
    connection: usize,
}

impl StreamPermit {
    /// `stream`, holding this permit until it ends or is dropped.
    pub fn hold<S>(self, stream: S) -> Permitted<S> {
        Permitted {
            stream,
            permit: Some(self),
        }
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.streams.counts();
        release(&mut counts.sessions, &self.session);
        release(&mut counts.connections, &self.connection);
    }
}

/// A response stream that holds a [`StreamPermit`].
#[derive(Debug)]
pub struct Permitted<S> {
    stream: S,
    /// Given back as soon as the stream ends: before the peer learns it
    /// has, so a next call it makes at once is not refused.
    permit: Option<StreamPermit>,
}

impl<S: Stream + Unpin> Stream for Permitted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let item = Pin::new(&mut self.stream).poll_next(cx);
        if let Poll::Ready(None) = item {
            self.permit = None;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use futures::{StreamExt as _, stream};

    use super::*;

    fn open_in(streams: &CacheStreams, session: &str) -> usize {
        streams.counts().sessions.get(session).copied().unwrap_or(0)
    }

    fn reason(refused: ServerError) -> &'static str {
        match refused {
            ServerError::OverBudget(budget, _) => budget.reason(),
            other => panic!("not a budget refusal: {other:?}"),
        }
    }

    #[test]
    fn a_session_and_a_connection_get_their_share_and_no_more() {
        let streams = Arc::new(CacheStreams::default());
        let first: Vec<_> = (0..MAX_CACHE_STREAMS_PER_SESSION)
            .map(|_| streams.open("a", 1).unwrap())
            .collect();
        assert_eq!(
            reason(streams.open("a", 1).unwrap_err()),
            "too-many-cache-streams"
        );
        // The session's share is its own on any connection.
        assert!(streams.open("a", 2).is_err());
        let second: Vec<_> = (0..MAX_CACHE_STREAMS_PER_SESSION)
            .map(|_| streams.open("b", 1).unwrap())
            .collect();
        let refused = streams.open("c", 1).unwrap_err();
        assert!(refused.to_string().contains("this connection"), "{refused}");
        streams.open("c", 2).unwrap();
        drop((first, second));
        assert!(streams.counts().sessions.is_empty());
        assert_eq!(streams.counts().connections.len(), 0);
    }

    #[tokio::test]
    async fn a_stream_read_to_its_end_or_dropped_frees_its_permit() {
        let streams = Arc::new(CacheStreams::default());
        let mut finished = streams.open("s", 1).unwrap().hold(stream::iter([1, 2]));
        let dropped = streams.open("s", 1).unwrap().hold(stream::iter([3]));
        assert_eq!(open_in(&streams, "s"), 2);
        assert_eq!(finished.next().await, Some(1));
        assert_eq!(finished.next().await, Some(2));
        assert_eq!(open_in(&streams, "s"), 2, "counted until its end");
        assert_eq!(finished.next().await, None);
        assert_eq!(open_in(&streams, "s"), 1, "freed at its end");
        drop(dropped);
        assert_eq!(open_in(&streams, "s"), 0, "freed when dropped unread");
    }
}
