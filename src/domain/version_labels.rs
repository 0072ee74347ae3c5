//! A bounded set of model versions named in metric labels: an ML API
//! that reports a new version on every answer must not grow the metric
//! series without end.

/// Versions named in labels, at most.
pub const MAX_NAMED_VERSIONS: usize = 10;

/// The label of every version past the named ones.
pub const OTHER_VERSIONS: &str = "other";

/// The versions named so far, first come first named: a series, once
/// made, keeps counting under the same name.
#[derive(Debug, Default)]
pub struct VersionLabels {
    named: Vec<String>,
}

impl VersionLabels {
    /// The label `version` is counted under: its own name while fewer than
    /// [`MAX_NAMED_VERSIONS`] are named (or it is one of them), else
    /// [`OTHER_VERSIONS`].
    pub fn label<'a>(&mut self, version: &'a str) -> &'a str {
        if self.named.iter().any(|named| named == version) {
            return version;
        }
        if self.named.len() < MAX_NAMED_VERSIONS && version != OTHER_VERSIONS {
            self.named.push(version.to_string());
            return version;
        }
        OTHER_VERSIONS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_versions_are_named_and_the_rest_are_other() {
        let mut labels = VersionLabels::default();
        let versions: Vec<String> = (0..41).map(|n| format!("v{n}")).collect();
        let said: Vec<&str> = versions.iter().map(|v| labels.label(v)).collect();
        assert_eq!(&said[..10], &versions.iter().map(String::as_str).collect::<Vec<_>>()[..10]);
        assert!(said[10..].iter().all(|label| *label == OTHER_VERSIONS));
        assert_eq!(labels.label("v3"), "v3", "a named version keeps its name");
        assert_eq!(labels.label("other"), OTHER_VERSIONS);
    }
}
