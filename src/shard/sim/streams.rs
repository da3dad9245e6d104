//! The simulation's model of topic streams: what each client knows of the
//! stream topics it subscribes to ([`StreamView`]), and what every client,
//! publisher and history reader together have learnt of each stream
//! ([`Ledger`]): which publication each offset of each epoch is. It must
//! not touch the shard states: everything here is judged from the bytes
//! clients read.
//!
//! The rules of a stream run (`s:*` are streams, everything else plain):
//!
//! - `subscribed` for a stream carries `offset` M and `epoch`, and
//!   `recovered` exactly when the subscribe that created the subscription
//!   gave a position.
//! - After `"recovered":true` from position N: unmarked pushes N+1, N+2, ...
//!   with no gap (unless the bus dropped publishes) and no duplicate: the
//!   replay up to M, then live ones.
//! - Otherwise: at most `replay_on_subscribe` pushes marked `"replay":true`,
//!   consecutive and ending at M, then unmarked pushes M+1, M+2, ...
//! - Every offset of an epoch is one publication, whoever reads it (a
//!   subscriber, a `202`, the history endpoint), and every publication has
//!   one offset.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde_json::Value;

use super::client::Req;
use super::{HttpCall, Sim, WsCall, MAX_SUBSCRIPTIONS};

/// A stream position a client resumes from: offset and epoch.
pub(super) type Since = (u64, String);

/// Stream topics are named `s:0`, `s:1`, ... and their rule's pattern is
/// `s:*`; runs without streams never name one.
pub(super) fn is_stream_topic(topic: &str) -> bool {
    topic.starts_with("s:")
}

/// A position no stream ever had: epochs are 16 hex digits from the state's
/// seeded generator, never all zeros in practice.
pub(super) const GARBAGE_EPOCH: &str = "0000000000000000";

/// One client's knowledge of one stream topic.
#[derive(Debug, Default)]
pub(super) struct StreamView {
    /// Subscribes that create the server's subscription, each with its
    /// request number and the position it asked for, oldest first. A
    /// `subscribed` read while not active answers the oldest.
    creating: VecDeque<(u64, Option<Since>)>,
    /// Per unsubscribe sent and not yet answered: the request number below
    /// which creating requests die unanswered once it is answered (their
    /// subscription was dropped before the home opened it).
    barriers: VecDeque<u64>,
    next_req: u64,
    /// From `subscribed` to `unsubscribed`.
    pub(super) active: Option<Active>,
}

/// A stream subscription between its `subscribed` and `unsubscribed`.
#[derive(Debug, Clone)]
pub(super) struct Active {
    /// The epoch `subscribed` named: the epoch of every push that follows.
    pub(super) epoch: String,
    /// The offset `subscribed` carried (M).
    pub(super) at: u64,
    pub(super) recovered: Option<bool>,
    /// The next unmarked offset owed: N+1 after a recovery from N, else M+1.
    pub(super) next: u64,
    /// Unmarked pushes read.
    pub(super) live: usize,
    /// Pushes marked `"replay":true` read, and the last one's offset.
    pub(super) marked: usize,
    pub(super) last_marked: Option<u64>,
}

impl StreamView {
    pub(super) fn sent_creating(&mut self, since: Option<Since>) {
        self.creating.push_back((self.next_req, since));
        self.next_req += 1;
    }

    pub(super) fn sent_unsubscribe(&mut self) {
        self.barriers.push_back(self.next_req);
    }

    pub(super) fn read_unsubscribed(&mut self) {
        self.active = None;
        if let Some(barrier) = self.barriers.pop_front() {
            self.creating.retain(|(req, _)| *req >= barrier);
        }
    }

    /// The creating subscribe a `subscribed` answers, with its position;
    /// `None` if none is outstanding.
    pub(super) fn answered(&mut self) -> Option<Option<Since>> {
        self.creating.pop_front().map(|(_, since)| since)
    }

    /// Where the client stands: the last unmarked offset it read (or, with
    /// none yet, where its subscription started) and the epoch.
    pub(super) fn position(&self) -> Option<Since> {
        let active = self.active.as_ref()?;
        Some((active.next - 1, active.epoch.clone()))
    }
}

/// What the whole run has learnt of its streams.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// (topic, epoch, offset) -> publish index.
    by_offset: HashMap<(String, String, u64), usize>,
    /// Publish index -> (epoch, offset).
    by_publish: HashMap<usize, (String, u64)>,
    /// The largest offset seen per (topic, epoch).
    latest: HashMap<(String, String), u64>,
    /// Epochs seen per topic, in the order first seen.
    pub(super) epochs: BTreeMap<String, Vec<String>>,
}

impl Ledger {
    /// Records that publication `id` of `topic` has `offset` in `epoch`, as
    /// `who` saw it; an offset naming two publications, or a publication
    /// with two offsets, is a violation.
    pub(super) fn record(
        &mut self,
        topic: &str,
        epoch: &str,
        offset: u64,
        id: usize,
        who: &str,
    ) -> Result<(), String> {
        let key = (topic.to_string(), epoch.to_string(), offset);
        match self.by_offset.get(&key) {
            Some(&other) if other != id => {
                return Err(format!(
                    "{who}: offset {offset} of {topic} (epoch {epoch}) is publish {id}, \
                     but it was publish {other} before"
                ))
            }
            Some(_) => {}
            None => {
                self.by_offset.insert(key, id);
            }
        }
        match self.by_publish.get(&id) {
            Some((e, o)) if (e.as_str(), *o) != (epoch, offset) => {
                return Err(format!(
                    "{who}: publish {id} has offset {offset} (epoch {epoch}), \
                     but it had offset {o} (epoch {e}) before"
                ))
            }
            Some(_) => {}
            None => {
                self.by_publish.insert(id, (epoch.to_string(), offset));
            }
        }
        let latest = self
            .latest
            .entry((topic.to_string(), epoch.to_string()))
            .or_default();
        *latest = (*latest).max(offset);
        self.saw_epoch(topic, epoch);
        Ok(())
    }

    pub(super) fn saw_epoch(&mut self, topic: &str, epoch: &str) {
        let epochs = self.epochs.entry(topic.to_string()).or_default();
        if !epochs.iter().any(|e| e == epoch) {
            epochs.push(epoch.to_string());
        }
    }

    /// The publication known at `offset` of `topic`'s `epoch`.
    pub(super) fn publication(&self, topic: &str, epoch: &str, offset: u64) -> Option<usize> {
        self.by_offset
            .get(&(topic.to_string(), epoch.to_string(), offset))
            .copied()
    }

    /// The largest offset anyone saw in `topic`'s `epoch`.
    pub(super) fn latest(&self, topic: &str, epoch: &str) -> Option<u64> {
        self.latest
            .get(&(topic.to_string(), epoch.to_string()))
            .copied()
    }

    /// Positions known in `topic`: each epoch seen with its latest offset.
    pub(super) fn positions(&self, topic: &str) -> Vec<Since> {
        self.epochs
            .get(topic)
            .map(|epochs| {
                epochs
                    .iter()
                    .map(|e| (self.latest(topic, e).unwrap_or(0), e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A message in a failure report, with payload padding cut short.
struct Shown<'a>(&'a Value);

impl std::ops::Deref for Shown<'_> {
    type Target = Value;

    fn deref(&self) -> &Value {
        self.0
    }
}

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.0.to_string();
        match text.find("xxxxxxxx") {
            Some(cut) => {
                let end = text[cut..].find('"').map_or(text.len(), |e| cut + e);
                write!(f, "{}x…({} bytes){}", &text[..cut], end - cut, &text[end..])
            }
            None => f.write_str(&text),
        }
    }
}

/// The rule of a run's stream topics, as the history check needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rule {
    pub(super) size: usize,
    pub(super) ttl: Duration,
    /// `max_history_bytes` is small enough to evict, which the model does
    /// not follow: then no position is known to be in history.
    pub(super) byte_bound: bool,
}

impl Rule {
    /// Whether position `since` of the stream is certainly still in its
    /// history, with the stream at `offset` in the same epoch and the answer
    /// read at `now`: within `history_size`, and the publication after it
    /// written less than a TTL before `now` (`written` gives when its
    /// publish was first written by a client, which is no later than the
    /// home stored it).
    pub(super) fn must_recover(
        &self,
        since: u64,
        offset: u64,
        now: Duration,
        written: impl FnOnce(u64) -> Option<Duration>,
    ) -> bool {
        if self.byte_bound || since > offset || offset - since > self.size as u64 {
            return false;
        }
        if since == offset {
            // Nothing after it to keep: a position at the head always is.
            return true;
        }
        written(since + 1).is_some_and(|at| now.saturating_sub(at) < self.ttl)
    }
}

impl Sim {
    /// The run's stream rule, if it has streams.
    fn stream_rule(&self) -> Option<Rule> {
        let streams = self.params.streams.as_ref()?;
        Some(Rule {
            size: streams.history_size,
            ttl: Duration::from_secs(streams.ttl_s),
            // Below 16 KiB a home's history holds a handful of publications.
            byte_bound: streams.max_history_bytes < 16 << 10,
        })
    }

    /// When the publication at `offset` of `topic`'s `epoch` was written,
    /// if anyone saw which it is.
    fn written_at(&self, topic: &str, epoch: &str, offset: u64) -> Option<Duration> {
        let id = self.ledger.publication(topic, epoch, offset)?;
        Some(self.publishes[id].written_at)
    }

    /// Whether position `since` must still be in `topic`'s history, the
    /// stream standing at `offset` in `epoch` now.
    fn must_recover(&self, topic: &str, epoch: &str, since: u64, offset: u64) -> bool {
        let Some(rule) = self.stream_rule() else {
            return false;
        };
        rule.must_recover(since, offset, self.elapsed, |o| {
            self.written_at(topic, epoch, o)
        })
    }

    /// Records a stream observation; a contradiction is a violation.
    fn record(&mut self, topic: &str, epoch: &str, offset: u64, id: usize, who: &str) {
        if let Err(e) = self.ledger.record(topic, epoch, offset, id, who) {
            self.fail(e);
        }
    }

    /// Client `c` read `subscribed` for `topic` (its plain bookkeeping done).
    pub(super) fn on_subscribed_position(&mut self, c: usize, topic: &str, value: &Value) {
        let offset = value.get("offset").map(Value::as_u64);
        let epoch = value.get("epoch").map(|e| e.as_str().map(str::to_string));
        let recovered = value.get("recovered").map(Value::as_bool);
        if !is_stream_topic(topic) {
            if offset.is_some() || epoch.is_some() || recovered.is_some() {
                self.fail(format!(
                    "c{c} got a stream position for plain {topic}: {value}"
                ));
            }
            return;
        }
        let (Some(Some(at)), Some(Some(epoch))) = (offset, epoch) else {
            return self.fail(format!(
                "c{c} got subscribed for stream {topic} without offset and epoch: {value}"
            ));
        };
        let recovered = match recovered {
            None => None,
            Some(Some(recovered)) => Some(recovered),
            Some(None) => return self.fail(format!("c{c} got a bad recovered flag: {value}")),
        };
        let lossy = self.lossy();
        let view = self.clients[c].stream_view(topic);
        if let (Some(active), Some(false)) = (&view.active, recovered) {
            // A replay paged out behind a slow reader needed publications
            // that were evicted before they could go: it goes on live from
            // the head it names, as after a failed recovery. Legitimate
            // only in the same epoch, ahead of what was read, and when
            // history may no longer hold what was owed.
            let last = active.next - 1;
            // While the last values go out, `next` is past them already:
            // what was owed then is not known to the model.
            let in_last_values = active.recovered != Some(true) && active.live == 0;
            let violation = if epoch != active.epoch {
                Some(format!("epoch {epoch}, not {}", active.epoch))
            } else if at < last {
                Some(format!("offset {at}, though its pushes stand at {last}"))
            } else if !in_last_values && self.must_recover(topic, &epoch, last, at) {
                Some(format!(
                    "recovered:false, though history holds {last}..{at}"
                ))
            } else {
                None
            };
            if let Some(violation) = violation {
                return self.fail(format!(
                    "c{c}'s replay of {topic} was interrupted with {violation}: {value}"
                ));
            }
            self.not_recovered += 1;
            self.clients[c].stream_view(topic).active = Some(Active {
                epoch,
                at,
                recovered,
                next: at + 1,
                live: 0,
                marked: 0,
                last_marked: None,
            });
            return;
        }
        let view = self.clients[c].stream_view(topic);
        if let Some(active) = &view.active {
            // A subscribe repeated while subscribed: it changes nothing, and
            // its position is where this connection's pushes stand.
            let last = active.next - 1;
            let violation = if epoch != active.epoch {
                Some(format!("epoch {epoch}, not {}", active.epoch))
            } else if recovered.is_some() {
                Some("a recovered flag".to_string())
            } else if at < last || (at != last && !lossy) {
                Some(format!("offset {at}, though its pushes stand at {last}"))
            } else {
                None
            };
            if let Some(violation) = violation {
                self.fail(format!(
                    "c{c} resubscribed to {topic} while subscribed and got {violation}: {value}"
                ));
            }
            return;
        }
        let Some(asked) = view.answered() else {
            return self.fail(format!(
                "c{c} got subscribed for {topic}, which answers no subscribe: {value}"
            ));
        };
        let next = match (&asked, recovered) {
            (Some(_), None) => {
                return self.fail(format!(
                    "c{c} subscribed to {topic} from {asked:?}, and the reply says nothing \
                     of recovery: {value}"
                ))
            }
            (None, Some(_)) => {
                return self.fail(format!(
                    "c{c} subscribed to {topic} from no position, and the reply says \
                     recovered: {value}"
                ))
            }
            (Some((since, asked_epoch)), Some(true)) => {
                let size = self.stream_rule().map_or(0, |r| r.size as u64);
                if *asked_epoch != epoch || *since > at || at - since > size {
                    return self.fail(format!(
                        "c{c} recovered {topic} from {since} of epoch {asked_epoch} into epoch \
                         {epoch} at {at}: that cannot be in history (size {size})"
                    ));
                }
                since + 1
            }
            (Some((since, asked_epoch)), Some(false)) => {
                if *asked_epoch == epoch && self.must_recover(topic, &epoch, *since, at) {
                    return self.fail(format!(
                        "c{c} was not recovered from {since} of {topic} (epoch {epoch}, now at \
                         {at}), which history still holds"
                    ));
                }
                at + 1
            }
            (None, None) => at + 1,
        };
        match recovered {
            Some(true) => self.recovered += 1,
            Some(false) => self.not_recovered += 1,
            None => {}
        }
        self.ledger.saw_epoch(topic, &epoch);
        self.clients[c].stream_view(topic).active = Some(Active {
            epoch,
            at,
            recovered,
            next,
            live: 0,
            marked: 0,
            last_marked: None,
        });
    }

    /// Client `c` read a push of publish `id` for `topic` (already judged a
    /// push it may get, and not a duplicate).
    pub(super) fn on_push_position(&mut self, c: usize, topic: &str, id: usize, value: &Value) {
        let value = &Shown(value);
        let offset = value.get("offset").map(Value::as_u64);
        let marked = match value.get("replay") {
            None => false,
            Some(Value::Bool(true)) => true,
            Some(_) => return self.fail(format!("c{c} got a bad replay flag: {value}")),
        };
        let direct = self.publishes[id].user.is_some();
        if !is_stream_topic(topic) || direct {
            // Plain topics, and publishes to one user, are not in a stream.
            if offset.is_some() || marked {
                self.fail(format!("c{c} got an offset outside a stream: {value}"));
            }
            return;
        }
        let Some(Some(offset)) = offset else {
            return self.fail(format!("c{c} got a stream push without an offset: {value}"));
        };
        self.stream_pushes += 1;
        let lossy = self.lossy();
        let replay_max = self
            .params
            .streams
            .as_ref()
            .map_or(0, |s| s.replay_on_subscribe);
        let Some(active) = self.clients[c]
            .streams
            .get_mut(topic)
            .and_then(|v| v.active.as_mut())
        else {
            return self.fail(format!(
                "c{c} got a push of {topic} outside its subscription"
            ));
        };
        let violation = if marked {
            let previous = active.last_marked;
            active.marked += 1;
            active.last_marked = Some(offset);
            if active.recovered == Some(true) {
                Some("a marked replay after recovered:true".to_string())
            } else if active.live > 0 {
                Some("a marked replay after a live push".to_string())
            } else if offset > active.at {
                Some(format!("a marked replay past {}", active.at))
            } else if previous.is_some_and(|p| offset != p + 1) {
                Some(format!("marked replays {previous:?} then {offset}"))
            } else if active.marked > replay_max {
                Some(format!("more than {replay_max} marked replays"))
            } else {
                None
            }
        } else {
            let expected = active.next;
            let ends_replay = active.live == 0 && active.marked > 0;
            active.live += 1;
            active.next = offset + 1;
            if ends_replay && active.last_marked != Some(active.at) {
                Some(format!(
                    "marked replays ending at {:?}, not at its position {}",
                    active.last_marked, active.at
                ))
            } else if offset < expected {
                Some(format!("offset {offset} after {}", expected - 1))
            } else if offset > expected && (!lossy || expected <= active.at) {
                // The bus drops only live publishes; the replay never.
                Some(format!("offset {offset} where {expected} was owed (a gap)"))
            } else {
                None
            }
        };
        let epoch = active.epoch.clone();
        if marked {
            self.marked_replays += 1;
        }
        if let Some(violation) = violation {
            return self.fail(format!(
                "c{c} in {topic} (epoch {epoch}): {violation}: {value}"
            ));
        }
        self.record(topic, &epoch, offset, id, &format!("a push to c{c}"));
    }

    /// A `202` for publish `id`: a stream publication's carries its position.
    pub(super) fn on_publish_position(&mut self, c: usize, id: usize, body: &[u8]) {
        let value = serde_json::from_slice::<Value>(body).unwrap_or_default();
        let offset = value.get("offset").and_then(Value::as_u64);
        let epoch = value.get("epoch").and_then(Value::as_str);
        let publish = &self.publishes[id];
        let topic = publish.topic.clone();
        if !is_stream_topic(&topic) || publish.user.is_some() {
            if value.get("offset").is_some() || value.get("epoch").is_some() {
                self.fail(format!(
                    "c{c}: publish {id} to plain {topic} got a position: {value}"
                ));
            }
            return;
        }
        match (offset, epoch) {
            (Some(offset), Some(epoch)) => {
                let epoch = epoch.to_string();
                self.record(&topic, &epoch, offset, id, &format!("the 202 to c{c}"));
            }
            _ => self.fail(format!(
                "c{c}: publish {id} to stream {topic} got 202 without offset and epoch: {value}"
            )),
        }
    }

    /// The answer to a history query.
    pub(super) fn on_history(&mut self, c: usize, req: &Req, status: u16, body: &[u8]) {
        let Req::History {
            topic,
            since,
            epoch: asked_epoch,
            limit,
            probe,
        } = req
        else {
            return;
        };
        let value = serde_json::from_slice::<Value>(body).unwrap_or_default();
        let fail = |sim: &mut Sim, what: String| {
            let value = Shown(&value);
            sim.fail(format!(
                "c{c}: history of {topic} since {since:?} epoch {asked_epoch:?}: {what}: {value}"
            ))
        };
        let Some(rule) = self.stream_rule().filter(|_| is_stream_topic(topic)) else {
            if status != 404 {
                fail(self, format!("{status} for a topic without history"));
            }
            return;
        };
        let offset = value.get("offset").and_then(Value::as_u64);
        let epoch = value
            .get("epoch")
            .and_then(Value::as_str)
            .map(str::to_string);
        let (Some(offset), Some(epoch)) = (offset, epoch) else {
            return fail(self, format!("{status} without offset and epoch"));
        };
        let stale = asked_epoch.as_ref().is_some_and(|a| *a != epoch);
        match status {
            200 => {
                self.history_ok += 1;
                if stale {
                    return fail(self, format!("200, though the stream is in epoch {epoch}"));
                }
                let limit = limit.unwrap_or(rule.size).clamp(1, rule.size.max(1));
                let mut offsets = Vec::new();
                let publications = value.get("publications").and_then(Value::as_array);
                for p in publications.into_iter().flatten() {
                    let o = p.get("offset").and_then(Value::as_u64);
                    let id = p
                        .get("payload")
                        .and_then(|p| p.get("id"))
                        .and_then(Value::as_u64)
                        .map(|id| id as usize);
                    let known = id.and_then(|id| self.publishes.get(id));
                    let (Some(o), Some(id)) = (o, id) else {
                        return fail(self, format!("a publication without offset or id: {p}"));
                    };
                    let fits = p.get("type").and_then(Value::as_str) == Some("push")
                        && p.get("topic").and_then(Value::as_str) == Some(topic.as_str())
                        && p.get("replay").is_none()
                        && known.is_some_and(|k| k.topic == *topic && k.user.is_none());
                    if !fits {
                        return fail(self, format!("publication {p} is not of this stream"));
                    }
                    offsets.push(o);
                    self.record(topic, &epoch, o, id, &format!("history to c{c}"));
                }
                let consecutive = offsets.windows(2).all(|w| w[1] == w[0] + 1);
                let first_ok = match (since, offsets.first()) {
                    (Some(n), Some(&first)) => first == n + 1,
                    (Some(n), None) => *n == offset,
                    (None, _) => true,
                };
                // A page cut at its bytes names the `since` of the next:
                // its own last publication.
                let next = value.get("next").and_then(Value::as_u64);
                let next_ok = next.map_or(true, |n| offsets.last() == Some(&n) && n < offset);
                // The newest kept publication is the stream's latest: when
                // it expires, everything older has too. A page from `since`
                // may stop at the limit; the latest ones end at the offset,
                // unless the page was cut.
                let last_ok = (since.is_some() && offsets.len() == limit)
                    || next.is_some()
                    || offsets.last().map_or(true, |&l| l == offset);
                if !consecutive || !first_ok || !last_ok || !next_ok || offsets.len() > limit {
                    return fail(self, format!("publications {offsets:?} (limit {limit})"));
                }
                if since.is_some_and(|n| n > offset) {
                    return fail(self, "200 for a position ahead of the stream".into());
                }
                let seen = self.ledger.latest(topic, &epoch).unwrap_or(0);
                if *probe && seen > offset {
                    fail(
                        self,
                        format!("the stream is at {offset}, but {seen} was read"),
                    );
                }
            }
            410 => {
                self.history_gone += 1;
                if stale {
                    return;
                }
                match since {
                    None => fail(self, "410 for the latest publications".into()),
                    Some(n) if self.must_recover(topic, &epoch, *n, offset) => {
                        fail(self, format!("410, but {n} is in history (at {offset})"))
                    }
                    Some(_) => {}
                }
            }
            _ => fail(self, format!("status {status}")),
        }
    }

    /// At quiescence: every recovery's replay and every last-values replay
    /// has arrived whole.
    pub(super) fn check_stream_replays(&self) -> Result<(), String> {
        for (c, client) in self.clients.iter().enumerate() {
            if client.ended.is_some() || client.close_received.is_some() {
                continue;
            }
            for (topic, view) in &client.streams {
                let Some(active) = &view.active else {
                    continue;
                };
                if active.recovered == Some(true) && active.next <= active.at {
                    return Err(format!(
                        "c{c} recovered {topic} up to {}, but its replay stopped at {}",
                        active.at,
                        active.next - 1
                    ));
                }
                if active.marked > 0 && active.last_marked != Some(active.at) {
                    return Err(format!(
                        "c{c}: the marked replays of {topic} end at {:?}, not at {}",
                        active.last_marked, active.at
                    ));
                }
            }
        }
        Ok(())
    }

    /// At quiescence, asks each stream's history, each query on a fresh
    /// connection: the latest publications, from a known position of the
    /// last epoch seen, and now and then from an epoch that never was.
    pub(super) fn probe_history(&mut self) -> Result<(), String> {
        let size = self.stream_rule().map_or(0, |r| r.size);
        for i in 0..self.stream_topics() {
            let topic = format!("s:{i}");
            let query = |since, epoch| HttpCall::History {
                topic: topic.clone(),
                since,
                epoch,
                limit: None,
            };
            // A few queries: each is a connection to settle, and settles are
            // most of a run's time.
            let mut calls = vec![query(None, None)];
            let known = self.ledger.positions(&topic);
            if let Some((latest, epoch)) = known.into_iter().next_back() {
                let back = self.pick(size + 2) as u64;
                calls.push(query(Some(latest.saturating_sub(back)), Some(epoch)));
            }
            if self.one_in(3) {
                calls.push(query(Some(0), Some(GARBAGE_EPOCH.to_string())));
            }
            // One request per connection: a history answer may pass the
            // small outbound budget, and an overflowed connection's answers
            // cannot be told apart.
            for call in calls {
                let s = self.pick(self.shards.len());
                let Some(c) = self.connect(s, format!("history probe {topic}")) else {
                    continue;
                };
                self.write_http(c, call, true, Some(0));
            }
        }
        self.settle()
    }

    // ---- inspection for scenarios ---------------------------------------------

    /// The shard that orders stream `topic`: the state's hash of the name
    /// (SipHash with fixed keys, as `ShardState::home_of`), so a script can
    /// put a subscriber away from the home.
    pub fn home_of(&self, topic: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        topic.hash(&mut hasher);
        (hasher.finish() % self.shards.len() as u64) as usize
    }

    /// A stream topic of this run whose home is shard `home`.
    pub fn stream_topic_homed_on(&self, home: usize) -> Option<String> {
        (0..self.stream_topics())
            .map(|i| format!("s:{i}"))
            .find(|t| self.home_of(t) == home)
    }

    /// Where client `c` stands in stream `topic` (the offset of its last
    /// live push, else of its `subscribed`, and the epoch), if subscribed.
    pub fn stream_position(&self, c: usize, topic: &str) -> Option<(u64, String)> {
        self.clients[c].streams.get(topic)?.position()
    }

    /// The `recovered` flag of client `c`'s `subscribed` for `topic`:
    /// `None` if not subscribed, `Some(None)` if the reply had none.
    pub fn recovered(&self, c: usize, topic: &str) -> Option<Option<bool>> {
        let active = self.clients[c].streams.get(topic)?.active.as_ref()?;
        Some(active.recovered)
    }

    // ---- choosing stream traffic ---------------------------------------------

    /// A position in `topic` to subscribe or query from: mostly near what
    /// the run has seen, sometimes ahead of it, evicted, or of no epoch.
    pub(super) fn random_position(&mut self, topic: &str) -> Since {
        let known = self.ledger.positions(topic);
        let size = self.stream_rule().map_or(4, |r| r.size as u64);
        let Some((latest, epoch)) = self.pick_from(&known) else {
            return (self.pick(5) as u64, GARBAGE_EPOCH.to_string());
        };
        match self.pick(8) {
            0 => (latest + 1 + self.pick(3) as u64, epoch),
            1 => (latest, GARBAGE_EPOCH.to_string()),
            2 => (0, epoch),
            _ => (
                latest.saturating_sub(self.pick(size as usize + 3) as u64),
                epoch,
            ),
        }
    }

    /// A history query for a stream topic (now and then a plain one).
    pub(super) fn random_history_call(&mut self) -> HttpCall {
        let topic = if self.one_in(8) {
            format!("t{}", self.pick(self.params.topics))
        } else {
            format!("s:{}", self.pick(self.stream_topics().max(1)))
        };
        let (offset, epoch) = self.random_position(&topic);
        let (since, epoch) = match self.pick(4) {
            0 => (None, None),
            1 => (Some(offset), None),
            _ => (Some(offset), Some(epoch)),
        };
        let limit = self.one_in(4).then(|| self.pick(6));
        HttpCall::History {
            topic,
            since,
            epoch,
            limit,
        }
    }

    /// Keeps client `c`'s stream positions for a reconnect (once).
    pub(super) fn keep_positions(&mut self, c: usize) {
        let client = &mut self.clients[c];
        if client.positions_kept || !client.ws {
            return;
        }
        client.positions_kept = true;
        let positions = client.stream_positions();
        if !positions.is_empty() {
            self.resumes.push(positions);
        }
    }

    /// A client that left comes back on a random shard and resubscribes from
    /// its positions (some spoiled: ahead, evicted, of a stale epoch), in
    /// frames pipelined behind its upgrade or once upgraded.
    pub(super) fn open_resume(&mut self) {
        let r = self.pick(self.resumes.len());
        let positions = self.resumes.swap_remove(r);
        let mut resume = Vec::with_capacity(positions.len());
        for (topic, (offset, epoch)) in positions {
            let since = match self.pick(12) {
                0 => Some((offset + 1 + self.pick(3) as u64, epoch)),
                1 => Some((offset, GARBAGE_EPOCH.to_string())),
                2 => Some((offset.saturating_sub(4 + self.pick(8) as u64), epoch)),
                3 => None,
                _ => Some((offset, epoch)),
            };
            resume.push((topic, since));
        }
        let s = self.pick(self.shards.len());
        if self.one_in(2) {
            let calls = self.resubscribe_calls(resume);
            self.open_ws(s, super::Upgrade::Anonymous, calls);
        } else if let Some(c) = self.open_ws(s, super::Upgrade::Anonymous, Vec::new()) {
            self.clients[c].resume = resume;
        }
    }

    /// The messages that resubscribe from `positions`: one `{"topics":[..]}`
    /// or a subscribe each.
    pub(super) fn resubscribe_calls(
        &mut self,
        positions: Vec<(String, Option<Since>)>,
    ) -> Vec<WsCall> {
        if positions.len() <= MAX_SUBSCRIPTIONS && self.one_in(3) {
            return vec![WsCall::SetTopicsAt(positions)];
        }
        positions
            .into_iter()
            .map(|(topic, since)| match since {
                Some(since) => WsCall::SubscribeAt(topic, since),
                None => WsCall::Subscribe(topic),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscribed_answers_the_oldest_creating_subscribe_not_dropped_since() {
        let mut view = StreamView::default();
        view.sent_creating(Some((3, "e".into())));
        view.sent_unsubscribe();
        view.sent_creating(None);
        view.read_unsubscribed();
        assert_eq!(view.answered(), Some(None), "the first died with its drop");
        assert_eq!(view.answered(), None);
    }

    #[test]
    fn an_offset_names_one_publication_and_a_publication_one_offset() {
        let mut ledger = Ledger::default();
        ledger.record("s:0", "e", 1, 7, "a").unwrap();
        ledger.record("s:0", "e", 1, 7, "b").unwrap();
        assert!(ledger.record("s:0", "e", 1, 8, "c").is_err());
        assert!(ledger.record("s:0", "e", 2, 7, "d").is_err());
        ledger.record("s:0", "f", 1, 9, "e").unwrap();
        assert_eq!(ledger.latest("s:0", "e"), Some(1));
        assert_eq!(ledger.positions("s:0"), [(1, "e".into()), (1, "f".into())]);
    }

    #[test]
    fn only_positions_certainly_kept_must_recover() {
        let rule = Rule {
            size: 4,
            ttl: Duration::from_secs(5),
            byte_bound: false,
        };
        let at = |_| Some(Duration::from_secs(10));
        let now = Duration::from_secs(12);
        assert!(rule.must_recover(7, 7, now, |_| None));
        assert!(rule.must_recover(3, 7, now, at));
        assert!(!rule.must_recover(2, 7, now, at), "evicted by size");
        assert!(!rule.must_recover(8, 7, now, at), "ahead of the stream");
        assert!(!rule.must_recover(5, 7, Duration::from_secs(15), at), "TTL");
        assert!(!rule.must_recover(5, 7, now, |_| None), "unknown");
    }
}
