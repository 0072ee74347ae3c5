//! Where a record came from: a Kafka offset or a line of a file. Every
//! record carries its origin, which drives its acknowledgement, its lineage
//! column and the DLQ's `source` header.

use std::fmt;

/// Where a record came from. Drives acknowledgements and lineage.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    Kafka { topic: String, partition: i32, offset: i64 },
    File { source_uri: String, line: u64 },
}

impl Origin {
    /// The kind of source, as the records metric's `source` label names it.
    pub fn source_label(&self) -> &'static str {
        match self {
            Origin::Kafka { .. } => "kafka",
            Origin::File { .. } => "file",
        }
    }
}

impl fmt::Display for Origin {
    /// `topic/partition/offset` or `uri:line`, the DLQ `source` header and
    /// the `source` lineage column.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Kafka { topic, partition, offset } => write!(f, "{topic}/{partition}/{offset}"),
            Origin::File { source_uri, line } => write!(f, "{source_uri}:{line}"),
        }
    }
}
