//! Presence members as they travel between shards (and from the cluster
//! broker): a query names the page it wants, each party answers its count
//! and the first members of that page, and the asker merges the answers.
//!
//! Members are ordered by their id (a string), the same order on every
//! shard and node, so a page is "the `limit` smallest ids after the cursor"
//! and the next page starts after the last id of this one. An answer holds
//! at most `limit` members whatever the topic's size: a presence query
//! costs a pass over the members, never a copy of them all.

use std::sync::Arc;

/// Which members a presence query wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberQuery {
    /// Most members in the answer; 0 asks for the count only.
    pub limit: usize,
    /// Only members whose id sorts after this one (the previous page's last).
    pub after: Option<Arc<str>>,
}

/// Members of a topic, or of one party's share of it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Members {
    /// Every member, whatever the page.
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
        self.count += 1;
        if query.limit == 0 && query.after.is_none() {
            return;
        }
        let id = id();
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

    /// Keeps the `limit` smallest ids, in order.
    pub fn trim(&mut self, limit: usize) {
        if self.list.len() > limit {
            self.list
                .select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            self.list.truncate(limit);
        }
        self.list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
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
