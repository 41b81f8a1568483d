//! Man pages generated from the command-line definitions: `tandem(1)` with
//! one page per subcommand (`tandem-partnership-create(1)`, ...) and
//! `tandemd(8)`.

use std::path::{Path, PathBuf};

/// Writes the pages of `tandem` into `root/man1` and of `tandemd` into
/// `root/man8` (the layout of a man directory such as /usr/local/share/man);
/// returns the files written.
pub fn write_all(tandem: &clap::Command, tandemd: &clap::Command, root: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    let man1 = root.join("man1");
    let man8 = root.join("man8");
    for dir in [&man1, &man8] {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    write_tree(tandem, "1", &man1, &mut written)?;
    write_page(tandemd.clone(), "tandemd", "8", &man8, &mut written)?;
    Ok(written)
}

fn write_tree(command: &clap::Command, section: &str, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut command = command.clone();
    command.build();
    write_page(command.clone(), command.get_name(), section, dir, written)?;
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("{}-{}", command.get_name(), sub.get_name());
        let sub = sub.clone().name(name);
        write_tree(&sub, section, dir, written)?;
    }
    Ok(())
}

fn write_page(
    command: clap::Command,
    name: &str,
    section: &str,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let path = dir.join(format!("{name}.{section}"));
    let mut bytes = Vec::new();
    clap_mangen::Man::new(command).section(section).render(&mut bytes).map_err(|e| e.to_string())?;
    std::fs::write(&path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    written.push(path);
    Ok(())
}
