//! Presence channels' members, without I/O: a member is a user (the
//! `channel_data` a backend signed), not a connection, so one user with
//! several connections counts once. In the core a Pusher member is a
//! subscription's presence meta, `{"user_id":U,"user_info":I}`, and the
//! core tells an app topic's members apart by that user id
//! ([`crate::bus::MemberQuery`]'s `by_user`); what a client is told is written here.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Pusher's limit on a user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// A presence member: its user id and the meta the core keeps for it.
#[derive(Debug, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    /// `{"user_id":U,"user_info":I}`, as every client is shown it.
    pub meta: String,
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow)]
    user_id: &'a RawValue,
    #[serde(borrow)]
    user_info: Option<&'a RawValue>,
}

/// Reads the `channel_data` of a presence subscription (checked against
/// its signature already): `user_id` a string or a number, as Pusher's
/// server libraries send either, of 1 to 128 bytes.
pub fn member(channel_data: &str) -> Result<Member, String> {
    let data: ChannelData<'_> =
        serde_json::from_str(channel_data).map_err(|e| format!("bad channel_data: {e}"))?;
    let raw = data.user_id.get();
    let user_id = match serde_json::from_str::<String>(raw) {
        Ok(text) => text,
        Err(_) if serde_json::from_str::<serde_json::Number>(raw).is_ok() => raw.to_string(),
        Err(_) => return Err("channel_data's user_id must be a string or a number".into()),
    };
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!("user_id must be 1 to {MAX_USER_ID_BYTES} bytes"));
    }
    let info = data.user_info.map_or("null", RawValue::get);
    let meta = format!(
        "{{\"user_id\":{},\"user_info\":{info}}}",
        json_string(&user_id)
    );
    Ok(Member { user_id, meta })
}

/// `pusher_internal:subscription_succeeded`'s data for a presence channel:
/// `{"presence":{"ids":[..],"hash":{id:info},"count":N}}`, as a JSON
/// string (Pusher sends `data` as text). `metas` are the members, one per
/// user.
pub fn succeeded_data<'m>(metas: impl Iterator<Item = &'m str>) -> String {
    let mut ids = Vec::new();
    let mut hash = String::from("{");
    for meta in metas {
        let Ok(member) = serde_json::from_str::<MetaWithInfo<'_>>(meta) else {
            continue;
        };
        let id = json_string(&member.user_id);
        if !ids.is_empty() {
            hash.push(',');
        }
        hash.push_str(&id);
        hash.push(':');
        hash.push_str(member.user_info.map_or("null", RawValue::get));
        ids.push(id);
    }
    hash.push('}');
    let data = format!(
        "{{\"presence\":{{\"ids\":[{}],\"hash\":{hash},\"count\":{}}}}}",
        ids.join(","),
        ids.len()
    );
    json_string(&data)
}

#[derive(Deserialize)]
struct MetaWithInfo<'a> {
    #[serde(borrow)]
    user_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    user_info: Option<&'a RawValue>,
}

/// `pusher_internal:member_added`'s data: the member's meta, as text.
pub fn added_data(meta: &str) -> String {
    json_string(meta)
}

/// `pusher_internal:member_removed`'s data: `{"user_id":U}`, as text.
pub fn removed_data(user_id: &str) -> String {
    json_string(&format!("{{\"user_id\":{}}}", json_string(user_id)))
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::user_of;

    #[test]
    fn channel_data_becomes_one_meta_whatever_the_user_ids_type() {
        let m = member(r#"{"user_id":"ann","user_info":{"name":"Ann"}}"#).unwrap();
        assert_eq!(m.user_id, "ann");
        assert_eq!(m.meta, r#"{"user_id":"ann","user_info":{"name":"Ann"}}"#);
        let n = member(r#"{"user_id":42}"#).unwrap();
        assert_eq!(n.meta, r#"{"user_id":"42","user_info":null}"#);
        assert_eq!(user_of(&m.meta).as_deref(), Some("ann"));
        assert_eq!(user_of(&n.meta).as_deref(), Some("42"));
        let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(129));
        for bad in [
            "",
            "{}",
            r#"{"user_id":""}"#,
            r#"{"user_id":null}"#,
            r#"{"user_id":[1]}"#,
            &long,
        ] {
            assert!(member(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subscription_succeeded_lists_each_member_once_with_its_info() {
        let metas = [
            r#"{"user_id":"ann","user_info":{"name":"Ann"}}"#,
            r#"{"user_id":"bo\"b","user_info":null}"#,
        ];
        let data: String = serde_json::from_str(&succeeded_data(metas.into_iter())).unwrap();
        let value: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"presence":{"ids":["ann","bo\"b"],"hash":{"ann":{"name":"Ann"},"bo\"b":null},"count":2}})
        );
        let removed: String = serde_json::from_str(&removed_data("ann")).unwrap();
        assert_eq!(removed, r#"{"user_id":"ann"}"#);
    }
}
