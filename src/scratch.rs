//! Scratch directories for the unit tests: one per test, removed when dropped, so a test that
//! fails leaves nothing in the temp dir either.

use std::path::{Path, PathBuf};

/// `$TMPDIR/mtunnel-TAG-PID`, empty when made (the leftover of an earlier run is removed).
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("mtunnel-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ScratchDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// The directory as a string (the library takes paths as strings).
    pub(crate) fn as_str(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// NAME inside the directory, as a string.
    pub(crate) fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().into()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
