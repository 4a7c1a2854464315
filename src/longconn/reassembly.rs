//! Reassembly of fragmented long-connection data messages (protocol doc §2.7).
//!
//! Owns: buffering fragments by `message_id` until all `sum` slots (`seq` = 0..sum) are
//! filled, in any arrival order, tolerating duplicates; bounding memory (total buffered
//! bytes, number of partial messages, fragments per message); expiring partial messages
//! whose last fragment is older than a TTL.
//!
//! Must not: do I/O or read the clock. The caller passes `now: Instant` into every call
//! that depends on time, so tests drive time explicitly.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::protocol::{DataHeaderError, DataHeaders, Frame};

/// Bounds on what the reassembler buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Maximum bytes of fragment payloads buffered across all partial messages. A single
    /// message larger than this is rejected; otherwise the least recently active partial
    /// messages are evicted to make room.
    pub max_total_bytes: usize,
    /// Maximum number of partial messages; the least recently active one is evicted when a
    /// new message would exceed it.
    pub max_messages: usize,
    /// Maximum `sum` accepted for one message.
    pub max_fragments: u32,
    /// A partial message is dropped when no new fragment arrived for this long. The SDKs
    /// use 5 s (Python/Go, refreshed per fragment) and 10 s (Node).
    pub ttl: Duration,
}

impl Default for ReassemblyLimits {
    /// 32 MiB, 256 messages, 1024 fragments, 10 s.
    fn default() -> Self {
        Self {
            max_total_bytes: 32 * 1024 * 1024,
            max_messages: 256,
            max_fragments: 1024,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Result of accepting one fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// This fragment completed the message: the concatenated payload, slots in `seq` order.
    /// The frame just pushed is the one to ACK (§2.8).
    Complete(Vec<u8>),
    /// Stored; the message still lacks fragments.
    Pending {
        /// Distinct fragments held for this message.
        received: u32,
        /// Fragments the message has in total.
        sum: u32,
    },
    /// The slot was already filled; this copy was ignored (the first copy wins).
    Duplicate,
}

/// Why a fragment was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// The frame's `sum`/`seq`/`message_id` headers are unusable.
    #[error(transparent)]
    Headers(#[from] DataHeaderError),
    /// `sum` is 0 or `seq` is not below `sum`.
    #[error("fragment seq={seq} sum={sum} is out of range")]
    OutOfRange {
        /// The fragment's `seq`.
        seq: u32,
        /// The fragment's `sum`.
        sum: u32,
    },
    /// A fragment's `sum` differs from the first fragment of the same message.
    #[error("fragment has sum={got} but message has sum={expected}")]
    SumMismatch {
        /// `sum` of the first fragment seen.
        expected: u32,
        /// `sum` of this fragment.
        got: u32,
    },
    /// `sum` exceeds [`ReassemblyLimits::max_fragments`].
    #[error("message has {sum} fragments, more than the limit of {max}")]
    TooManyFragments {
        /// The fragment's `sum`.
        sum: u32,
        /// The configured limit.
        max: u32,
    },
    /// The message would exceed [`ReassemblyLimits::max_total_bytes`]; its buffer was
    /// dropped.
    #[error("message exceeds the reassembly limit of {max} bytes")]
    MessageTooLarge {
        /// The configured limit.
        max: usize,
    },
}

/// Counters for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Partial messages dropped because their TTL passed.
    pub expired: u64,
    /// Partial messages dropped to respect the byte or message limits.
    pub evicted: u64,
    /// Messages completed from more than one fragment.
    pub completed: u64,
}

#[derive(Debug)]
struct Partial {
    sum: u32,
    slots: Vec<Option<Vec<u8>>>,
    received: u32,
    bytes: usize,
    last_touch: Instant,
    /// Tie-breaker for eviction order when `last_touch` is equal.
    order: u64,
}

/// Buffers fragments of split messages until they are complete. See the module docs.
#[derive(Debug)]
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<String, Partial>,
    total_bytes: usize,
    next_order: u64,
    stats: ReassemblyStats,
}

impl Reassembler {
    /// An empty reassembler with the given limits.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            partial: HashMap::new(),
            total_bytes: 0,
            next_order: 0,
            stats: ReassemblyStats::default(),
        }
    }

    /// Accepts the payload of a data frame, reading `message_id`/`sum`/`seq` from its headers.
    /// An unsplit message (`sum=1`) is returned at once without buffering.
    pub fn push_frame(&mut self, frame: &Frame, now: Instant) -> Result<Pushed, ReassemblyError> {
        let h = DataHeaders::from_frame(frame)?;
        self.push(
            h.message_id.unwrap_or_default(),
            h.sum,
            h.seq,
            frame.payload_bytes(),
            now,
        )
    }

    /// Like [`Reassembler::push_frame`], but an unsplit message's payload is taken out of
    /// `frame` rather than copied (the common case on the hot path); a fragment is buffered
    /// as by `push_frame`, and `frame` keeps its payload then.
    pub fn take_frame(
        &mut self,
        frame: &mut Frame,
        now: Instant,
    ) -> Result<Pushed, ReassemblyError> {
        let h = DataHeaders::from_frame(frame)?;
        if h.sum == 1 && h.seq == 0 && self.limits.max_fragments >= 1 {
            return Ok(Pushed::Complete(frame.payload.take().unwrap_or_default()));
        }
        self.push_frame(frame, now)
    }

    /// Accepts fragment `seq` of `sum` of message `message_id`. Buffers whose TTL has passed
    /// by `now` are dropped first (call [`Reassembler::expire`] beforehand to learn which).
    pub fn push(
        &mut self,
        message_id: &str,
        sum: u32,
        seq: u32,
        payload: &[u8],
        now: Instant,
    ) -> Result<Pushed, ReassemblyError> {
        if sum == 0 || seq >= sum {
            return Err(ReassemblyError::OutOfRange { seq, sum });
        }
        if sum > self.limits.max_fragments {
            return Err(ReassemblyError::TooManyFragments {
                sum,
                max: self.limits.max_fragments,
            });
        }
        if sum == 1 {
            return Ok(Pushed::Complete(payload.to_vec()));
        }
        self.expire(now);

        if let Some(p) = self.partial.get(message_id) {
            if p.sum != sum {
                return Err(ReassemblyError::SumMismatch {
                    expected: p.sum,
                    got: sum,
                });
            }
            if p.slots[seq as usize].is_some() {
                return Ok(Pushed::Duplicate);
            }
            if p.bytes.saturating_add(payload.len()) > self.limits.max_total_bytes {
                self.remove(message_id);
                return Err(self.too_large());
            }
        } else {
            if payload.len() > self.limits.max_total_bytes {
                return Err(self.too_large());
            }
            while self.partial.len() >= self.limits.max_messages.max(1) {
                self.evict_oldest(None);
            }
            let order = self.next_order;
            self.next_order += 1;
            self.partial.insert(
                message_id.to_owned(),
                Partial {
                    sum,
                    slots: vec![None; sum as usize],
                    received: 0,
                    bytes: 0,
                    last_touch: now,
                    order,
                },
            );
        }

        // Make room for this fragment by evicting other messages.
        while self.total_bytes.saturating_add(payload.len()) > self.limits.max_total_bytes {
            if !self.evict_oldest(Some(message_id)) {
                break;
            }
        }

        let Some(p) = self.partial.get_mut(message_id) else {
            // Unreachable: inserted or found above and never evicted (excluded).
            return Ok(Pushed::Duplicate);
        };
        p.slots[seq as usize] = Some(payload.to_vec());
        p.received += 1;
        p.bytes += payload.len();
        p.last_touch = now;
        self.total_bytes += payload.len();

        if p.received < p.sum {
            return Ok(Pushed::Pending {
                received: p.received,
                sum: p.sum,
            });
        }
        let Some(done) = self.remove(message_id) else {
            return Ok(Pushed::Duplicate);
        };
        let mut out = Vec::with_capacity(done.bytes);
        for slot in done.slots.into_iter().flatten() {
            out.extend_from_slice(&slot);
        }
        self.stats.completed += 1;
        Ok(Pushed::Complete(out))
    }

    /// Drops every partial message whose last fragment arrived `ttl` or more before `now`,
    /// returning their message ids (for logs).
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let ttl = self.limits.ttl;
        let expired: Vec<String> = self
            .partial
            .iter()
            .filter(|(_, p)| is_expired(p.last_touch, ttl, now))
            .map(|(k, _)| k.clone())
            .collect();
        for id in &expired {
            self.remove(id);
            self.stats.expired += 1;
        }
        expired
    }

    /// When the earliest partial message will expire, for the caller's timer. `None` when
    /// nothing is buffered.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.partial
            .values()
            .map(|p| {
                p.last_touch
                    .checked_add(self.limits.ttl)
                    .unwrap_or(p.last_touch)
            })
            .min()
    }

    /// Number of partial messages buffered.
    pub fn pending_messages(&self) -> usize {
        self.partial.len()
    }

    /// Total payload bytes buffered.
    pub fn buffered_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Counters since creation.
    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// The limits in force.
    pub fn limits(&self) -> &ReassemblyLimits {
        &self.limits
    }

    /// Drops all buffered fragments (e.g. when the connection is replaced).
    pub fn clear(&mut self) {
        self.partial.clear();
        self.total_bytes = 0;
    }

    fn too_large(&self) -> ReassemblyError {
        ReassemblyError::MessageTooLarge {
            max: self.limits.max_total_bytes,
        }
    }

    fn remove(&mut self, message_id: &str) -> Option<Partial> {
        let p = self.partial.remove(message_id)?;
        self.total_bytes -= p.bytes;
        Some(p)
    }

    /// Evicts the least recently active partial message other than `keep`. Returns whether
    /// one was evicted.
    fn evict_oldest(&mut self, keep: Option<&str>) -> bool {
        let victim = self
            .partial
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != keep)
            .min_by_key(|(_, p)| (p.last_touch, p.order))
            .map(|(k, _)| k.clone());
        match victim {
            Some(id) => {
                self.remove(&id);
                self.stats.evicted += 1;
                true
            }
            None => false,
        }
    }
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new(ReassemblyLimits::default())
    }
}

fn is_expired(last_touch: Instant, ttl: Duration, now: Instant) -> bool {
    now.saturating_duration_since(last_touch) >= ttl
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::longconn::protocol::{Header, METHOD_DATA};

    fn limits() -> ReassemblyLimits {
        ReassemblyLimits {
            max_total_bytes: 100,
            max_messages: 3,
            max_fragments: 8,
            ttl: Duration::from_secs(5),
        }
    }

    #[test]
    fn unsplit_message_passes_through() {
        let mut r = Reassembler::new(limits());
        let t = Instant::now();
        assert_eq!(
            r.push("m", 1, 0, b"abc", t),
            Ok(Pushed::Complete(b"abc".to_vec()))
        );
        assert_eq!(r.pending_messages(), 0);
    }

    #[test]
    fn out_of_order_with_duplicates() {
        let mut r = Reassembler::new(limits());
        let t = Instant::now();
        assert_eq!(
            r.push("m", 3, 2, b"C", t),
            Ok(Pushed::Pending {
                received: 1,
                sum: 3
            })
        );
        assert_eq!(r.push("m", 3, 2, b"X", t), Ok(Pushed::Duplicate));
        assert_eq!(
            r.push("m", 3, 0, b"A", t),
            Ok(Pushed::Pending {
                received: 2,
                sum: 3
            })
        );
        assert_eq!(r.buffered_bytes(), 2);
        assert_eq!(
            r.push("m", 3, 1, b"B", t),
            Ok(Pushed::Complete(b"ABC".to_vec()))
        );
        assert_eq!(r.pending_messages(), 0);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(r.stats().completed, 1);
    }

    #[test]
    fn empty_fragments_count_as_received() {
        let mut r = Reassembler::new(limits());
        let t = Instant::now();
        r.push("m", 2, 1, b"", t).unwrap();
        assert_eq!(
            r.push("m", 2, 0, b"x", t),
            Ok(Pushed::Complete(b"x".to_vec()))
        );
    }

    #[test]
    fn invalid_fragments_are_rejected() {
        let mut r = Reassembler::new(limits());
        let t = Instant::now();
        assert_eq!(
            r.push("m", 0, 0, b"", t),
            Err(ReassemblyError::OutOfRange { seq: 0, sum: 0 })
        );
        assert_eq!(
            r.push("m", 2, 2, b"", t),
            Err(ReassemblyError::OutOfRange { seq: 2, sum: 2 })
        );
        assert_eq!(
            r.push("m", 9, 0, b"", t),
            Err(ReassemblyError::TooManyFragments { sum: 9, max: 8 })
        );
        r.push("m", 2, 0, b"a", t).unwrap();
        assert_eq!(
            r.push("m", 3, 1, b"b", t),
            Err(ReassemblyError::SumMismatch {
                expected: 2,
                got: 3
            })
        );
        // The original buffer survives a mismatching fragment.
        assert_eq!(
            r.push("m", 2, 1, b"b", t),
            Ok(Pushed::Complete(b"ab".to_vec()))
        );
    }

    #[test]
    fn ttl_expiry_is_refreshed_by_each_new_fragment() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        r.push("m", 3, 0, b"a", t0).unwrap();
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(5)));
        r.push("m", 3, 1, b"b", t0 + Duration::from_secs(4))
            .unwrap();
        assert!(r.expire(t0 + Duration::from_secs(8)).is_empty());
        assert_eq!(r.expire(t0 + Duration::from_secs(9)), vec!["m".to_owned()]);
        assert_eq!(r.pending_messages(), 0);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(r.stats().expired, 1);
        assert_eq!(r.next_deadline(), None);
        // A late last fragment starts a fresh buffer instead of completing a stale one.
        assert_eq!(
            r.push("m", 3, 2, b"c", t0 + Duration::from_secs(10)),
            Ok(Pushed::Pending {
                received: 1,
                sum: 3
            })
        );
    }

    #[test]
    fn push_drops_expired_buffers_of_the_same_message() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        r.push("m", 2, 0, b"a", t0).unwrap();
        assert_eq!(
            r.push("m", 2, 1, b"b", t0 + Duration::from_secs(5)),
            Ok(Pushed::Pending {
                received: 1,
                sum: 2
            })
        );
    }

    #[test]
    fn duplicates_do_not_refresh_the_ttl() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        r.push("m", 2, 0, b"a", t0).unwrap();
        r.push("m", 2, 0, b"a", t0 + Duration::from_secs(4))
            .unwrap();
        assert_eq!(r.expire(t0 + Duration::from_secs(5)).len(), 1);
    }

    #[test]
    fn message_limit_evicts_least_recently_active() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        r.push("a", 3, 0, b"1", t0).unwrap();
        r.push("b", 3, 0, b"1", t0 + ms(1)).unwrap();
        r.push("c", 3, 0, b"1", t0 + ms(2)).unwrap();
        // A new fragment of "a" makes "b" the least recently active.
        r.push("a", 3, 1, b"2", t0 + ms(3)).unwrap();
        r.push("d", 3, 0, b"1", t0 + ms(4)).unwrap();
        assert_eq!(r.pending_messages(), 3);
        assert_eq!(r.stats().evicted, 1);
        assert_eq!(r.buffered_bytes(), 4);
        assert_eq!(
            r.push("a", 3, 2, b"3", t0 + ms(5)),
            Ok(Pushed::Complete(b"123".to_vec()))
        );
        // "b" was evicted: its next fragment starts a fresh buffer.
        assert_eq!(
            r.push("b", 3, 1, b"2", t0 + ms(6)),
            Ok(Pushed::Pending {
                received: 1,
                sum: 3
            })
        );
    }

    #[test]
    fn byte_limit_evicts_others_and_rejects_oversized_messages() {
        let mut r = Reassembler::new(limits());
        let t0 = Instant::now();
        r.push("a", 2, 0, &[0; 60], t0).unwrap();
        r.push("b", 2, 0, &[0; 60], t0 + Duration::from_millis(1))
            .unwrap();
        assert_eq!(r.pending_messages(), 1, "a evicted to fit b");
        assert_eq!(r.buffered_bytes(), 60);
        assert_eq!(
            r.push("b", 2, 1, &[0; 41], t0),
            Err(ReassemblyError::MessageTooLarge { max: 100 })
        );
        assert_eq!(r.pending_messages(), 0);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(
            r.push("c", 2, 0, &[0; 101], t0),
            Err(ReassemblyError::MessageTooLarge { max: 100 })
        );
        assert_eq!(r.pending_messages(), 0);
    }

    #[test]
    fn push_frame_reads_headers() {
        let frame = |seq: &str, payload: &[u8]| Frame {
            method: METHOD_DATA,
            headers: vec![
                Header::new("type", "event"),
                Header::new("message_id", "m9"),
                Header::new("sum", "2"),
                Header::new("seq", seq),
            ],
            payload: Some(payload.to_vec()),
            ..Frame::default()
        };
        let mut r = Reassembler::default();
        let t = Instant::now();
        assert!(matches!(
            r.push_frame(&frame("1", b"lo"), t),
            Ok(Pushed::Pending { .. })
        ));
        assert_eq!(
            r.push_frame(&frame("0", b"hel"), t),
            Ok(Pushed::Complete(b"hello".to_vec()))
        );
        assert!(matches!(
            r.push_frame(&frame("x", b""), t),
            Err(ReassemblyError::Headers(DataHeaderError::NotANumber("seq")))
        ));
    }

    #[test]
    fn take_frame_moves_an_unsplit_payload_and_buffers_fragments_like_push_frame() {
        let frame = |headers: &[(&str, &str)], payload: &[u8]| Frame {
            method: METHOD_DATA,
            headers: headers.iter().map(|(k, v)| Header::new(*k, *v)).collect(),
            payload: Some(payload.to_vec()),
            ..Frame::default()
        };
        let mut r = Reassembler::default();
        let t = Instant::now();
        // Unsplit (no sum/seq, or sum=1): the payload leaves the frame, nothing is buffered.
        for headers in [&[("type", "event")][..], &[("sum", "1"), ("seq", "0")][..]] {
            let mut f = frame(headers, b"whole");
            assert_eq!(
                r.take_frame(&mut f, t),
                Ok(Pushed::Complete(b"whole".to_vec()))
            );
            assert_eq!(f.payload, None);
            assert_eq!(r.pending_messages(), 0);
        }
        // Fragments: buffered and joined as push_frame does; each frame keeps its payload.
        let mut second = frame(&[("message_id", "m1"), ("sum", "2"), ("seq", "1")], b"lo");
        assert!(matches!(
            r.take_frame(&mut second, t),
            Ok(Pushed::Pending { .. })
        ));
        assert_eq!(second.payload.as_deref(), Some(&b"lo"[..]));
        let mut first = frame(&[("message_id", "m1"), ("sum", "2"), ("seq", "0")], b"hel");
        assert_eq!(
            r.take_frame(&mut first, t),
            Ok(Pushed::Complete(b"hello".to_vec()))
        );
        // Bad headers are refused as by push_frame, and the payload stays.
        let mut bad = frame(&[("sum", "1"), ("seq", "1")], b"x");
        assert!(r.take_frame(&mut bad, t).is_err());
        assert!(bad.payload.is_some());
    }

    mod props {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;
        use std::collections::HashSet;

        proptest! {
            #[test]
            fn any_permutation_with_duplicates_reassembles(
                payload in vec(any::<u8>(), 0..300),
                sum in 1u32..10,
                keys in vec(any::<u64>(), 10),
                dups in vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..6),
            ) {
                let len = payload.len();
                let n = sum as usize;
                let chunk = |i: usize| &payload[i * len / n..(i + 1) * len / n];
                let mut order: Vec<u32> = (0..sum).collect();
                order.sort_by_key(|&i| keys[usize::try_from(i).unwrap()]);
                for (at, which) in &dups {
                    let seq = u32::try_from(which.index(n)).unwrap();
                    order.insert(at.index(order.len() + 1), seq);
                }

                let mut r = Reassembler::default();
                let now = Instant::now();
                let mut seen = HashSet::new();
                let mut completions = 0;
                for seq in order {
                    let got = r.push("m", sum, seq, chunk(seq as usize), now).unwrap();
                    if sum == 1 {
                        prop_assert_eq!(got, Pushed::Complete(payload.clone()));
                        completions += 1;
                        continue;
                    }
                    if !seen.insert(seq) {
                        prop_assert_eq!(got, Pushed::Duplicate);
                    } else if seen.len() == n {
                        prop_assert_eq!(got, Pushed::Complete(payload.clone()));
                        seen.clear();
                        completions += 1;
                    } else {
                        prop_assert_eq!(got, Pushed::Pending { received: u32::try_from(seen.len()).unwrap(), sum });
                    }
                }
                prop_assert!(completions >= 1);
                prop_assert_eq!(r.buffered_bytes(), r.partial.values().map(|p| p.bytes).sum::<usize>());
            }

            #[test]
            fn bounds_always_hold(
                pushes in vec((0u8..6, 1u32..5, any::<prop::sample::Index>(), 0usize..40, 0u64..20), 0..60),
            ) {
                let limits = ReassemblyLimits {
                    max_total_bytes: 64,
                    max_messages: 3,
                    max_fragments: 4,
                    ttl: Duration::from_secs(5),
                };
                let mut r = Reassembler::new(limits);
                let t0 = Instant::now();
                for (id, sum, seq, size, t) in pushes {
                    let seq = u32::try_from(seq.index(sum as usize)).unwrap();
                    let _ = r.push(&id.to_string(), sum, seq, &vec![0; size], t0 + Duration::from_secs(t));
                    prop_assert!(r.buffered_bytes() <= 64);
                    prop_assert!(r.pending_messages() <= 3);
                    prop_assert_eq!(r.buffered_bytes(), r.partial.values().map(|p| p.bytes).sum::<usize>());
                }
            }
        }
    }
}
