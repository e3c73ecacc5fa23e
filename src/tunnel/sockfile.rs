//! The local socket files of forwards. ssh leaves them behind on exit and then refuses to bind
//! again, so we remove them, but only ever a path that `lstat` says is a socket.

use crate::error::{Error, Kind, Result};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a socket"
    }
}

/// Removes `path` if it is a socket. Returns whether something was removed; refuses (and
/// leaves alone) anything else that is there.
pub(crate) fn remove_socket(path: &str) -> Result<bool> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::new(
            Kind::Io,
            format!("cannot inspect socket path '{path}': {e}"),
        )),
        Ok(meta) if meta.file_type().is_socket() => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::new(
                Kind::Io,
                format!("cannot remove socket '{path}': {e}"),
            )),
        },
        Ok(meta) => Err(Error::invalid(format!(
            "refusing to use socket path '{path}': it is {}, not a socket",
            describe(meta.file_type())
        ))),
    }
}

/// Makes `path` free for ssh to bind: its directory must exist, a stale socket is removed,
/// anything else is refused. Returns whether a stale socket was removed.
pub(crate) fn prepare(path: &str) -> Result<bool> {
    let dir = Path::new(path).parent().unwrap_or(Path::new("/"));
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::invalid(format!(
                "socket directory '{}' is not a directory",
                dir.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::invalid(format!(
                "socket directory '{}' does not exist",
                dir.display()
            )));
        }
        Err(e) => {
            return Err(Error::new(
                Kind::Io,
                format!("cannot inspect socket directory '{}': {e}", dir.display()),
            ));
        }
    }
    remove_socket(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scratch::ScratchDir;

    #[test]
    fn stale_socket_is_removed() {
        let c = ScratchDir::new("sockfile-stale");
        let p = c.file("100.migrate");
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(prepare(&p).unwrap());
        assert!(!Path::new(&p).exists());
        assert!(!prepare(&p).unwrap());
    }

    #[test]
    fn regular_file_directory_and_symlink_are_refused_and_kept() {
        let c = ScratchDir::new("sockfile-refuse");
        let file = c.file("100.migrate");
        std::fs::write(&file, "canary").unwrap();
        let err = prepare(&file).unwrap_err();
        assert!(
            err.message.contains("it is a regular file, not a socket"),
            "{}",
            err.message
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "canary");

        let dir = c.file("101.migrate");
        std::fs::create_dir(&dir).unwrap();
        assert!(prepare(&dir).unwrap_err().message.contains("a directory"));
        assert!(Path::new(&dir).is_dir());

        let link = c.file("102.migrate");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            remove_socket(&link)
                .unwrap_err()
                .message
                .contains("a symlink")
        );
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "canary");
    }

    #[test]
    fn missing_directory_is_named() {
        let c = ScratchDir::new("sockfile-nodir");
        let p = c.file("gone/100.migrate");
        let err = prepare(&p).unwrap_err();
        assert!(
            err.message.contains("does not exist") && err.message.contains("gone"),
            "{}",
            err.message
        );
    }
}
