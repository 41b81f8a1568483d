//! Who may do what on the management socket (like Grant-SRDelegation): the
//! caller is known from SO_PEERCRED. Root, the daemon's own user and members
//! of the group `tandem-admin` may do everything; other users only what an
//! administrator granted them per replication group: operators manage it,
//! viewers read it. Every refusal is logged with the uid and the action.

use std::ffi::{CStr, CString};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::api::Request;

/// The group whose members administer the node.
pub const ADMIN_GROUP: &str = "tandem-admin";

/// What a delegated user may do on a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Create, change, verify and remove the group's partnership; tune it.
    Operator,
    /// Read its status, counters and events.
    Viewer,
}

/// One grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub role: Role,
}

/// The process at the other end of the management socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub user: String,
    pub admin: bool,
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Administrators only.
    Admin,
    /// Any caller with a grant (what it reads is limited to its groups).
    Read,
    /// An operator of this group.
    Operate(String),
}

/// What an authorized caller sees of read requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Groups(Vec<String>),
}

impl Scope {
    #[must_use]
    pub fn sees(&self, group: &str) -> bool {
        match self {
            Self::All => true,
            Self::Groups(groups) => groups.iter().any(|g| g == group),
        }
    }
}

/// What `request` needs, and a few words naming it for refusals.
#[must_use]
pub fn need_of(request: &Request) -> (Need, &'static str) {
    match request {
        Request::GroupCreate { .. } => (Need::Admin, "create a group"),
        Request::GroupDelete { .. } => (Need::Admin, "delete a group"),
        Request::GroupMove { .. } => (Need::Admin, "move a group to another core"),
        Request::TestFailover { name, .. } => (Need::Operate(name.clone()), "run a test failover"),
        Request::GroupPromote { name } => (Need::Operate(name.clone()), "promote a destination"),
        Request::SnapshotCreate { group, .. } => (Need::Operate(group.clone()), "take a snapshot"),
        Request::SnapshotDelete { group, .. } => (Need::Operate(group.clone()), "delete a snapshot"),
        Request::DelegationGrant { .. } | Request::DelegationRevoke { .. } => (Need::Admin, "change delegations"),
        Request::DelegationList => (Need::Admin, "list delegations"),
        Request::GroupList
        | Request::Status
        | Request::GroupShow { .. }
        | Request::PartnershipShow { .. }
        | Request::Events { .. }
        | Request::Node => (Need::Read, "read status"),
        Request::PartnershipCreate { source_group, .. } => {
            (Need::Operate(source_group.clone()), "create a partnership")
        }
        Request::PartnershipRemove { group } => (Need::Operate(group.clone()), "remove a partnership"),
        Request::PartnershipVerify { group, .. } => (Need::Operate(group.clone()), "verify a partnership"),
        Request::PartnershipSet { group, .. } => (Need::Operate(group.clone()), "change a partnership's mode"),
        // The group it changes on this node is resolved by the daemon from
        // the peer's name, so only administrators may ask.
        Request::PartnershipFailback { group, .. } => (Need::Operate(group.clone()), "fail back a group"),
        Request::PartnershipResolve { group, .. } => (Need::Operate(group.clone()), "resolve a split brain"),
        Request::PartnershipSwitch { .. } => (Need::Admin, "switch a partnership's direction"),
        Request::EngineSet { group, .. } => (Need::Operate(group.clone()), "tune a group"),
    }
}

/// The grants of a node, kept in `state_dir/delegations.json`.
pub struct Delegations {
    path: PathBuf,
    entries: Mutex<Vec<Delegation>>,
}

impl Delegations {
    /// Loads the grants (none when the file does not exist).
    pub fn load(state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join("delegations.json");
        let entries = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{} is damaged: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(Self { path, entries: Mutex::new(entries) })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Delegation>> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn save(&self, entries: &[Delegation]) -> Result<(), String> {
        let temporary = self.path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(entries).expect("delegations serialize");
        std::fs::write(&temporary, text).map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
        std::fs::rename(&temporary, &self.path).map_err(|e| format!("cannot replace {}: {e}", self.path.display()))
    }

    #[must_use]
    pub fn list(&self) -> Vec<Delegation> {
        self.entries().clone()
    }

    /// Grants `role` on `group` to `user` (replacing an earlier role there).
    pub fn grant(&self, user: &str, group: &str, role: Role) -> Result<String, String> {
        let uid = uid_of(user).ok_or_else(|| format!("there is no user {user} on this node"))?;
        let mut entries = self.entries();
        let mut updated = entries.clone();
        updated.retain(|d| !(d.uid == uid && d.group == group));
        updated.push(Delegation { user: user.to_owned(), uid, group: group.to_owned(), role });
        self.save(&updated)?;
        *entries = updated;
        Ok(format!("{user} (uid {uid}) is now {} of {group}", role_text(role)))
    }

    /// Takes back what `user` was granted on `group`.
    pub fn revoke(&self, user: &str, group: &str) -> Result<String, String> {
        let mut entries = self.entries();
        let mut updated = entries.clone();
        updated.retain(|d| !(d.user == user && d.group == group));
        if updated.len() == entries.len() {
            return Err(format!("{user} has no delegation on {group}"));
        }
        self.save(&updated)?;
        *entries = updated;
        Ok(format!("{user} no longer has a role on {group}"))
    }

    /// Whether `caller` may make `request`, and what it may see; the
    /// refusal names who, what, and how to get it.
    pub fn authorize(&self, caller: &Caller, request: &Request) -> Result<Scope, String> {
        if caller.admin {
            return Ok(Scope::All);
        }
        let (need, action) = need_of(request);
        let mine: Vec<Delegation> = self.entries().iter().filter(|d| d.uid == caller.uid).cloned().collect();
        let who = format!("{} (uid {})", caller.user, caller.uid);
        let refused = match need {
            Need::Admin => format!(
                "{who} may not {action}: only root and members of group {ADMIN_GROUP} may"
            ),
            Need::Read if !mine.is_empty() => return Ok(Scope::Groups(mine.into_iter().map(|d| d.group).collect())),
            Need::Read => format!(
                "{who} may not {action}: no role on any group of this node; an administrator can grant one with `tandem delegation grant --user {} --group GROUP --role viewer`",
                caller.user
            ),
            Need::Operate(group) => match mine.iter().find(|d| d.group == group) {
                Some(d) if d.role == Role::Operator => return Ok(Scope::Groups(vec![group])),
                Some(_) => format!(
                    "{who} may not {action} on {group}: a viewer there only reads; an administrator can run `tandem delegation grant --user {} --group {group} --role operator`",
                    caller.user
                ),
                None => format!(
                    "{who} may not {action} on {group}: no role on {group}; an administrator can run `tandem delegation grant --user {} --group {group} --role operator`",
                    caller.user
                ),
            },
        };
        tracing::warn!(uid = caller.uid, user = %caller.user, action, "management request refused");
        Err(refused)
    }
}

fn role_text(role: Role) -> &'static str {
    match role {
        Role::Operator => "an operator",
        Role::Viewer => "a viewer",
    }
}

/// The caller of `stream` (SO_PEERCRED), administrator or not.
pub fn caller_of(stream: &UnixStream) -> Result<Caller, String> {
    let mut credentials = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `length` bytes into the ucred we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut credentials).cast(),
            &raw mut length,
        )
    };
    if rc != 0 {
        return Err(format!("cannot tell who is calling: {}", std::io::Error::last_os_error()));
    }
    let user = name_of(credentials.uid).unwrap_or_else(|| format!("uid{}", credentials.uid));
    // SAFETY: geteuid has no preconditions.
    let daemon_uid = unsafe { libc::geteuid() };
    let admin = credentials.uid == 0 || credentials.uid == daemon_uid || in_admin_group(&user, credentials.gid);
    Ok(Caller { uid: credentials.uid, user, admin })
}

fn name_of(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: passwd is plain old data; getpwuid_r fills it with pointers into `buf`.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives the read of pw_name.
    let rc = unsafe { libc::getpwuid_r(uid, &raw mut passwd, buf.as_mut_ptr(), buf.len(), &raw mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_name points into `buf`, NUL-terminated by getpwuid_r.
    Some(unsafe { CStr::from_ptr(passwd.pw_name) }.to_string_lossy().into_owned())
}

fn uid_of(user: &str) -> Option<u32> {
    let name = CString::new(user).ok()?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: as in name_of.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &raw mut passwd, buf.as_mut_ptr(), buf.len(), &raw mut result) };
    (rc == 0 && !result.is_null()).then_some(passwd.pw_uid)
}

fn in_admin_group(user: &str, primary_gid: u32) -> bool {
    let Ok(group) = CString::new(ADMIN_GROUP) else { return false };
    // SAFETY: getgrnam returns a pointer to static storage or null; only gr_gid is read.
    let admin_gid = unsafe {
        let entry = libc::getgrnam(group.as_ptr());
        if entry.is_null() {
            return false;
        }
        (*entry).gr_gid
    };
    if primary_gid == admin_gid {
        return true;
    }
    let Ok(name) = CString::new(user) else { return false };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), primary_gid, groups.as_mut_ptr(), &raw mut count) };
    rc >= 0 && groups[..count as usize].contains(&admin_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delegations(entries: Vec<Delegation>) -> Delegations {
        Delegations { path: PathBuf::from("/nonexistent/delegations.json"), entries: Mutex::new(entries) }
    }

    #[test]
    fn roles_decide_what_a_user_may_do() {
        let alice = Caller { uid: 1001, user: "alice".into(), admin: false };
        let grants = delegations(vec![
            Delegation { user: "alice".into(), uid: 1001, group: "rg01".into(), role: Role::Viewer },
            Delegation { user: "alice".into(), uid: 1001, group: "rg02".into(), role: Role::Operator },
        ]);
        let scope = grants.authorize(&alice, &Request::Status).unwrap();
        assert!(scope.sees("rg01") && scope.sees("rg02") && !scope.sees("rg03"));
        grants.authorize(&alice, &Request::PartnershipRemove { group: "rg02".into() }).unwrap();
        let viewer = grants.authorize(&alice, &Request::PartnershipRemove { group: "rg01".into() }).unwrap_err();
        assert!(
            viewer.contains("alice (uid 1001) may not remove a partnership on rg01: a viewer there only reads"),
            "{viewer}"
        );
        let admin_only = grants.authorize(&alice, &Request::GroupDelete { name: "rg02".into() }).unwrap_err();
        assert!(admin_only.contains("only root and members of group tandem-admin"), "{admin_only}");
        let bob = Caller { uid: 1002, user: "bob".into(), admin: false };
        assert!(grants.authorize(&bob, &Request::Status).unwrap_err().contains("no role on any group"));
        let root = Caller { uid: 0, user: "root".into(), admin: true };
        assert_eq!(grants.authorize(&root, &Request::GroupDelete { name: "x".into() }).unwrap(), Scope::All);
    }
}
