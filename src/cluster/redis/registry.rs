//! Registrations in Redis: the hash `{prefix}:reg:{id}` (`u` user, `t`
//! topics as JSON) and the announcement on the control channel (the
//! decisions are in `cluster::state::registry`).

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::scan::Scanner;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::super::state::{control_channel, Event, RegistryWrite};

fn key(prefix: &str, id: &str) -> String {
    format!("{prefix}:reg:{id}")
}

/// Stores or deletes a registration and announces it, and reports it.
pub(super) async fn write(
    client: Client,
    prefix: String,
    write: RegistryWrite,
    done: mpsc::UnboundedSender<Event>,
) {
    let key = key(&prefix, &write.id);
    let written: Result<(), Error> = async {
        match &write.registration {
            Some((user, topics)) => {
                let topics = serde_json::to_string(topics).unwrap_or_default();
                let fields = vec![("u", user.clone()), ("t", topics)];
                let _: () = client.hset(&key, fields).await?;
            }
            None => {
                let _: i64 = client.del(&key).await?;
            }
        }
        let _: i64 = client
            .spublish(control_channel(&prefix), write.notice)
            .await?;
        Ok(())
    }
    .await;
    if let Err(e) = &written {
        tracing::warn!("cluster: writing registration {} failed: {e}", write.id);
    }
    let _ = done.send(Event::RegistryWritten {
        from: write.from,
        ticket: write.ticket,
        id: write.id,
        ok: written.is_ok(),
    });
}

/// Reads every registration and reports them, and whether the read was
/// complete.
pub(super) async fn load(
    client: Client,
    prefix: String,
    after: u64,
    done: mpsc::UnboundedSender<Event>,
) {
    let pattern = format!("{prefix}:reg:*");
    let prefix_len = pattern.len() - 1;
    let mut found = Vec::new();
    let mut complete = true;
    // A Redis Cluster keeps them on every master: scan them all.
    let mut pages = if client.is_clustered() {
        client.scan_cluster(pattern, Some(1000), None).boxed()
    } else {
        client.scan(pattern, Some(1000), None).boxed()
    };
    while let Some(page) = pages.next().await {
        let Ok(mut page) = page else {
            complete = false;
            break;
        };
        for key in page.take_results().unwrap_or_default() {
            let Some(name) = key.as_str().map(|k| k.to_string()) else {
                continue;
            };
            let fields: HashMap<String, String> = match client.hgetall(&name).await {
                Ok(fields) => fields,
                Err(_) => {
                    complete = false;
                    continue;
                }
            };
            let (Some(user), topics) = (fields.get("u"), fields.get("t")) else {
                continue;
            };
            let topics: Vec<String> = topics
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            found.push((name[prefix_len..].to_string(), user.clone(), topics));
        }
    }
    let _ = done.send(Event::RegistrationsLoaded {
        after,
        found,
        complete,
    });
}
