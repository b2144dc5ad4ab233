//! Flow control for bridged channels: windows that follow consumption.
//!
//! Contract: the gateway runs russh with `manual_window_adjust` (see
//! third_party/README.md), so a peer may send a channel only the window the
//! gateway granted it, and russh grants nothing by itself. Every bridged
//! direction drains its source channel at once into a [`Pipe`], so russh's
//! connection loop never waits on one slow channel, and grants window back
//! only as the other side takes the bytes ([`Pipe::taken`]). What a direction
//! holds is therefore bounded by its window: a stalled reader stalls its own
//! channel and nothing else.
//!
//! Windows start at [`WindowPolicy::initial`] and double, up to
//! [`WindowPolicy::max`], while the peer is window-limited and the consumer
//! keeps up, each extra byte reserved from the budgets first
//! ([`super::budget`]). [`Window`] is the pure accounting, tested directly.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use prometheus::IntGauge;
use russh::ChannelMsg;
use tokio::sync::Notify;

/// Window sizes of bridged channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPolicy {
    /// Granted when a channel opens (russh's `window_size`).
    pub initial: u32,
    /// Largest a window grows to.
    pub max: u32,
}

impl Default for WindowPolicy {
    fn default() -> Self {
        // 128 KiB keeps an idle or interactive channel cheap; 2 MiB is
        // OpenSSH's own channel window, enough for bulk copies over a WAN.
        WindowPolicy {
            initial: 128 << 10,
            max: 2 << 20,
        }
    }
}

/// SSH's usual largest packet payload; a grant waits until at least a few
/// packets' worth was consumed (OpenSSH's rule) so grants stay rare.
const PACKET: u32 = 32 << 10;

/// A peer sent more than its window.
#[derive(Debug, PartialEq, Eq)]
pub struct Overrun {
    pub window: u32,
    pub outstanding: u64,
}

/// One direction's window accounting, as the receiver sees it.
#[derive(Debug)]
pub struct Window {
    /// Window granted in all: what the peer may still send plus what it
    /// sent that has not been granted back.
    size: u32,
    max: u32,
    /// Received and not yet granted back (held, or consumed and pending).
    outstanding: u64,
    /// Consumed and not yet granted back.
    credit: u32,
}

impl Window {
    pub fn new(policy: WindowPolicy) -> Self {
        Window {
            size: policy.initial,
            max: policy.max.max(policy.initial),
            outstanding: 0,
            credit: 0,
        }
    }

    /// The window granted in all (what the budgets hold for it).
    #[cfg(test)]
    pub fn size(&self) -> u32 {
        self.size
    }

    /// `n` bytes arrived. A peer that overruns its window is refused; one
    /// packet of slack forgives an implementation that rounds.
    pub fn received(&mut self, n: usize) -> Result<(), Overrun> {
        self.outstanding += n as u64;
        if self.outstanding > u64::from(self.size) + u64::from(PACKET) {
            return Err(Overrun {
                window: self.size,
                outstanding: self.outstanding,
            });
        }
        Ok(())
    }

    /// `n` bytes were taken by the other side. Returns the window to grant
    /// now (0 for none). `drained` says nothing else is held; when the peer
    /// was window-limited and the consumer keeps up, the window grows by
    /// what `grow` reserves for it (asked for the doubling).
    pub fn consumed(&mut self, n: usize, drained: bool, grow: impl FnOnce(u32) -> u32) -> u32 {
        self.credit = self
            .credit
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        let remaining = u64::from(self.size).saturating_sub(self.outstanding);
        let limited = remaining < u64::from(self.size / 2);
        if self.credit == 0 || !(limited || self.credit > 3 * PACKET) {
            return 0;
        }
        let mut grant = self.credit;
        self.outstanding = self.outstanding.saturating_sub(u64::from(self.credit));
        self.credit = 0;
        if limited && drained && self.size < self.max {
            let extra = grow(self.size.min(self.max - self.size)).min(self.max - self.size);
            self.size += extra;
            grant += extra;
        }
        grant
    }
}

/// At most this many non-data messages wait in a pipe; beyond it the
/// source's drain pauses (only a peer flooding requests at a stalled channel
/// gets there, and it then waits on its own connection).
const MAX_CONTROLS: usize = 64;
/// Data messages smaller than this are appended to the previous small one,
/// so a peer sending one-byte packets costs bytes, not queue entries.
const COALESCE_BELOW: usize = 4 << 10;

/// What the taking side gets.
#[derive(Debug)]
pub enum Out {
    Data {
        ext: Option<u32>,
        data: Bytes,
    },
    Msg(ChannelMsg),
    /// The peer sent more than its window; the channel must close.
    Overrun(Overrun),
}

enum Item {
    Small { ext: Option<u32>, buf: BytesMut },
    Data { ext: Option<u32>, data: Bytes },
    Msg(ChannelMsg),
}

struct State {
    items: VecDeque<Item>,
    held: usize,
    controls: usize,
    window: Window,
    overrun: Option<Overrun>,
    closed: bool,
}

/// One direction of a bridged channel: the source drains into it as
/// messages arrive, the other side takes from it as it can write.
pub struct Pipe {
    state: Mutex<State>,
    readable: Notify,
    room: Notify,
    /// Bytes held by every pipe (`keyway_relay_buffered_bytes`).
    gauge: IntGauge,
}

impl Pipe {
    pub fn new(policy: WindowPolicy, gauge: IntGauge) -> Self {
        Pipe {
            gauge,
            state: Mutex::new(State {
                items: VecDeque::new(),
                held: 0,
                controls: 0,
                window: Window::new(policy),
                overrun: None,
                closed: false,
            }),
            readable: Notify::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the state whole; a poisoned lock is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Queues a message from the source. Waits only while too many non-data
    /// messages are queued.
    pub async fn put(&self, msg: ChannelMsg) {
        let (ext, data) = match msg {
            ChannelMsg::Data { data } => (None, data),
            ChannelMsg::ExtendedData { data, ext } => (Some(ext), data),
            other => {
                loop {
                    let room = self.room.notified();
                    {
                        let mut s = self.lock();
                        if s.controls < MAX_CONTROLS || s.closed {
                            s.controls += 1;
                            s.items.push_back(Item::Msg(other));
                            break;
                        }
                    }
                    room.await;
                }
                self.readable.notify_one();
                return;
            }
        };
        if data.is_empty() {
            return;
        }
        {
            let mut s = self.lock();
            if let Err(o) = s.window.received(data.len()) {
                s.overrun.get_or_insert(o);
            }
            s.held += data.len();
            self.gauge.add(data.len() as i64);
            let merged = data.len() < COALESCE_BELOW
                && match s.items.back_mut() {
                    Some(Item::Small { ext: e, buf })
                        if *e == ext && buf.len() < PACKET as usize =>
                    {
                        buf.extend_from_slice(&data);
                        true
                    }
                    _ => false,
                };
            if !merged {
                let item = if data.len() < COALESCE_BELOW {
                    Item::Small {
                        ext,
                        buf: BytesMut::from(&data[..]),
                    }
                } else {
                    Item::Data { ext, data }
                };
                s.items.push_back(item);
            }
        }
        self.readable.notify_one();
    }

    /// The source ended; the taking side sees `None` once the pipe is empty.
    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_one();
        self.room.notify_one();
    }

    /// The next message, in order; `None` once closed and empty.
    pub async fn take(&self) -> Option<Out> {
        loop {
            let readable = self.readable.notified();
            {
                let mut s = self.lock();
                if let Some(o) = s.overrun.take() {
                    return Some(Out::Overrun(o));
                }
                if let Some(item) = s.items.pop_front() {
                    return Some(match item {
                        Item::Small { ext, buf } => Out::Data {
                            ext,
                            data: buf.freeze(),
                        },
                        Item::Data { ext, data } => Out::Data { ext, data },
                        Item::Msg(m) => {
                            s.controls -= 1;
                            drop(s);
                            self.room.notify_one();
                            Out::Msg(m)
                        }
                    });
                }
                if s.closed {
                    return None;
                }
            }
            readable.await;
        }
    }

    /// `n` bytes taken earlier were written to the other side: returns the
    /// window to grant the source now (see [`Window::consumed`]).
    pub fn taken(&self, n: usize, grow: impl FnOnce(u32) -> u32) -> u32 {
        let mut s = self.lock();
        let n = n.min(s.held);
        s.held -= n;
        self.gauge.sub(n as i64);
        let drained = s.held == 0;
        s.window.consumed(n, drained, grow)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let held = self.lock().held;
        self.gauge.sub(held as i64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const P: WindowPolicy = WindowPolicy {
        initial: 128 << 10,
        max: 1 << 20,
    };

    #[test]
    fn a_stalled_consumer_bounds_what_the_peer_can_send() {
        let mut w = Window::new(P);
        // The peer may fill the window (plus one packet of slack) and no more.
        assert!(w.received(P.initial as usize).is_ok());
        assert!(w.received(PACKET as usize).is_ok());
        assert_eq!(
            w.received(1),
            Err(Overrun {
                window: P.initial,
                outstanding: u64::from(P.initial + PACKET) + 1
            })
        );
    }

    #[test]
    fn grants_follow_consumption_and_never_exceed_it() {
        let mut w = Window::new(P);
        w.received(30 << 10).unwrap();
        // Little consumed and plenty of window left: no grant yet.
        assert_eq!(w.consumed(10, false, |_| 0), 0);
        // Window below half: everything consumed so far goes back.
        w.received(40 << 10).unwrap();
        assert_eq!(w.consumed(20 << 10, false, |_| 0), (20 << 10) + 10);
        // Whatever the pattern, grants never exceed what was consumed.
        let (mut consumed, mut granted) = ((20u64 << 10) + 10, (20u64 << 10) + 10);
        for i in 0..200u64 {
            let n = (i * 7919) % 9000;
            w.received(n as usize).unwrap();
            consumed += n;
            granted += u64::from(w.consumed(n as usize, false, |_| 0));
            assert!(granted <= consumed);
        }
    }

    #[test]
    fn the_window_grows_only_when_the_peer_was_limited_and_the_consumer_kept_up() {
        let mut w = Window::new(P);
        w.received(P.initial as usize).unwrap();
        // Limited but the consumer is behind: same window.
        let g = w.consumed((P.initial / 2) as usize, false, |want| want);
        assert_eq!(g, P.initial / 2);
        assert_eq!(w.size(), P.initial);
        // Limited and drained: doubles, with the reservation's answer.
        w.received((P.initial / 2) as usize).unwrap();
        let g = w.consumed(P.initial as usize, true, |want| want);
        assert_eq!(w.size(), 2 * P.initial);
        assert_eq!(g, P.initial + P.initial);
        // A budget that says no keeps it where it is.
        w.received(w.size() as usize).unwrap();
        let before = w.size();
        w.consumed(before as usize, true, |_| 0);
        assert_eq!(w.size(), before);
        // Never beyond max.
        for _ in 0..20 {
            let s = w.size() as usize;
            w.received(s).unwrap();
            w.consumed(s, true, |want| want);
        }
        assert_eq!(w.size(), P.max);
    }

    fn gauge() -> IntGauge {
        IntGauge::new("held", "held").unwrap()
    }

    #[tokio::test]
    async fn small_packets_coalesce_and_order_is_kept() {
        let pipe = Pipe::new(P, gauge());
        for _ in 0..1000 {
            pipe.put(ChannelMsg::Data {
                data: Bytes::from_static(b"x"),
            })
            .await;
        }
        pipe.put(ChannelMsg::Eof).await;
        pipe.put(ChannelMsg::Data {
            data: Bytes::from_static(b"y"),
        })
        .await;
        pipe.close();
        assert_eq!(pipe.held(), 1001);
        match pipe.take().await.unwrap() {
            Out::Data { ext: None, data } => assert_eq!(data.len(), 1000),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            pipe.take().await.unwrap(),
            Out::Msg(ChannelMsg::Eof)
        ));
        match pipe.take().await.unwrap() {
            Out::Data { data, .. } => assert_eq!(&data[..], b"y"),
            o => panic!("{o:?}"),
        }
        assert!(pipe.take().await.is_none());
    }

    #[tokio::test]
    async fn an_overrun_is_reported_before_more_data() {
        let pipe = Pipe::new(P, gauge());
        let big = Bytes::from(vec![0u8; (P.initial + PACKET) as usize + 1]);
        pipe.put(ChannelMsg::Data { data: big }).await;
        assert!(matches!(pipe.take().await, Some(Out::Overrun(_))));
    }
}
