//! The connect proxy: a `/ws`, `/sse` or `/stream` request that brings no
//! valid token is parked (`Deferred::Connect`) while the application
//! backend is asked who it is; the backend's grant names the user (and a
//! WebSocket's starting topics, and when the connection expires), or its
//! refusal answers the request with the status it gave.
//!
//! A connection whose grant had an `expire_at` is closed then (code 4001
//! on a WebSocket, a `close` event on a stream), unless `[proxy]
//! refresh_url` renews it: a quarter of its lifetime before (at most 30 s
//! before) the backend is asked again, and its answer sets the next
//! `expire_at`, or refuses (code 4003, `connection refused on refresh`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::event_stream::Format;
use crate::protocol::http::{error_json, Request};
use crate::proxy::{CallKind, Grant, Verdict};
use crate::shard::key::ConnKey;

use super::conn::{Deferred, Reply, WsKind};
use super::proxied::{refusal, WaitingFor};
use super::users::Opening;
use super::ShardState;

/// The close code of a connection whose grant expired.
pub(crate) const EXPIRED: u16 = 4001;
/// The close code of a connection the backend refused to renew.
pub(crate) const REFRESH_REFUSED: u16 = 4003;
/// A refresh is asked this long before the expiry at most.
const MAX_REFRESH_LEAD: Duration = Duration::from_secs(30);

/// Which kind of connection a parked request opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectRoute {
    Ws,
    Stream(Format),
}

/// What happens to a granted connection next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Ask the backend to renew the grant, which ends at `expires`.
    Refresh { expires: Instant },
    /// Close it.
    Expire,
}

/// When granted connections must be renewed or closed, soonest first, and
/// each one's entry (so a connection that closes first is forgotten at
/// once).
#[derive(Default)]
pub(super) struct Expiries {
    by_time: BTreeSet<(Instant, ConnKey)>,
    by_conn: HashMap<ConnKey, (Instant, Next)>,
}

impl Expiries {
    fn insert(&mut self, key: ConnKey, at: Instant, next: Next) {
        if let Some((old, _)) = self.by_conn.insert(key, (at, next)) {
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
    }

    pub(super) fn forget(&mut self, key: ConnKey) {
        if let Some((at, _)) = self.by_conn.remove(&key) {
            self.by_time.remove(&(at, key));
        }
    }

    /// Connections whose time has come, removed, with what is due.
    fn due(&mut self, now: Instant) -> Vec<(ConnKey, Next)> {
        let mut due = Vec::new();
        while let Some(&(at, key)) = self.by_time.first() {
            if at > now {
                break;
            }
            self.by_time.pop_first();
            if let Some((_, next)) = self.by_conn.remove(&key) {
                due.push((key, next));
            }
        }
        due
    }

    pub(super) fn len(&self) -> usize {
        self.by_conn.len()
    }

    fn contains(&self, key: ConnKey) -> bool {
        self.by_conn.contains_key(&key)
    }
}

impl ShardState {
    /// Whether `request` must be identified by the backend: the connect
    /// proxy runs and the request brings no valid token.
    pub(super) fn connect_needs_backend(&self, request: &Request) -> bool {
        let proxied = self
            .config()
            .proxy
            .as_ref()
            .is_some_and(|p| p.connect_url.is_some());
        if !proxied {
            return false;
        }
        let auth = &self.shared.auth;
        if !auth.jwt_enabled() {
            return true;
        }
        let token = request
            .bearer_token()
            .map(str::to_string)
            .or_else(|| request.query_param("token"));
        auth.verify_token(token.as_deref().unwrap_or("")).is_err()
    }

    /// Parks `request` and asks the backend about it.
    pub(super) fn ask_to_connect(
        &mut self,
        key: ConnKey,
        request: Request,
        route: ConnectRoute,
        cors: Option<&str>,
    ) {
        let forward = &self
            .config()
            .proxy
            .as_ref()
            .expect("connect_needs_backend checked [proxy]")
            .forward_headers;
        let headers: serde_json::Map<String, serde_json::Value> = forward
            .iter()
            .filter_map(|name| Some((name.clone(), request.header(name)?.into())))
            .collect();
        let mut body = self.call_body(key);
        body["transport"] = match route {
            ConnectRoute::Ws => "websocket",
            ConnectRoute::Stream(Format::Sse) => "sse",
            ConnectRoute::Stream(Format::Ndjson) => "ndjson",
        }
        .into();
        body["headers"] = headers.into();
        body["query"] = request.query().into();
        // Accepted with multishot accept on direct descriptors, a
        // connection's peer address is not known (`x-forwarded-for` and
        // `x-real-ip` are forwarded by default).
        body["remote_addr"] = serde_json::Value::Null;
        match self.ask(key, CallKind::Connect, WaitingFor::Connection, body) {
            Ok(ticket) => self.park(
                key,
                Deferred::Connect {
                    ticket,
                    request: Box::new(request),
                    route,
                    cors: cors.map(Box::from),
                },
            ),
            Err(why) => {
                let reply = Reply::to(&request, cors);
                self.respond(key, reply.answer(error_json(503, why)));
            }
        }
    }

    /// The backend's verdict on the connection parked under `ticket`.
    pub(super) fn connection_verdict(&mut self, key: ConnKey, ticket: u64, verdict: Verdict) {
        let parked = self.take_deferred(
            key,
            |d| matches!(d, Deferred::Connect { ticket: t, .. } if *t == ticket),
        );
        // Gone: the connection closed meanwhile.
        let Some(Deferred::Connect {
            request,
            route,
            cors,
            ..
        }) = parked
        else {
            return;
        };
        let reply = Reply::to(&request, cors.as_deref());
        match verdict {
            Verdict::Allowed(grant) => self.connect_granted(key, &request, route, cors, grant),
            Verdict::Refused { code, message } => {
                // The backend's status, or 403 for an error code that is none.
                let status = u16::try_from(code)
                    .ok()
                    .filter(|c| (400..=599).contains(c))
                    .unwrap_or(403);
                let why = refusal("connection", Verdict::Refused { code, message });
                self.answer_parked(key, reply.answer(error_json(status, &why)));
            }
            failed => {
                let why = refusal("connection", failed);
                self.answer_parked(key, reply.answer(error_json(503, &why)));
            }
        }
    }

    /// Opens the connection the backend granted, as the user it named.
    fn connect_granted(
        &mut self,
        key: ConnKey,
        request: &Request,
        route: ConnectRoute,
        cors: Option<Box<str>>,
        grant: Grant,
    ) {
        let reply = Reply::to(request, cors.as_deref());
        let max = self.config().limits.max_name_bytes;
        let user = match grant.user {
            Some(user) => match crate::protocol::message::check_name(&user, "user", max) {
                Ok(()) => Some(Arc::<str>::from(user)),
                Err(e) => {
                    let why = format!("the backend granted an invalid user: {e}");
                    return self.answer_parked(key, reply.answer(error_json(502, &why)));
                }
            },
            None => None,
        };
        if let Some(meta) = grant.meta {
            let max = self.config().limits.max_presence_meta_bytes;
            // It is shown inside the member's meta: room for the rest.
            if meta.len() + 64 > max || !meta.trim_start().starts_with('{') {
                let why = format!(
                    "the backend granted a meta that is not a JSON object within {} bytes",
                    max.saturating_sub(64)
                );
                return self.answer_parked(key, reply.answer(error_json(502, &why)));
            }
            self.set_conn_info(key, Arc::from(meta));
        }
        match route {
            ConnectRoute::Ws => {
                let mut opening = Opening::anonymous(WsKind::Relay);
                opening.user = user;
                opening.topics = Arc::from(grant.topics);
                self.upgrade_request(key, request, opening);
            }
            ConnectRoute::Stream(format) => {
                if let Some(response) =
                    self.event_stream_request_as(key, request, format, cors.as_deref(), user)
                {
                    return self.answer_parked(key, reply.answer(response));
                }
            }
        }
        self.schedule_expiry(key, grant.expires_in);
        // What the client sent after its request waited with it.
        self.resume_input(key);
    }

    /// Schedules the end (or, with `refresh_url`, the renewal) of a grant
    /// that lasts `expires_in`; none for a grant without `expire_at`.
    fn schedule_expiry(&mut self, key: ConnKey, expires_in: Option<Duration>) {
        let Some(expires_in) = expires_in else {
            return self.connect_expiries.forget(key);
        };
        let expires = self.now + expires_in;
        let refreshes = self
            .config()
            .proxy
            .as_ref()
            .is_some_and(|p| p.refresh_url.is_some());
        if refreshes {
            let lead = (expires_in / 4).min(MAX_REFRESH_LEAD);
            let at = expires - lead;
            self.connect_expiries
                .insert(key, at, Next::Refresh { expires });
        } else {
            self.connect_expiries.insert(key, expires, Next::Expire);
        }
    }

    /// Renews or closes the granted connections whose time has come.
    pub(super) fn expire_granted_connections(&mut self) {
        for (key, next) in self.connect_expiries.due(self.now) {
            match next {
                Next::Expire => self.close_ws(key, EXPIRED, "connection expired"),
                Next::Refresh { expires } => {
                    // Closed at `expires` unless the answer renews it first.
                    self.connect_expiries.insert(key, expires, Next::Expire);
                    let body = self.call_body(key);
                    if self
                        .ask(key, CallKind::Refresh, WaitingFor::Refresh, body)
                        .is_err()
                    {
                        // No room to ask now: the grant runs out as it was.
                        continue;
                    }
                }
            }
        }
    }

    /// The backend's answer to a refresh of connection `key`.
    pub(super) fn refresh_verdict(&mut self, key: ConnKey, verdict: Verdict) {
        if !self.connect_expiries.contains(key) {
            // It closed, or expired before the answer came.
            return;
        }
        match verdict {
            Verdict::Allowed(grant) => self.schedule_expiry(key, grant.expires_in),
            refused => {
                self.connect_expiries.forget(key);
                let why = refusal("connection", refused);
                tracing::debug!("refresh refused: {why}");
                self.close_ws(key, REFRESH_REFUSED, "connection refused on refresh");
            }
        }
    }
}
