//! A bounded set of model versions named in metric labels: an ML API
//! that reports a new version on every answer must not grow the metric
//! series without end, and a rollout must still see its current and
//! shadow versions by name however many came before them.

/// Versions named in labels, at most.
pub const MAX_NAMED_VERSIONS: usize = 10;

/// The label of every version no longer named.
pub const OTHER_VERSIONS: &str = "other";

/// What a version is to the service when it is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionRole {
    /// Answered the live predict URL: the current model.
    Current,
    /// Answered the shadow URL.
    Shadow,
    /// Anything else, such as a re-prediction's model.
    Other,
}

/// The label a version is counted under, and the version whose name it
/// took, if one had to give its place up.
#[derive(Debug, PartialEq, Eq)]
pub struct Labelled<'a> {
    pub label: &'a str,
    pub retired: Option<String>,
}

/// The named versions: the current one and the shadow's always, the most
/// recently seen others up to [`MAX_NAMED_VERSIONS`] in all. A new version
/// takes the place of the least recently seen one that is neither current
/// nor shadow; that one's counts move to [`OTHER_VERSIONS`].
#[derive(Debug, Default)]
pub struct VersionLabels {
    /// Each named version with the tick it was last seen at.
    named: Vec<(String, u64)>,
    tick: u64,
    current: Option<String>,
    shadow: Option<String>,
}

impl VersionLabels {
    /// The label `version`, seen as `role`, is counted under.
    pub fn label<'a>(&mut self, version: &'a str, role: VersionRole) -> Labelled<'a> {
        self.tick += 1;
        if version == OTHER_VERSIONS {
            return Labelled { label: OTHER_VERSIONS, retired: None };
        }
        match role {
            VersionRole::Current if self.current.as_deref() != Some(version) => self.current = Some(version.into()),
            VersionRole::Shadow if self.shadow.as_deref() != Some(version) => self.shadow = Some(version.into()),
            _ => {}
        }
        if let Some(named) = self.named.iter_mut().find(|(named, _)| named == version) {
            named.1 = self.tick;
            return Labelled { label: version, retired: None };
        }
        let mut retired = None;
        if self.named.len() >= MAX_NAMED_VERSIONS {
            let pinned = |name: &str| self.current.as_deref() == Some(name) || self.shadow.as_deref() == Some(name);
            let oldest = self
                .named
                .iter()
                .enumerate()
                .filter(|(_, (name, _))| !pinned(name))
                .min_by_key(|(_, (_, seen))| *seen)
                .map(|(at, _)| at);
            match oldest {
                Some(at) => retired = Some(self.named.swap_remove(at).0),
                None => return Labelled { label: OTHER_VERSIONS, retired: None },
            }
        }
        self.named.push((version.to_string(), self.tick));
        Labelled { label: version, retired }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(labels: &VersionLabels) -> Vec<&str> {
        let mut names: Vec<&str> = labels.named.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn the_ten_most_recent_versions_are_named_and_each_newcomer_retires_the_oldest() {
        let mut labels = VersionLabels::default();
        let versions: Vec<String> = (10..51).map(|n| format!("v{n}")).collect();
        let retired: Vec<Option<String>> =
            versions.iter().map(|v| labels.label(v, VersionRole::Current).retired).collect();
        assert!(retired[..10].iter().all(Option::is_none));
        assert_eq!(retired[10], Some("v10".to_string()));
        assert_eq!(retired[40], Some("v40".to_string()));
        assert_eq!(names(&labels), (41..51).map(|n| format!("v{n}")).collect::<Vec<_>>());
        assert_eq!(labels.label("v45", VersionRole::Other), Labelled { label: "v45", retired: None });
    }

    #[test]
    fn the_current_and_shadow_versions_stay_named_while_others_churn() {
        let mut labels = VersionLabels::default();
        labels.label("live", VersionRole::Current);
        labels.label("candidate", VersionRole::Shadow);
        for n in 0..30 {
            let version = format!("r{n}");
            let labelled = labels.label(&version, VersionRole::Other);
            assert_eq!(labelled.label, version);
            assert!(!matches!(labelled.retired.as_deref(), Some("live" | "candidate")));
        }
        let named = names(&labels);
        assert_eq!(named.len(), MAX_NAMED_VERSIONS);
        assert!(named.contains(&"live") && named.contains(&"candidate"));
        assert_eq!(labels.label("live", VersionRole::Current).retired, None);
    }

    #[test]
    fn other_is_never_a_name_of_its_own() {
        let mut labels = VersionLabels::default();
        assert_eq!(
            labels.label(OTHER_VERSIONS, VersionRole::Current),
            Labelled { label: OTHER_VERSIONS, retired: None }
        );
        assert!(labels.named.is_empty());
    }
}
