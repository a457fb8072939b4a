//! Local scratch files: where bytes wait that memory should not hold (capture's spools, a
//! restore's fetched sections). Only ciphertext is ever written to them.

use std::fs::File;
use std::io;
use std::path::Path;

/// Creates a file only this process can reach: created exclusively with mode 0600, then
/// unlinked at once, so it vanishes with the process whatever happens.
pub fn anonymous_file(dir: &Path, what: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(
        ".updog-backup-{what}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}
