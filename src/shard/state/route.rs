//! Which endpoint a request path names, decided on the path's segments.
//!
//! The path arrives percent-decoded. It is split on `/` once, and every
//! route is a pattern over the segments, so no route slices the path at byte
//! offsets computed from a prefix and a suffix: a path too short for a
//! route simply does not match it (`/topics/history` once sliced `[8..7]`
//! and aborted the process). Parameters borrow from the path.

use std::borrow::Cow;

use crate::protocol::http::Method;

/// An endpoint and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route<'a> {
    /// `/`: the chat page.
    Index,
    /// `/health`.
    Health,
    /// `/metrics`.
    Metrics,
    /// `/publish`.
    Publish,
    /// `/register`.
    Register,
    /// `/register/{id}`.
    Registration(&'a str),
    /// `/ws`.
    Ws,
    /// `/ws/{id}`: a registered client's upgrade.
    WsRegistered(&'a str),
    /// `/chat`.
    Chat,
    /// `/echo`.
    Echo,
    /// `/sse`: Server-Sent Events.
    Sse,
    /// `/stream`: newline-delimited JSON.
    Stream,
    /// `/topics/{topic}/history`; a topic may itself contain `/`.
    History(Cow<'a, str>),
    /// `/topics/{topic}/presence`.
    Presence(Cow<'a, str>),
    /// `/app/{key}`: a Pusher client's WebSocket.
    PusherApp(&'a str),
    /// `/apps/{id}/events`: Pusher's HTTP API, triggering an event.
    PusherEvents(&'a str),
    /// `/apps/{id}/batch_events`: several events at once.
    PusherBatchEvents(&'a str),
    /// `/apps/{id}/users/{user}/terminate_connections`: closes a signed-in
    /// user's connections.
    PusherTerminate(&'a str, &'a str),
    /// `/users/{user}/terminate_connections`: the same, the app named by
    /// its `auth_key` (as Pusher's Python library asks).
    PusherTerminateByKey(&'a str),
    /// `/apps/{id}/channels`: the app's occupied channels.
    PusherChannels(&'a str),
    /// `/apps/{id}/channels/{channel}`: whether it is occupied, its counts.
    PusherChannel(&'a str, &'a str),
    /// `/apps/{id}/channels/{channel}/users`: a presence channel's users.
    PusherUsers(&'a str, &'a str),
    /// Nothing here.
    NotFound,
}

impl<'a> Route<'a> {
    /// The route `path` (decoded, without the query) names.
    pub(crate) fn parse(path: &'a str) -> Route<'a> {
        let Some(rest) = path.strip_prefix('/') else {
            return Route::NotFound;
        };
        let mut segments = rest.split('/');
        let first = segments.next().unwrap_or("");
        let second = segments.next();
        let more = segments.next().is_some();
        match (first, second, more) {
            ("", None, _) => Route::Index,
            ("health", None, _) => Route::Health,
            ("metrics", None, _) => Route::Metrics,
            ("publish", None, _) => Route::Publish,
            ("register", None, _) => Route::Register,
            ("register", Some(id), false) if !id.is_empty() => Route::Registration(id),
            ("ws", None, _) => Route::Ws,
            ("ws", Some(id), false) if !id.is_empty() => Route::WsRegistered(id),
            ("chat", None, _) => Route::Chat,
            ("echo", None, _) => Route::Echo,
            ("sse", None, _) => Route::Sse,
            ("stream", None, _) => Route::Stream,
            ("topics", Some(_), true) => topic_route(rest),
            ("app", Some(key), false) if !key.is_empty() => Route::PusherApp(key),
            ("users", Some(user), true)
                if !user.is_empty() && rest.split('/').skip(2).eq(["terminate_connections"]) =>
            {
                Route::PusherTerminateByKey(user)
            }
            ("apps", Some(id), true) if !id.is_empty() => {
                let tail: Vec<&str> = rest.split('/').skip(2).take(4).collect();
                match tail[..] {
                    ["events"] => Route::PusherEvents(id),
                    ["batch_events"] => Route::PusherBatchEvents(id),
                    ["users", user, "terminate_connections"] if !user.is_empty() => {
                        Route::PusherTerminate(id, user)
                    }
                    ["channels"] => Route::PusherChannels(id),
                    ["channels", channel] if !channel.is_empty() => {
                        Route::PusherChannel(id, channel)
                    }
                    ["channels", channel, "users"] if !channel.is_empty() => {
                        Route::PusherUsers(id, channel)
                    }
                    _ => Route::NotFound,
                }
            }
            _ => Route::NotFound,
        }
    }

    /// The methods this route answers, for `Allow` on a 405.
    pub(crate) fn allowed(&self) -> &'static str {
        match self {
            Route::Health => "GET, HEAD",
            Route::Publish
            | Route::Register
            | Route::PusherEvents(_)
            | Route::PusherBatchEvents(_)
            | Route::PusherTerminate(..)
            | Route::PusherTerminateByKey(_) => "POST",
            Route::Registration(_) => "DELETE",
            Route::NotFound => "",
            _ => "GET",
        }
    }

    /// Whether the route answers `method`.
    pub(crate) fn allows(&self, method: Method) -> bool {
        match self {
            Route::Health => matches!(method, Method::Get | Method::Head),
            Route::Publish
            | Route::Register
            | Route::PusherEvents(_)
            | Route::PusherBatchEvents(_)
            | Route::PusherTerminate(..)
            | Route::PusherTerminateByKey(_) => method == Method::Post,
            Route::Registration(_) => method == Method::Delete,
            Route::NotFound => false,
            _ => method == Method::Get,
        }
    }

    /// Whether a `GET` of the route opens a long-lived connection (a
    /// WebSocket or an event stream): what a page of another site must
    /// not do without being allowed.
    pub(crate) fn opens_connection(&self) -> bool {
        matches!(
            self,
            Route::Ws
                | Route::WsRegistered(_)
                | Route::Chat
                | Route::Echo
                | Route::Sse
                | Route::Stream
                | Route::PusherApp(_)
        )
    }

    /// Whether the route changes what the node holds or delivers, and so
    /// needs the API key when one is configured (reads of a topic check it
    /// themselves, after their own 404s).
    pub(crate) fn needs_api_key(&self) -> bool {
        matches!(
            self,
            Route::Publish | Route::Register | Route::Registration(_)
        )
    }
}

/// `topics/{topic}/history` or `topics/{topic}/presence` (without the
/// leading `/`); `rest` has at least three segments.
fn topic_route(rest: &str) -> Route<'_> {
    let Some((head, last)) = rest.rsplit_once('/') else {
        return Route::NotFound;
    };
    // At least three segments, so `head` is `topics/{topic}` with a topic
    // that may be empty (refused later as a bad topic name) or contain `/`.
    let Some(topic) = head.strip_prefix("topics/") else {
        return Route::NotFound;
    };
    match last {
        "history" => Route::History(Cow::Borrowed(topic)),
        "presence" => Route::Presence(Cow::Borrowed(topic)),
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_endpoint_is_found_by_its_segments() {
        assert_eq!(Route::parse("/"), Route::Index);
        assert_eq!(Route::parse("/health"), Route::Health);
        assert_eq!(Route::parse("/register/abc"), Route::Registration("abc"));
        assert_eq!(Route::parse("/ws/abc"), Route::WsRegistered("abc"));
        assert_eq!(
            Route::parse("/topics/orders:eu/history"),
            Route::History("orders:eu".into())
        );
        assert_eq!(
            Route::parse("/topics/a/b/presence"),
            Route::Presence("a/b".into()),
            "a topic may contain slashes"
        );
    }

    #[test]
    fn paths_too_short_for_a_route_are_not_found_instead_of_sliced() {
        for path in [
            "/topics/history",
            "/topics/presence",
            "/topics/",
            "/topics",
            "/ws/",
            "/register/",
            "/ws/a/b",
            "/health/",
            "",
            "health",
            "*",
        ] {
            assert_eq!(Route::parse(path), Route::NotFound, "{path:?}");
        }
        assert_eq!(
            Route::parse("/topics//history"),
            Route::History("".into()),
            "an empty topic reaches the topic check, which refuses it"
        );
    }

    #[test]
    fn methods_are_checked_per_route() {
        assert!(Route::Health.allows(Method::Head));
        assert!(!Route::Publish.allows(Method::Get));
        assert_eq!(Route::Registration("x").allowed(), "DELETE");
        assert!(Route::Publish.needs_api_key() && !Route::History("t".into()).needs_api_key());
    }

    proptest! {
        /// Any path built from the routes' own pieces parses without a
        /// panic, and a topic route's topic is a piece of the path.
        #[test]
        fn any_path_of_route_pieces_parses(
            pieces in proptest::collection::vec(
                prop_oneof![
                    Just("/"), Just("topics"), Just("/topics/"), Just("history"),
                    Just("/history"), Just("presence"), Just("/presence"), Just("ws"),
                    Just("/ws/"), Just("register"), Just("/register/"), Just("health"),
                    Just("é"), Just("a"), Just(""), Just("//"),
                ],
                0..10,
            )
        ) {
            let path: String = pieces.concat();
            match Route::parse(&path) {
                Route::History(topic) | Route::Presence(topic) => {
                    prop_assert!(path.contains(topic.as_ref()));
                }
                Route::Registration(id) | Route::WsRegistered(id) => {
                    prop_assert!(!id.is_empty() && !id.contains('/'));
                }
                _ => {}
            }
        }
    }
}
