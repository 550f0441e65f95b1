//! What the reader counts of each source: its share of the accounting identity
//! (`summary`), kept in checkpoints (`checkpoint`). A leaf module, so that the
//! checkpoint does not depend on the summary that reports it.

/// What the reader saw of one source.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SourceCounts {
    pub input: u64,
    pub late: u64,
    pub dead: u64,
    /// Of the dead letters: events whose time was far ahead and not followed by their
    /// stream (README "Times far ahead").
    #[serde(default)]
    pub time_jumps: u64,
}

impl SourceCounts {
    pub fn add(&mut self, other: &SourceCounts) {
        self.input += other.input;
        self.late += other.late;
        self.dead += other.dead;
        self.time_jumps += other.time_jumps;
    }
}
