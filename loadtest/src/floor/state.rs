//! The floor server's state, sans-IO: connections by direct descriptor,
//! topics and their subscribers, and which connections have bytes to send.
//! The driver (`main.rs`) lends it received bytes and asks it what to send.

use crate::wire::{self, Frame, Request};
use std::collections::HashMap;

/// Bytes a connection may have queued before it is dropped: the floor never
/// meets a slow consumer in a sane run, but must not grow without bound.
const MAX_QUEUED: usize = 64 << 20;

/// Bytes a receive may fill at once.
pub(crate) const RECV_BYTES: usize = 16 * 1024;

/// One accepted connection.
#[derive(Default)]
pub(crate) struct Conn {
    /// Received bytes not yet read as a whole request or frame.
    pub(crate) input: Vec<u8>,
    /// Bytes queued since the last send was handed to the kernel.
    pub(crate) queued: Vec<u8>,
    /// Bytes handed to the kernel; unmoved until their send completes.
    pub(crate) sending: Vec<u8>,
    /// How much of `sending` the kernel has taken.
    pub(crate) sent: usize,
    /// A send is in the kernel.
    pub(crate) send_in_flight: bool,
    /// A receive is in the kernel.
    pub(crate) recv_in_flight: bool,
    /// Upgraded to WebSocket.
    websocket: bool,
    /// Topics this connection is subscribed to.
    topics: Vec<u32>,
    /// Done: closed once nothing of it is in the kernel.
    pub(crate) closing: bool,
}

/// Every connection and topic of the one thread.
#[derive(Default)]
pub(crate) struct Floor {
    conns: Vec<Option<Conn>>,
    topics: HashMap<Vec<u8>, u32>,
    subscribers: Vec<Vec<u32>>,
    /// Connections that queued bytes while no send of theirs was in flight.
    pub(crate) ready: Vec<u32>,
}

impl Floor {
    pub(crate) fn conn(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// A connection accepted into direct descriptor `id`.
    pub(crate) fn accepted(&mut self, id: u32) {
        let at = id as usize;
        if self.conns.len() <= at {
            self.conns.resize_with(at + 1, || None);
        }
        debug_assert!(self.conns[at].is_none(), "descriptor {id} handed out twice");
        self.conns[at] = Some(Conn::default());
    }

    /// Reads the whole requests and frames `id` has received; marks it
    /// closing when it sent something this floor does not read.
    pub(crate) fn received(&mut self, id: u32) {
        let Some(conn) = self.conn(id) else { return };
        let mut input = std::mem::take(&mut conn.input);
        let websocket = conn.websocket;
        let used = if websocket {
            self.read_frames(id, &input)
        } else {
            self.read_requests(id, &input)
        };
        match used {
            Some(used) => {
                input.drain(..used);
                if let Some(conn) = self.conn(id) {
                    conn.input = input;
                }
            }
            None => self.close(id),
        }
    }

    /// Bytes of `input` read as whole HTTP requests, or `None` on bad input.
    fn read_requests(&mut self, id: u32, input: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            match wire::request(&input[at..]) {
                Request::Partial => return Some(at),
                Request::Bad => return None,
                Request::Upgrade { key, used } => {
                    let answer = wire::upgrade_response(key);
                    self.queue(id, &answer);
                    self.conn(id)?.websocket = true;
                    at += used;
                    // What follows the upgrade is frames.
                    return Some(at + self.read_frames(id, &input[at..])?);
                }
                Request::Publish {
                    topic,
                    message,
                    used,
                } => {
                    self.publish(topic, message);
                    self.queue(id, wire::ACCEPTED);
                    at += used;
                }
                Request::Other { used } => {
                    self.queue(id, wire::OK);
                    at += used;
                }
            }
        }
    }

    /// Bytes of `input` read as whole frames, or `None` on bad input or a close.
    fn read_frames(&mut self, id: u32, input: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            match wire::frame(&input[at..]) {
                Frame::Partial => return Some(at),
                Frame::Bad => return None,
                Frame::Whole {
                    opcode,
                    payload,
                    used,
                } => {
                    at += used;
                    match opcode {
                        8 => return None,
                        9 => {
                            let mut pong = Vec::new();
                            wire::server_frame(&mut pong, 10, &payload);
                            self.queue(id, &pong);
                        }
                        1 => {
                            if let Some(topic) = wire::subscribe_topic(&payload) {
                                self.subscribe(id, topic);
                                self.queue(id, &wire::subscribed_frame(topic));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn subscribe(&mut self, id: u32, topic: &[u8]) {
        let next = self.subscribers.len() as u32;
        let t = *self.topics.entry(topic.to_vec()).or_insert(next);
        if t == next {
            self.subscribers.push(Vec::new());
        }
        let Some(conn) = self.conn(id) else { return };
        if !conn.topics.contains(&t) {
            conn.topics.push(t);
            self.subscribers[t as usize].push(id);
        }
    }

    /// Frames the publication once and queues the same bytes for every subscriber.
    fn publish(&mut self, topic: &[u8], message: Option<&[u8]>) {
        let Some(&t) = self.topics.get(topic) else {
            return;
        };
        let frame = wire::push_frame(topic, message);
        let subscribers = std::mem::take(&mut self.subscribers[t as usize]);
        for &sub in &subscribers {
            self.queue(sub, &frame);
        }
        self.subscribers[t as usize] = subscribers;
    }

    fn queue(&mut self, id: u32, bytes: &[u8]) {
        let Some(conn) = self.conn(id) else { return };
        if conn.closing {
            return;
        }
        if conn.queued.len() + bytes.len() > MAX_QUEUED {
            self.close(id);
            return;
        }
        let was_idle = conn.queued.is_empty() && !conn.send_in_flight;
        conn.queued.extend_from_slice(bytes);
        if was_idle {
            self.ready.push(id);
        }
    }

    /// Marks `id` closing and takes it out of its topics.
    pub(crate) fn close(&mut self, id: u32) {
        let Some(conn) = self.conn(id) else { return };
        conn.closing = true;
        conn.queued.clear();
        for t in std::mem::take(&mut conn.topics) {
            let subs = &mut self.subscribers[t as usize];
            if let Some(i) = subs.iter().position(|&s| s == id) {
                subs.swap_remove(i);
            }
        }
    }

    /// Forgets a connection whose descriptor is being closed.
    pub(crate) fn remove(&mut self, id: u32) {
        debug_assert!(self.conn(id).is_some_and(|c| c.closing));
        self.conns[id as usize] = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_text(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        out
    }

    fn feed(floor: &mut Floor, id: u32, bytes: &[u8]) {
        floor.conn(id).unwrap().input.extend_from_slice(bytes);
        floor.received(id);
    }

    #[test]
    fn a_publication_reaches_each_subscriber_once_and_no_one_else() {
        let mut floor = Floor::default();
        let upgrade = b"GET /ws HTTP/1.1\r\nSec-WebSocket-Key: a2V5\r\n\r\n";
        for id in 0..3 {
            floor.accepted(id);
            let mut bytes = upgrade.to_vec();
            if id < 2 {
                bytes.extend(masked_text(br#"{"type":"subscribe","topic":"t"}"#));
            }
            feed(&mut floor, id, &bytes);
            floor.conn(id).unwrap().queued.clear();
        }
        floor.ready.clear();
        floor.accepted(7);
        let body = br#"{"topic":"t","message":"hello"}"#;
        let post = format!(
            "POST /publish HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        feed(&mut floor, 7, &[post.as_bytes(), body].concat());
        let push = wire::push_frame(b"t", Some(b"hello"));
        assert_eq!(floor.conn(0).unwrap().queued, push);
        assert_eq!(floor.conn(1).unwrap().queued, push);
        assert!(floor.conn(2).unwrap().queued.is_empty());
        assert_eq!(floor.conn(7).unwrap().queued, wire::ACCEPTED);
        assert_eq!(floor.ready, vec![0, 1, 7]);

        floor.close(0);
        feed(&mut floor, 7, &[post.as_bytes(), body].concat());
        assert!(floor.conn(0).unwrap().queued.is_empty());
        assert_eq!(floor.conn(1).unwrap().queued.len(), 2 * push.len());
    }
}
