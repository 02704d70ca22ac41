//! Topic checks made before any policy: AWS IoT Core's size limits, and the broker's own
//! `$SYS` tree, which devices never see.

/// AWS IoT Core: a topic or topic filter is at most 256 bytes of UTF-8.
pub const MAX_TOPIC_BYTES: usize = 256;
/// AWS IoT Core: at most 7 forward slashes in a topic or topic filter, not counting the
/// three of a Basic Ingest prefix `$aws/rules/<rule name>/`.
pub const MAX_TOPIC_SLASHES: usize = 7;

/// Why a topic is refused before its policy is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRefusal {
    /// Empty, or over [`MAX_TOPIC_BYTES`].
    Length,
    /// Over [`MAX_TOPIC_SLASHES`].
    Depth,
    /// mosquitto's `$SYS` tree.
    System,
}

/// Whether a device may name `topic` (a topic, or a filter with `+`/`#`) at all.
pub fn check_topic(topic: &str) -> Result<(), TopicRefusal> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicRefusal::Length);
    }
    if topic == "$SYS" || topic.starts_with("$SYS/") {
        return Err(TopicRefusal::System);
    }
    if slashes_counted(topic) > MAX_TOPIC_SLASHES {
        return Err(TopicRefusal::Depth);
    }
    Ok(())
}

/// The slashes AWS counts: those after a `$aws/rules/<name>/` prefix, if there is one.
fn slashes_counted(topic: &str) -> usize {
    let rest = topic
        .strip_prefix("$aws/rules/")
        .and_then(|after| after.split_once('/').map(|(_, rest)| rest))
        .unwrap_or(topic);
    rest.bytes().filter(|&b| b == b'/').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(check_topic("a/b/c"), Ok(()));
        assert_eq!(check_topic(""), Err(TopicRefusal::Length));
        assert_eq!(check_topic(&"a".repeat(256)), Ok(()));
        assert_eq!(check_topic(&"a".repeat(257)), Err(TopicRefusal::Length));
        // 256 bytes, fewer characters: the limit is in bytes.
        assert_eq!(check_topic(&"é".repeat(129)), Err(TopicRefusal::Length));
        assert_eq!(check_topic("1/2/3/4/5/6/7/8"), Ok(()));
        assert_eq!(check_topic("1/2/3/4/5/6/7/8/9"), Err(TopicRefusal::Depth));
        assert_eq!(check_topic("$aws/rules/r/1/2/3/4/5/6/7/8"), Ok(()));
        assert_eq!(
            check_topic("$aws/rules/r/1/2/3/4/5/6/7/8/9"),
            Err(TopicRefusal::Depth)
        );
        assert_eq!(check_topic("$SYS/broker/uptime"), Err(TopicRefusal::System));
        assert_eq!(check_topic("$SYS"), Err(TopicRefusal::System));
        assert_eq!(check_topic("$SYSTEM"), Ok(()));
    }
}
