//! The registry of groups in the state directory: which logs this node serves
//! and on which core. Everything else about a group lives in its superblock.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "groups.json";

/// One group of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub name: String,
    pub log_path: PathBuf,
    pub core: usize,
}

/// Reads the registry; a missing file means no groups yet.
pub fn load(state_dir: &Path) -> Result<Vec<GroupRecord>, String> {
    let path = state_dir.join(FILE_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).map_err(|e| format!("group registry {} is damaged: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("cannot read group registry {}: {e}", path.display())),
    }
}

/// Replaces the registry atomically and durably: write a temporary file,
/// fsync it, rename it over the old one, fsync the directory.
pub fn save(state_dir: &Path, groups: &[GroupRecord]) -> Result<(), String> {
    let path = state_dir.join(FILE_NAME);
    let temporary: PathBuf = state_dir.join(format!("{FILE_NAME}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(serde_json::to_string_pretty(groups).expect("records serialize").as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write group registry {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_treats_missing_as_empty() {
        let dir = std::env::temp_dir().join(format!("tandem-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir).unwrap(), vec![]);
        let groups = vec![GroupRecord { name: "rg01".into(), log_path: "/srv/log".into(), core: 1 }];
        save(&dir, &groups).unwrap();
        assert_eq!(load(&dir).unwrap(), groups);
        std::fs::write(dir.join(FILE_NAME), "{").unwrap();
        assert!(load(&dir).unwrap_err().contains("damaged"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
