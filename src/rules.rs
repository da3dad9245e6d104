//! Topic rules: which rule governs a topic, and what that rule allows.
//!
//! A [`RuleSet`] maps a topic name to one [`Rule`] by pattern (an exact name, or
//! a prefix written with a trailing `*`); an exact match wins, then the longest
//! prefix. This module is plain data with no I/O and no clock: the shard
//! resolves a topic once, caches the [`RuleId`], and enforces the flags itself.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// Errors building patterns and rule sets; each names the offending pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The pattern is the empty string; write `*` to match every topic.
    #[error("empty pattern: write `*` to match every topic")]
    Empty,
    /// A `*` appears somewhere other than the end; only trailing prefixes are supported.
    #[error("pattern `{0}`: `*` is only allowed as the last character")]
    MisplacedWildcard(String),
    /// Two rules have the same pattern; remove or merge one of them.
    #[error("pattern `{0}` is used by more than one rule")]
    Duplicate(String),
    /// More rules than a [`RuleId`] can number; no config needs this many.
    #[error("too many rules: at most {} are supported", u32::MAX)]
    TooMany,
}

/// Which topics a rule covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Exactly this topic name (`chat:lobby`).
    Exact(String),
    /// Every topic starting with this text (`room:*` is `Prefix("room:")`); the
    /// empty prefix, written `*`, matches every topic.
    Prefix(String),
}

impl Pattern {
    /// Parses `name` as an exact pattern or `prefix*` as a prefix pattern.
    pub fn parse(s: &str) -> Result<Pattern, RuleError> {
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        let (body, is_prefix) = match s.strip_suffix('*') {
            Some(body) => (body, true),
            None => (s, false),
        };
        if body.contains('*') {
            return Err(RuleError::MisplacedWildcard(s.to_string()));
        }
        Ok(if is_prefix {
            Pattern::Prefix(body.to_string())
        } else {
            Pattern::Exact(body.to_string())
        })
    }

    /// True if `topic` is covered by this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        match self {
            Pattern::Exact(name) => topic == name,
            Pattern::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }
}

/// Writes the pattern back in its config form (`chat:lobby`, `room:*`).
impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Exact(name) => f.write_str(name),
            Pattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// What clients may do on the topics a pattern covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The topics this rule governs.
    pub pattern: Pattern,
    /// Clients may publish (`{"type":"message"}`) on these topics; otherwise only
    /// HTTP `POST /publish` can. Config default `false`.
    pub client_publish: bool,
    /// Subscribers are tracked for `GET /topics/{topic}/presence`. Config default `false`.
    pub presence: bool,
    /// Subscribes and unsubscribes are announced to the topic. Config default `false`.
    pub join_leave: bool,
    /// Only authenticated connections may subscribe or publish. Config default `false`.
    pub require_auth: bool,
    /// Makes these topics streams: publications get offsets and a bounded
    /// history that reconnecting clients recover from. Config default: none.
    pub history: Option<History>,
    /// Each subscription is allowed or refused by the application backend
    /// (`[proxy] subscribe_url`) before it is made. Config default `false`.
    pub subscribe_proxy: bool,
    /// Each client publication (over `/ws`) is passed, rewritten or
    /// refused by the application backend (`[proxy] publish_url`).
    /// Config default `false`.
    pub publish_proxy: bool,
}

/// History settings of a stream topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    /// Publications kept per topic (`history_size`); older ones are evicted.
    pub size: usize,
    /// How long a publication is kept (`history_ttl_s`); a stream with no
    /// publication for this long is forgotten and starts a new epoch.
    pub ttl: Duration,
    /// Latest publications sent to every new subscriber, marked as replay
    /// (`replay_on_subscribe`), at most `size`. Default 0.
    pub replay_on_subscribe: usize,
}

impl Rule {
    /// A rule for `pattern` that allows nothing beyond subscribing: every flag off,
    /// as in the config file when a `[[rules]]` entry sets only `pattern`.
    pub fn new(pattern: Pattern) -> Rule {
        Rule {
            pattern,
            client_publish: false,
            presence: false,
            join_leave: false,
            require_auth: false,
            history: None,
            subscribe_proxy: false,
            publish_proxy: false,
        }
    }
}

/// Index of a rule within its [`RuleSet`]; only meaningful for the set that issued it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(pub u32);

/// Values by pattern, looked up by topic: an exact match wins, then the
/// longest prefix. Shared by rules and channel hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternMap<T> {
    exact: HashMap<String, T>,
    /// Longest prefix first, so the first match is the most specific one.
    prefixes: Vec<(String, T)>,
}

impl<T> Default for PatternMap<T> {
    fn default() -> Self {
        PatternMap {
            exact: HashMap::new(),
            prefixes: Vec::new(),
        }
    }
}

impl<T: Copy> PatternMap<T> {
    /// The value stored for exactly this pattern.
    pub fn get(&self, pattern: &Pattern) -> Option<T> {
        match pattern {
            Pattern::Exact(name) => self.exact.get(name).copied(),
            Pattern::Prefix(prefix) => self
                .prefixes
                .iter()
                .find(|(p, _)| p == prefix)
                .map(|&(_, v)| v),
        }
    }

    /// Stores `value` for `pattern`; returns the value it replaced.
    pub fn insert(&mut self, pattern: &Pattern, value: T) -> Option<T> {
        match pattern {
            Pattern::Exact(name) => self.exact.insert(name.clone(), value),
            Pattern::Prefix(prefix) => {
                if let Some(slot) = self.prefixes.iter_mut().find(|(p, _)| p == prefix) {
                    return Some(std::mem::replace(&mut slot.1, value));
                }
                self.prefixes.push((prefix.clone(), value));
                // Distinct prefixes of equal length cannot both match one topic,
                // so only length matters; the stable sort keeps insertion order.
                self.prefixes
                    .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
                None
            }
        }
    }

    /// Exact match wins, then the longest prefix; None if nothing matches.
    pub fn resolve(&self, topic: &str) -> Option<T> {
        if let Some(&value) = self.exact.get(topic) {
            return Some(value);
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| topic.starts_with(prefix.as_str()))
            .map(|&(_, value)| value)
    }
}

/// Rules indexed for lookup by topic name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    index: PatternMap<RuleId>,
}

impl RuleSet {
    /// Indexes `rules`. An empty list is allowed and refuses every topic.
    ///
    /// Patterns must be distinct; rules built from strings should come through
    /// [`Pattern::parse`], and a `Pattern` built by hand with a `*` in its text is
    /// rejected here too.
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleError> {
        let mut index = PatternMap::default();
        for (position, rule) in rules.iter().enumerate() {
            let id = RuleId(u32::try_from(position).map_err(|_| RuleError::TooMany)?);
            match &rule.pattern {
                Pattern::Exact(name) | Pattern::Prefix(name) if name.contains('*') => {
                    return Err(RuleError::MisplacedWildcard(rule.pattern.to_string()));
                }
                Pattern::Exact(name) if name.is_empty() => return Err(RuleError::Empty),
                pattern => {
                    if index.insert(pattern, id).is_some() {
                        return Err(RuleError::Duplicate(rule.pattern.to_string()));
                    }
                }
            }
        }
        Ok(RuleSet { rules, index })
    }

    /// The built-in catch-all of DESIGN.md when no rules are configured: clients may publish
    /// to topics they are subscribed to, presence tracked, no join/leave, no auth required.
    pub fn default_rules() -> RuleSet {
        let rule = Rule {
            pattern: Pattern::Prefix(String::new()),
            client_publish: true,
            presence: true,
            join_leave: false,
            require_auth: false,
            history: None,
            subscribe_proxy: false,
            publish_proxy: false,
        };
        let mut index = PatternMap::default();
        index.insert(&rule.pattern, RuleId(0));
        RuleSet {
            rules: vec![rule],
            index,
        }
    }

    /// Exact match wins, then the longest prefix; None if nothing matches.
    pub fn resolve(&self, topic: &str) -> Option<RuleId> {
        self.index.resolve(topic)
    }

    /// The rule behind `id`.
    ///
    /// Panics if `id` was not returned by this set's [`RuleSet::resolve`]: ids are
    /// positions in this set, so one from another set is a caller bug.
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id.0 as usize]
    }

    /// Every rule, in the order given; `RuleId(i)` is the `i`-th.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::default_rules()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str) -> Rule {
        Rule::new(Pattern::parse(pattern).unwrap())
    }

    fn set(patterns: &[&str]) -> RuleSet {
        RuleSet::new(patterns.iter().map(|p| rule(p)).collect()).unwrap()
    }

    fn resolved(rules: &RuleSet, topic: &str) -> Option<String> {
        rules
            .resolve(topic)
            .map(|id| rules.rule(id).pattern.to_string())
    }

    #[test]
    fn patterns_parse_as_exact_or_prefix() {
        assert_eq!(
            Pattern::parse("chat:lobby"),
            Ok(Pattern::Exact("chat:lobby".into()))
        );
        assert_eq!(
            Pattern::parse("room:*"),
            Ok(Pattern::Prefix("room:".into()))
        );
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Prefix(String::new())));
        assert_eq!(Pattern::parse("room:*").unwrap().to_string(), "room:*");
    }

    #[test]
    fn a_star_anywhere_but_the_end_or_an_empty_pattern_is_refused() {
        assert_eq!(Pattern::parse(""), Err(RuleError::Empty));
        for bad in ["ro*om", "*room", "room:**", "**", "a*b*"] {
            let err = Pattern::parse(bad).unwrap_err();
            assert_eq!(err, RuleError::MisplacedWildcard(bad.into()));
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn hand_built_patterns_with_a_star_are_refused() {
        let err = RuleSet::new(vec![Rule::new(Pattern::Exact("a*".into()))]).unwrap_err();
        assert_eq!(err, RuleError::MisplacedWildcard("a*".into()));
        let err = RuleSet::new(vec![Rule::new(Pattern::Exact(String::new()))]).unwrap_err();
        assert_eq!(err, RuleError::Empty);
    }

    #[test]
    fn exact_match_wins_over_a_prefix() {
        let rules = set(&["room:*", "room:1", "*"]);
        assert_eq!(resolved(&rules, "room:1").as_deref(), Some("room:1"));
        assert_eq!(resolved(&rules, "room:12").as_deref(), Some("room:*"));
    }

    #[test]
    fn longer_prefix_wins_over_shorter() {
        let rules = set(&["room:*", "room:vip:*", "r*"]);
        assert_eq!(
            resolved(&rules, "room:vip:7").as_deref(),
            Some("room:vip:*")
        );
        assert_eq!(resolved(&rules, "room:7").as_deref(), Some("room:*"));
        assert_eq!(resolved(&rules, "rx").as_deref(), Some("r*"));
        // A prefix matches the bare prefix itself.
        assert_eq!(resolved(&rules, "room:").as_deref(), Some("room:*"));
    }

    #[test]
    fn star_alone_catches_every_topic() {
        let rules = set(&["chat:lobby", "*"]);
        assert_eq!(resolved(&rules, "anything").as_deref(), Some("*"));
        assert_eq!(resolved(&rules, "").as_deref(), Some("*"));
        assert_eq!(
            resolved(&rules, "chat:lobby").as_deref(),
            Some("chat:lobby")
        );
    }

    #[test]
    fn a_topic_no_rule_covers_resolves_to_none() {
        let rules = set(&["chat:lobby", "room:*"]);
        assert_eq!(rules.resolve("chat:lobby2"), None);
        assert_eq!(rules.resolve("chat:"), None);
        assert_eq!(rules.resolve("roo"), None);
        assert_eq!(RuleSet::new(Vec::new()).unwrap().resolve("x"), None);
    }

    #[test]
    fn duplicate_patterns_are_refused_by_name() {
        let err = RuleSet::new(vec![rule("room:*"), rule("a"), rule("room:*")]).unwrap_err();
        assert_eq!(err, RuleError::Duplicate("room:*".into()));
        assert!(err.to_string().contains("room:*"), "{err}");
        let err = RuleSet::new(vec![rule("a"), rule("a")]).unwrap_err();
        assert_eq!(err, RuleError::Duplicate("a".into()));
        // The same text as exact and as prefix are two different patterns.
        assert!(RuleSet::new(vec![rule("room:"), rule("room:*")]).is_ok());
    }

    #[test]
    fn ids_point_back_at_the_rule_in_given_order() {
        let mut lobby = rule("chat:lobby");
        lobby.client_publish = true;
        let rules = RuleSet::new(vec![rule("room:*"), lobby.clone()]).unwrap();
        let id = rules.resolve("chat:lobby").unwrap();
        assert_eq!(id, RuleId(1));
        assert_eq!(rules.rule(id), &lobby);
        assert_eq!(rules.rules().len(), 2);
    }

    #[test]
    fn default_rules_let_clients_publish_and_track_presence_everywhere() {
        let rules = RuleSet::default_rules();
        let id = rules.resolve("any:topic").unwrap();
        let rule = rules.rule(id);
        assert_eq!(rule.pattern, Pattern::Prefix(String::new()));
        assert!(rule.client_publish && rule.presence);
        assert!(!rule.join_leave && !rule.require_auth);
        assert_eq!(RuleSet::default(), rules);
    }
}
