//! Which web origins may use the node from a browser (`[http]
//! allowed_origins`): the `Origin` check on WebSocket upgrades and event
//! streams (a page on another site must not open a connection that
//! carries its visitor's cookies: cross-site WebSocket hijacking), and the
//! CORS headers that let an allowed page read the answers.
//!
//! A request without `Origin` is not a browser's cross-site request (a
//! server, `curl`, a native client) and is never refused here; one whose
//! origin names the host it was sent to is same-origin. Any other origin
//! must be listed, or the list must be `["*"]`.

use super::http::{Request, Response};

/// The configured origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    /// `*`: every origin.
    any: bool,
    /// Listed origins, lowercase, as `scheme://host[:port]`.
    listed: Vec<String>,
}

/// An entry of `allowed_origins` that cannot match an `Origin` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allowed_origins entry `{0}` is not `*` or scheme://host[:port] (no path)")]
pub struct BadOrigin(pub String);

/// What a request's `Origin` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OriginCheck {
    /// No `Origin`: not a browser's cross-site request.
    Absent,
    /// The origin names the host the request was sent to.
    SameHost,
    /// Another origin the configuration allows: answers name it in CORS
    /// headers.
    Allowed(String),
    /// Another origin, not allowed.
    Refused(String),
}

impl AllowedOrigins {
    /// From the configuration's list.
    pub fn new(entries: &[String]) -> Result<AllowedOrigins, BadOrigin> {
        let mut allowed = AllowedOrigins::default();
        for entry in entries {
            let origin = entry.trim().trim_end_matches('/').to_ascii_lowercase();
            if origin == "*" {
                allowed.any = true;
                continue;
            }
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            match host {
                Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', ' ']) => {
                    allowed.listed.push(origin)
                }
                _ => return Err(BadOrigin(entry.clone())),
            }
        }
        Ok(allowed)
    }

    /// Checks `request`'s `Origin`.
    pub fn check(&self, request: &Request) -> OriginCheck {
        let Some(origin) = request.header("origin") else {
            return OriginCheck::Absent;
        };
        let origin = origin.trim().to_ascii_lowercase();
        let host = origin.split_once("://").map(|(_, host)| host);
        let same = host.is_some_and(|host| {
            request
                .header("host")
                .is_some_and(|h| h.trim().eq_ignore_ascii_case(host))
        });
        if same {
            OriginCheck::SameHost
        } else if self.any || self.listed.contains(&origin) {
            OriginCheck::Allowed(origin)
        } else {
            OriginCheck::Refused(origin)
        }
    }
}

impl OriginCheck {
    /// The origin answers must name in CORS headers, if any.
    pub fn cors_origin(&self) -> Option<&str> {
        match self {
            OriginCheck::Allowed(origin) => Some(origin),
            _ => None,
        }
    }

    /// The refusal of a connection from a page of another site (`403`).
    pub fn refusal(&self) -> Option<Response> {
        let OriginCheck::Refused(origin) = self else {
            return None;
        };
        let reason = format!(
            "origin `{}` is not allowed: add it to [http] allowed_origins",
            super::message::truncate(origin, 128)
        );
        Some(super::http::error_json(403, &reason))
    }
}

/// Adds the CORS headers that let a page of `origin` read the answer.
pub fn with_cors(response: Response, origin: Option<&str>) -> Response {
    match origin {
        Some(origin) => response
            .header("Access-Control-Allow-Origin", origin.to_owned())
            .header("Access-Control-Allow-Credentials", "true")
            .header("Vary", "Origin"),
        None => response,
    }
}

/// The answer to a CORS preflight (`OPTIONS` with
/// `Access-Control-Request-Method`): what an allowed page may send.
/// `Last-Event-ID` is among the headers because an `EventSource`
/// reconnecting across origins sends it, and it is not one a browser
/// sends without asking.
pub fn preflight(check: &OriginCheck, allow: &'static str) -> Response {
    match check {
        OriginCheck::Refused(_) => check.refusal().unwrap_or_else(|| Response::new(403)),
        _ => with_cors(Response::new(204), check.cors_origin())
            .header("Access-Control-Allow-Methods", allow)
            .header(
                "Access-Control-Allow-Headers",
                "Authorization, Content-Type, Last-Event-ID",
            )
            .header("Access-Control-Max-Age", "600"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::http::{HttpLimits, RequestDecoder};

    fn request(headers: &str) -> Request {
        let text = format!("GET /sse HTTP/1.1\r\nHost: gw.example:8000\r\n{headers}\r\n");
        let mut decoder = RequestDecoder::new(HttpLimits::default());
        decoder.decode(text.as_bytes()).unwrap().1.unwrap()
    }

    #[test]
    fn no_origin_and_the_same_host_pass_others_must_be_listed() {
        let listed = AllowedOrigins::new(&["https://App.example/".into()]).unwrap();
        assert_eq!(listed.check(&request("")), OriginCheck::Absent);
        assert_eq!(
            listed.check(&request("Origin: http://GW.example:8000\r\n")),
            OriginCheck::SameHost
        );
        assert_eq!(
            listed.check(&request("Origin: https://app.example\r\n")),
            OriginCheck::Allowed("https://app.example".into())
        );
        let evil = listed.check(&request("Origin: https://evil.example\r\n"));
        assert_eq!(evil, OriginCheck::Refused("https://evil.example".into()));
        assert_eq!(evil.refusal().unwrap().status(), 403);
        assert_eq!(
            AllowedOrigins::default().check(&request("Origin: null\r\n")),
            OriginCheck::Refused("null".into())
        );
        let any = AllowedOrigins::new(&["*".into()]).unwrap();
        assert!(matches!(
            any.check(&request("Origin: https://evil.example\r\n")),
            OriginCheck::Allowed(_)
        ));
    }

    #[test]
    fn entries_must_be_origins() {
        for bad in ["app.example", "https://", "https://a/b", "ftp://a"] {
            assert!(AllowedOrigins::new(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_preflight_names_the_origin_and_what_it_may_send() {
        let check = OriginCheck::Allowed("https://app.example".into());
        let text = String::from_utf8(preflight(&check, "GET").encode().to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 204"), "{text}");
        assert!(text.contains("Access-Control-Allow-Origin: https://app.example\r\n"));
        assert!(text.contains("Last-Event-ID"));
        let refused = preflight(&OriginCheck::Refused("x".into()), "GET");
        assert_eq!(refused.status(), 403);
    }
}
