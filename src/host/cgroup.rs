//! What the kernel says about this process's memory: the memory cgroup it lives in (v2
//! `memory.max` / `memory.high`, v1 `memory.limit_in_bytes`, as systemd's `MemoryMax=`,
//! `docker run --memory` and Kubernetes set them), how much of it is in use, and
//! `MemAvailable` from `/proc/meminfo`.
//!
//! The cgroup is found the way the kernel documents it: the process's path from
//! `/proc/self/cgroup`, under the mount of that hierarchy from `/proc/self/mountinfo`
//! (whose root may itself be a sub-path, as in a container without a cgroup namespace).
//! The parsers are pure; [`MemoryCgroup::of_self`] and [`mem_available`] read the files.
//! A leaf module.

use std::path::{Path, PathBuf};

/// Which cgroup interface the memory controller is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// The legacy hierarchy (`memory.limit_in_bytes`).
    V1,
    /// The unified hierarchy (`memory.max`).
    V2,
}

/// Values at or above this are v1's "no limit" (`PAGE_COUNTER_MAX` pages, rounded).
const V1_UNLIMITED: u64 = 1 << 62;

/// This process's memory cgroup: its directory in the mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryCgroup {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// The cgroup's directory (e.g. `/sys/fs/cgroup/system.slice/mistral-bot.service`).
    pub dir: PathBuf,
    /// The mount point of the hierarchy: limits are looked for up to here.
    pub mount_point: PathBuf,
}

/// The memory controller's path in each interface, from `/proc/self/cgroup`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCgroup {
    /// `N:…memory…:/path` (v1).
    pub v1_memory: Option<String>,
    /// `0::/path` (v2).
    pub v2: Option<String>,
}

/// Parses `/proc/self/cgroup` (`hierarchy-id:controllers:path` per line).
pub fn parse_proc_cgroup(text: &str) -> ProcCgroup {
    let mut found = ProcCgroup::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            found.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            found.v1_memory = Some(path.to_string());
        }
    }
    found
}

/// A cgroup hierarchy mounted somewhere, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// v2 (`cgroup2`), or v1 with the memory controller.
    pub version: CgroupVersion,
    /// The path inside the hierarchy that is mounted (`/` unless bind-mounted deeper).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// Parses `/proc/self/mountinfo`: the cgroup2 mounts and the v1 mounts holding the
/// memory controller (`id parent major:minor root mount-point options [optional…] -
/// fstype source super-options`).
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let fstype = fields.get(dash + 1).copied().unwrap_or_default();
        let super_options = fields.get(dash + 3).copied().unwrap_or_default();
        let version = match fstype {
            "cgroup2" => CgroupVersion::V2,
            "cgroup" if super_options.split(',').any(|o| o == "memory") => CgroupVersion::V1,
            _ => continue,
        };
        mounts.push(CgroupMount {
            version,
            root: unescape(root),
            mount_point: PathBuf::from(unescape(mount_point)),
        });
    }
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's memory cgroup from the two files' text. The v1 memory controller wins
/// when both exist (a hybrid host: memory is accounted there). A path outside the mount's
/// root (a container without a cgroup namespace sees the host's path) means the mount
/// itself is the cgroup.
pub fn locate(proc_cgroup: &str, mountinfo: &str) -> Option<MemoryCgroup> {
    let paths = parse_proc_cgroup(proc_cgroup);
    let mounts = parse_mountinfo(mountinfo);
    let pick = |version: CgroupVersion, path: Option<String>| {
        let path = path?;
        let mount = mounts.iter().find(|m| m.version == version)?;
        let relative = if mount.root == "/" {
            Some(path.as_str())
        } else {
            path.strip_prefix(&mount.root)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        let mut dir = mount.mount_point.clone();
        for part in relative.unwrap_or("").split('/') {
            // Never leave the mount: `..` or `.` in a path is not followed.
            if !part.is_empty() && part != "." && part != ".." {
                dir.push(part);
            }
        }
        Some(MemoryCgroup {
            version,
            dir,
            mount_point: mount.mount_point.clone(),
        })
    };
    pick(CgroupVersion::V1, paths.v1_memory).or_else(|| pick(CgroupVersion::V2, paths.v2))
}

/// A limit file's value in bytes: `max` (v2) or a v1 "unlimited" value is `None`.
pub fn parse_limit(text: &str) -> Option<u64> {
    let value = text.trim();
    if value == "max" {
        return None;
    }
    value.parse::<u64>().ok().filter(|&v| v < V1_UNLIMITED)
}

/// The value of `key` in a `memory.stat`-style file (`key value` per line).
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// `MemAvailable` (or another `key`) of `/proc/meminfo`, in bytes.
pub fn meminfo_bytes(text: &str, key: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// `MemAvailable` of this host now, where Linux tells.
pub fn mem_available() -> Option<u64> {
    meminfo_bytes(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl MemoryCgroup {
    /// This process's memory cgroup, if the host has one mounted.
    pub fn of_self() -> Option<Self> {
        let cgroup = read(Path::new("/proc/self/cgroup"))?;
        let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
        let found = locate(&cgroup, &mountinfo)?;
        found.dir.is_dir().then_some(found)
    }

    /// The limit this process must stay under: the lowest of its cgroup's and every
    /// ancestor's (v2 `memory.max` and `memory.high`; v1 `memory.limit_in_bytes` and the
    /// `hierarchical_memory_limit` of `memory.stat`). `None`: unlimited.
    pub fn limit(&self) -> Option<u64> {
        match self.version {
            CgroupVersion::V1 => {
                let own =
                    read(&self.dir.join("memory.limit_in_bytes")).and_then(|t| parse_limit(&t));
                let hierarchical = read(&self.dir.join("memory.stat"))
                    .and_then(|t| stat_value(&t, "hierarchical_memory_limit"))
                    .filter(|&v| v < V1_UNLIMITED);
                own.into_iter().chain(hierarchical).min()
            }
            CgroupVersion::V2 => self
                .dir
                .ancestors()
                .take_while(|dir| dir.starts_with(&self.mount_point) && *dir != self.mount_point)
                .flat_map(|dir| {
                    ["memory.max", "memory.high"]
                        .map(|file| read(&dir.join(file)).and_then(|t| parse_limit(&t)))
                })
                .flatten()
                .min(),
        }
    }

    /// The memory in use that the kernel cannot simply drop: the cgroup's usage less its
    /// inactive file cache (the "working set" `docker stats` and the kubelet show). Page
    /// cache of files written (park files) or read (the model) is reclaimed before the
    /// OOM killer acts, so it does not count.
    pub fn working_set(&self) -> Option<u64> {
        let (usage_file, inactive_key) = match self.version {
            CgroupVersion::V1 => ("memory.usage_in_bytes", "total_inactive_file"),
            CgroupVersion::V2 => ("memory.current", "inactive_file"),
        };
        let usage: u64 = read(&self.dir.join(usage_file))?.trim().parse().ok()?;
        let inactive = read(&self.dir.join("memory.stat"))
            .and_then(|t| stat_value(&t, inactive_key))
            .unwrap_or(0);
        Some(usage.saturating_sub(inactive))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V1_CGROUP: &str = "12:pids:/user.slice\n4:memory:/process_api/f523\n0::/\n";
    const V1_MOUNTS: &str = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
30 25 0:27 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
31 25 0:28 / /sys/fs/cgroup/pids rw,relatime shared:14 - cgroup cgroup rw,pids
";
    const V2_CGROUP: &str = "0::/system.slice/mistral-bot.service\n";
    const V2_MOUNTS: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn v1_memory_is_found_under_its_mount() {
        let found = locate(V1_CGROUP, V1_MOUNTS).unwrap();
        assert_eq!(found.version, CgroupVersion::V1);
        assert_eq!(
            found.dir,
            Path::new("/sys/fs/cgroup/memory/process_api/f523")
        );
    }

    #[test]
    fn v2_is_found_when_no_v1_memory_controller_is_mounted() {
        let found = locate(V2_CGROUP, V2_MOUNTS).unwrap();
        assert_eq!(found.version, CgroupVersion::V2);
        assert_eq!(
            found.dir,
            Path::new("/sys/fs/cgroup/system.slice/mistral-bot.service")
        );
    }

    #[test]
    fn a_container_mount_of_a_deeper_root_is_the_cgroup_itself() {
        // docker without a cgroup namespace: /proc/self/cgroup names the host's path, and
        // the container's mount is that very cgroup.
        let mounts = "40 30 0:27 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n";
        let found = locate("5:memory:/docker/abc\n", mounts).unwrap();
        assert_eq!(found.dir, Path::new("/sys/fs/cgroup/memory"));
        let found = locate("5:memory:/elsewhere\n", mounts).unwrap();
        assert_eq!(found.dir, Path::new("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn limits_read_like_the_kernel_writes_them() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_limit("lots"), None);
        let stat = "cache 10\nhierarchical_memory_limit 2048\ntotal_inactive_file 7\n";
        assert_eq!(stat_value(stat, "hierarchical_memory_limit"), Some(2048));
        assert_eq!(stat_value(stat, "total_inactive_file"), Some(7));
        assert_eq!(stat_value(stat, "inactive_file"), None);
        let meminfo = "MemTotal:       24684520 kB\nMemAvailable:   23109876 kB\n";
        assert_eq!(
            meminfo_bytes(meminfo, "MemAvailable"),
            Some(23_109_876 * 1024)
        );
        assert_eq!(meminfo_bytes(meminfo, "MemFree"), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
        assert_eq!(unescape(r"\\"), r"\\");
    }

    #[test]
    fn this_process_reads_its_own_cgroup_without_failing() {
        // Whatever the host: no panic, and a found cgroup has a readable usage.
        if let Some(cgroup) = MemoryCgroup::of_self() {
            let _ = cgroup.limit();
            assert!(cgroup.working_set().is_some(), "{cgroup:?}");
        }
        assert!(mem_available().is_some());
    }

    proptest! {
        #[test]
        fn the_parsers_never_panic_and_never_leave_the_mount(
            cgroup in "[0-9a-z:,/. \n]{0,80}",
            mounts in "[0-9a-z:,/. \\\\-]{0,120}(\n[0-9a-z:,/. \\\\-]{0,120}){0,3}",
            text in "\\PC{0,40}",
        ) {
            if let Some(found) = locate(&cgroup, &mounts) {
                prop_assert!(found.dir.starts_with(&found.mount_point));
                prop_assert!(!found.dir.components().any(|c| c == std::path::Component::ParentDir));
            }
            let _ = parse_limit(&text);
            let _ = stat_value(&text, "x");
            let _ = meminfo_bytes(&text, "MemAvailable");
            let _ = unescape(&text);
        }

        #[test]
        fn any_cgroup_path_lands_under_the_mount(
            path in proptest::collection::vec("[a-z.]{1,6}", 0..5),
        ) {
            let path = format!("/{}", path.join("/"));
            let found = locate(&format!("0::{path}\n"), V2_MOUNTS).unwrap();
            prop_assert!(found.dir.starts_with("/sys/fs/cgroup"));
            prop_assert!(!found.dir.components().any(|c| c == std::path::Component::ParentDir));
        }
    }
}
