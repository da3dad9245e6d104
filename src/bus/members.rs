//! Presence members as they travel between shards (and from the cluster
//! broker): a query names the page it wants, each party answers its count
//! and the first members of that page, and the asker merges the answers.
//!
//! Members are ordered by their id (a string), the same order on every
//! shard and node, so a page is "the `limit` smallest ids after the cursor"
//! and the next page starts after the last id of this one. An answer holds
//! at most `limit` members whatever the topic's size: a presence query
//! costs a pass over the members, never a copy of them all.
//!
//! A member's id is its connection's, or, for a query `by_user`, the
//! `user_id` of its meta: then one user with several connections is one
//! member of the page (a Pusher presence channel's members are users).

use std::sync::Arc;

use serde::Deserialize;

/// Which members a presence query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberQuery {
    /// Most members in the answer; 0 asks for the count only.
    pub limit: usize,
    /// Only members whose id sorts after this one (the previous page's last).
    pub after: Option<Arc<str>>,
    /// Members are users (the `user_id` of their meta): a page lists each
    /// once, and metas without one are not members.
    pub by_user: bool,
    /// Count only the members with this id (a user's connections, with
    /// `by_user`).
    pub only: Option<Arc<str>>,
    /// Count every subscriber of the topic, member or not (the list is
    /// still of members). Redis keeps no count of non-members, so in a
    /// cluster the broker asks the other nodes (`cluster::state::node_queries`).
    pub subscribers: bool,
    /// List the topics whose names start with this, and that have a
    /// subscriber, instead of one topic's members: each is a member whose
    /// id is its name (with `by_user`, one per topic and member user:
    /// `name\0user`). Asked of the other nodes, as `subscribers` is.
    pub topics_under: Option<Arc<str>>,
}

#[derive(Deserialize)]
struct UserMeta<'a> {
    #[serde(borrow)]
    user_id: Option<std::borrow::Cow<'a, str>>,
}

/// The `user_id` a presence meta names, if it is a string.
pub fn user_of(meta: &str) -> Option<String> {
    serde_json::from_str::<UserMeta<'_>>(meta)
        .ok()?
        .user_id
        .map(std::borrow::Cow::into_owned)
}

/// Members of a topic, or of one party's share of it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Members {
    /// Every member, whatever the page (a user is counted per connection
    /// even `by_user`: only the list is one per user).
    pub count: usize,
    /// Members after the query's cursor.
    pub following: usize,
    /// The first members after the cursor, at most the query's limit, in
    /// id order: `(id, {"conn_id":..,"meta":..})`.
    pub list: Vec<(String, String)>,
}

impl Members {
    /// Counts one member; `id` and `json` are only built when the page
    /// needs them.
    pub fn offer(
        &mut self,
        query: &MemberQuery,
        id: impl FnOnce() -> String,
        json: impl FnOnce(&str) -> String,
    ) {
        if query.limit == 0 && query.after.is_none() && query.only.is_none() {
            self.count += 1;
            return;
        }
        let id = id();
        if query.only.as_deref().is_some_and(|only| only != id) {
            return;
        }
        self.count += 1;
        if query
            .after
            .as_deref()
            .is_some_and(|after| id.as_str() <= after)
        {
            return;
        }
        self.following += 1;
        if query.limit > 0 {
            let json = json(&id);
            self.list.push((id, json));
            // Trimmed as it grows, so a large topic holds about two pages.
            if self.list.len() >= 2 * query.limit {
                self.trim(query.limit);
            }
        }
    }

    /// Keeps the `limit` smallest ids, each once, in order.
    pub fn trim(&mut self, limit: usize) {
        // Sorted whole before the cut: with members by user one id may
        // come several times, and the cut must count distinct ids.
        self.list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.list.dedup_by(|a, b| a.0 == b.0);
        self.list.truncate(limit);
    }

    /// Adds another party's answer to the same query.
    pub fn merge(&mut self, other: Members, limit: usize) {
        self.count += other.count;
        self.following += other.following;
        self.list.extend(other.list);
        self.trim(limit);
    }

    /// The cursor of the next page, when members follow this one.
    pub fn next(&self) -> Option<&str> {
        (self.following > self.list.len())
            .then(|| self.list.last().map(|(id, _)| id.as_str()))
            .flatten()
    }

    /// The member objects, in order.
    pub fn objects(&self) -> impl Iterator<Item = &str> + Clone {
        self.list.iter().map(|(_, json)| json.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(query: &MemberQuery, ids: &[&str]) -> Members {
        let mut members = Members::default();
        for id in ids {
            members.offer(
                query,
                || id.to_string(),
                |id| format!("{{\"conn_id\":\"{id}\"}}"),
            );
        }
        members.trim(query.limit);
        members
    }

    #[test]
    fn pages_across_parties_cover_every_member_once_in_id_order() {
        let parties: [&[&str]; 3] = [&["a3", "a1", "a2"], &["b2", "b1"], &["a0", "c9", "b0"]];
        let mut seen = Vec::new();
        let mut after: Option<Arc<str>> = None;
        loop {
            let query = MemberQuery {
                limit: 2,
                after: after.clone(),
                ..MemberQuery::default()
            };
            let mut total = Members::default();
            for ids in parties {
                total.merge(answer(&query, ids), query.limit);
            }
            assert_eq!(total.count, 8, "the count stays exact on every page");
            assert!(total.list.len() <= 2);
            seen.extend(total.list.iter().map(|(id, _)| id.clone()));
            match total.next() {
                Some(next) => after = Some(Arc::from(next)),
                None => break,
            }
        }
        assert_eq!(seen, ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "c9"]);
    }

    #[test]
    fn by_user_a_page_lists_each_user_once_and_only_counts_one_users_connections() {
        let parties: [&[&str]; 3] = [&["bo", "ann", "bo"], &["ann", "cy"], &["dee", "ann"]];
        let query = MemberQuery {
            limit: 3,
            by_user: true,
            ..MemberQuery::default()
        };
        let mut total = Members::default();
        for ids in parties {
            total.merge(answer(&query, ids), query.limit);
        }
        let ids: Vec<&str> = total.list.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            ["ann", "bo", "cy"],
            "three distinct users, the first three"
        );
        let anns = MemberQuery {
            only: Some(Arc::from("ann")),
            ..MemberQuery::default()
        };
        let mut count = Members::default();
        for ids in parties {
            count.merge(answer(&anns, ids), 0);
        }
        assert_eq!((count.count, count.list.len()), (3, 0));
        assert_eq!(
            user_of(r#"{"user_id":"ann","user_info":{}}"#).as_deref(),
            Some("ann")
        );
        assert_eq!(user_of(r#"{"user_id":null}"#), None);
    }

    #[test]
    fn a_count_only_query_builds_no_member() {
        let query = MemberQuery::default();
        let mut members = Members::default();
        for _ in 0..3 {
            members.offer(&query, || unreachable!("no id needed"), |_| unreachable!());
        }
        assert_eq!(
            (members.count, members.list.len(), members.next()),
            (3, 0, None)
        );
    }
}
