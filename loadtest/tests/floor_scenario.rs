//! The floor server (`ringcast-floor`) is only a yardstick if it delivers
//! what ringcast delivers: every publication to every subscriber of its
//! topic, once, in order, with the same report from `ringcast-load`.

mod common;

use common::{assert_complete, run_load, start_floor};

#[test]
fn the_floor_delivers_every_publication_to_every_subscriber_of_its_topic() {
    let floor = start_floor();
    for (subscribers, topics, rate) in [("300", "30", "600"), ("400", "1", "100")] {
        let r = run_load(
            &floor,
            &[
                "--subscribers",
                subscribers,
                "--topics",
                topics,
                "--rate",
                rate,
                "--duration",
                "1s",
                "--warmup",
                "300ms",
                "--drain",
                "5s",
            ],
        );
        let subscribers: u64 = subscribers.parse().unwrap();
        let per_topic = subscribers / topics.parse::<u64>().unwrap();
        assert_complete(&r, subscribers);
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        assert_eq!(n("expected"), n("published") * per_topic, "{r:#}");
        assert_eq!(n("publish_ok"), n("published"), "{r:#}");
    }
}
