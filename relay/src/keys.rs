//! Key files: one line of base64 (the PKCS#8 of an Ed25519 key), readable by its owner only.

use std::io::{self, Write};
use std::path::Path;

use cmm::tls::{Identity, PublicKey};

/// Writes a new key to `path` (never over an existing file) and returns its public key.
pub fn generate(path: &Path) -> io::Result<PublicKey> {
    let id = Identity::generate().map_err(io::Error::other)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        let why = if e.kind() == io::ErrorKind::AlreadyExists {
            "it exists; not overwritten".to_string()
        } else {
            e.to_string()
        };
        io::Error::new(e.kind(), format!("{}: {why}", path.display()))
    })?;
    writeln!(f, "{}", id.to_text())?;
    Ok(id.public_key())
}

/// Reads the key in `path`.
pub fn load(path: &Path) -> io::Result<Identity> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Identity::from_text(&text)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display())))
}

/// Reads public keys, one per line (blank lines and `#` comments skipped); an error names the
/// line.
pub fn load_allowed(path: &Path) -> io::Result<Vec<PublicKey>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let k = line.parse().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{} line {}: {e}", path.display(), i + 1))
        })?;
        keys.push(k);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_is_written_once_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("cmm-relay-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.key");
        let _ = std::fs::remove_file(&path);
        let public = generate(&path).unwrap();
        assert_eq!(load(&path).unwrap().public_key(), public);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = generate(&path).unwrap_err();
        assert!(again.to_string().contains("not overwritten"), "{again}");
        let allowed = dir.join("allowed");
        std::fs::write(&allowed, format!("# proxies\n{public}\n\nnot-a-key\n")).unwrap();
        let e = load_allowed(&allowed).unwrap_err();
        assert!(e.to_string().contains("line 4"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
