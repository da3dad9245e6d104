//! Pusher's side of a test: a raw connection to the test app (`4711`,
//! `app-key`, `app-secret`) and requests to its HTTP API signed as Pusher's
//! server libraries sign them.
#![allow(dead_code)] // each test binary uses its own part

use serde_json::{json, Value};

use super::{TestServer, Ws};

/// The test app, as an `[[apps]]` table.
pub const APP: &str = "[[apps]]\nid = \"4711\"\nkey = \"app-key\"\nsecret = \"app-secret\"\n";

/// A raw WebSocket to `/app/app-key`, past `pusher:connection_established`;
/// with the socket id it was given.
pub fn pusher_ws(node: &TestServer) -> (Ws, String) {
    let mut ws = node.ws("/app/app-key?protocol=7&client=js&version=8.6.0");
    let established = ws.recv_json();
    assert_eq!(established["event"], "pusher:connection_established");
    let data: Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["activity_timeout"], 120);
    let socket_id = data["socket_id"].as_str().unwrap().to_string();
    (ws, socket_id)
}

/// A raw Pusher connection subscribed to the public `channel`.
pub fn subscribed(node: &TestServer, channel: &str) -> Ws {
    let (mut ws, _) = pusher_ws(node);
    let subscribe = json!({"event":"pusher:subscribe","data":{"channel":channel}});
    ws.send_text(&subscribe.to_string());
    let answer = ws.recv_json();
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );
    ws
}

/// `GET path?query` signed with the app's secret; the status and the body
/// as JSON (`null` if it is not).
pub fn signed_get(node: &TestServer, path: &str, query: &str) -> (u16, Value) {
    let (status, body) = signed(node, "app-secret", "GET", path, query, "");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A request signed as Pusher's libraries sign it with `secret`: `query`
/// (`key=value` pairs joined by `&`, or empty) is signed with the auth
/// parameters, sorted, and a body's MD5 with them; the status and the body.
pub fn signed(
    node: &TestServer,
    secret: &str,
    method: &str,
    path: &str,
    query: &str,
    body: &str,
) -> (u16, String) {
    use md5::{Digest, Md5};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut params = vec![
        "auth_key=app-key".to_string(),
        format!("auth_timestamp={now}"),
        "auth_version=1.0".to_string(),
    ];
    if !body.is_empty() {
        let md5: String = Md5::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.push(format!("body_md5={md5}"));
    }
    params.extend(query.split('&').filter(|p| !p.is_empty()).map(String::from));
    params.sort();
    let params = params.join("&");
    let to_sign = format!("{method}\n{path}\n{params}");
    let signature = ringcast::pusher::sign::hmac_hex(secret, to_sign.as_bytes());
    let url = format!("{path}?{params}&auth_signature={signature}");
    node.http(method, &url, (!body.is_empty()).then_some(body))
}

/// A Pusher connection to `node` that has sent a signed subscription to the
/// presence `channel` as `user`, not yet answered.
pub fn subscribe_presence(node: &TestServer, channel: &str, user: &str) -> Ws {
    let (mut ws, socket_id) = pusher_ws(node);
    let channel_data = json!({"user_id": user, "user_info": {}}).to_string();
    let to_sign = format!("{socket_id}:{channel}:{channel_data}");
    let signature = ringcast::pusher::sign::hmac_hex("app-secret", to_sign.as_bytes());
    let subscribe = json!({"event":"pusher:subscribe","data":{
        "channel": channel,
        "auth": format!("app-key:{signature}"),
        "channel_data": channel_data,
    }});
    ws.send_text(&subscribe.to_string());
    ws
}

/// A raw Pusher connection subscribed to presence channel `channel` as
/// `user`, signed as an app's auth endpoint signs; with the ids of the
/// members `subscription_succeeded` listed, sorted.
pub fn presence_member(node: &TestServer, channel: &str, user: &str) -> (Ws, Vec<String>) {
    let mut ws = subscribe_presence(node, channel, user);
    // A member event decided before this subscription's answer may reach
    // it first (it travels through Redis); the answer lists the members.
    let mut answer = ws.recv_json();
    while answer["event"]
        .as_str()
        .is_some_and(|e| e.starts_with("pusher_internal:member_"))
    {
        answer = ws.recv_json();
    }
    assert_eq!(
        answer["event"], "pusher_internal:subscription_succeeded",
        "{answer}"
    );
    let data: Value = serde_json::from_str(answer["data"].as_str().unwrap()).unwrap();
    let ids = data["presence"]["ids"].as_array().unwrap();
    let mut ids: Vec<String> = ids
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    (ws, ids)
}
