//! JWT on `/ws` and `/chat`, and the API key on publish, register and presence.
mod common;

use common::TestServer;

const SECRET: &str = "test-secret-0123456789";
const KEY: &str = "test-api-key";

fn config() -> String {
    format!("[auth]\njwt_secret = \"{SECRET}\"\napi_key = \"{KEY}\"\n")
}

#[test]
fn a_valid_token_opens_ws_and_names_the_user() {
    let server = TestServer::start(2, Some(&config()));
    let good = common::jwt(SECRET, "alice", 300);
    assert_eq!(
        server.upgrade_status("/ws", &format!("Authorization: Bearer {good}\r\n")),
        101
    );
    let mut ws = server.ws(&format!("/ws?token={good}"));
    ws.subscribe("inbox");
    let body = r#"{"topic":"inbox","user_id":"alice","payload":"for alice"}"#;
    assert_eq!(
        server.http_with_key("POST", "/publish", Some(body), KEY).0,
        202
    );
    assert_eq!(
        ws.recv_json()["payload"],
        "for alice",
        "the token's sub is the user id"
    );
}

#[test]
fn missing_bad_and_expired_tokens_get_401_before_the_upgrade() {
    let server = TestServer::start(1, Some(&config()));
    assert_eq!(server.upgrade_status("/ws", ""), 401);
    let forged = common::jwt("another-secret", "mallory", 300);
    assert_eq!(
        server.upgrade_status(&format!("/ws?token={forged}"), ""),
        401
    );
    let expired = common::jwt(SECRET, "alice", -10);
    assert_eq!(
        server.upgrade_status("/ws", &format!("Authorization: Bearer {expired}\r\n")),
        401
    );
    assert_eq!(server.upgrade_status("/ws?token=not.a.jwt", ""), 401);
}

#[test]
fn chat_needs_a_token_and_its_user_must_match() {
    let server = TestServer::start(1, Some(&config()));
    assert_eq!(
        server.upgrade_status("/chat?user_id=ann&recipient_id=ben", ""),
        401
    );
    let ann = common::jwt(SECRET, "ann", 300);
    assert_eq!(
        server.upgrade_status(&format!("/chat?recipient_id=ben&token={ann}"), ""),
        101
    );
    assert_eq!(
        server.upgrade_status(&format!("/chat?user_id=ben&recipient_id=x&token={ann}"), ""),
        403
    );
}

#[test]
fn publish_register_and_presence_need_the_api_key() {
    let server = TestServer::start(1, Some(&config()));
    let publish = r#"{"topic":"t","payload":1}"#;
    assert_eq!(server.http("POST", "/publish", Some(publish)).0, 401);
    assert_eq!(
        server
            .http_with_key("POST", "/publish", Some(publish), "wrong")
            .0,
        401
    );
    assert_eq!(
        server
            .http_with_key("POST", "/publish", Some(publish), KEY)
            .0,
        202
    );
    assert_eq!(
        server
            .http("POST", "/register", Some(r#"{"user_id":"u"}"#))
            .0,
        401
    );
    let (status, body) = server.http_with_key("POST", "/register", Some(r#"{"user_id":"u"}"#), KEY);
    assert_eq!(status, 201);
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        server.http("DELETE", &format!("/register/{id}"), None).0,
        401
    );
    assert_eq!(
        server
            .http_with_key("DELETE", &format!("/register/{id}"), None, KEY)
            .0,
        204
    );
    assert_eq!(server.http("GET", "/topics/t/presence", None).0, 401);
    assert_eq!(
        server
            .http_with_key("GET", "/topics/t/presence", None, KEY)
            .0,
        200
    );
    assert_eq!(
        server.http("GET", "/health", None).0,
        200,
        "health stays open"
    );
}

#[test]
fn echo_needs_a_token_when_jwt_auth_is_on() {
    let server = TestServer::start(1, Some(&config()));
    assert_eq!(server.upgrade_status("/echo", ""), 401);
    let good = common::jwt(SECRET, "alice", 300);
    assert_eq!(
        server.upgrade_status(&format!("/echo?token={good}"), ""),
        101
    );
}
