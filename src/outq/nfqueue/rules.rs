//! The netfilter rules that send a device's packets to castor's queue:
//! checked at start-up (a queue nobody feeds holds nothing, silently), and
//! optionally installed and removed by castor (`--nfqueue-dev DEV`).
//!
//! What holds what (Linux 6.18 as configured here, iptables-nft 1.8):
//! - IPv4: `iptables -t mangle -I PREROUTING -i DEV -j NFQUEUE --queue-num N`
//!   (`-m physdev --physdev-in DEV` for a bridge port: with br_netfilter,
//!   bridged packets traverse iptables with the bridge as in-device).
//! - IPv6: the same with ip6tables.
//! - ARP: no queue exists for it (see [`super::arp`]); for a bridge port a
//!   netdev-ingress rule drops ARP from DEV while castor holds a copy.
//!
//! Installed rules are removed when [`Installed`] is dropped. If castor is
//! killed they stay, and with no listener on the queue the kernel drops
//! what they match: output stays held (lost, never leaked). Every rule
//! castor installs carries its owner (`castor:pid=PID:ns=PIDNS:start=TICKS:dev=DEV`,
//! an iptables comment and an nft table comment), so the next castor
//! installing rules for DEV removes those of a dead owner first
//! ([`install`] says so) and refuses DEV while a live castor holds it.
//! Without that sweep a rule of a killed castor stayed in front of the
//! chain: after the next castor's clean stop it went on dropping the
//! device's traffic. The owner is the process (pid and start time) in its
//! PID namespace: a reused pid is not the owner, and an owner in another
//! PID namespace cannot be checked from here, so its rules are kept and
//! the device refused, with how to remove them if that castor is gone.

use std::process::Command;

use super::arp;

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("running `{cmd}`: {source} (install iptables/nftables)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("no {family} rule sends packets to NFQUEUE queue {queue}, so that traffic would leave unheld. Add one, e.g.\n    {example}\nor let castor install and remove it with --nfqueue-dev DEV")]
    Missing {
        family: &'static str,
        queue: u16,
        example: String,
    },
    #[error("{dev} is a port of bridge {bridge} but {sysctl} is 0, so its {family} packets bypass iptables; set it to 1 (needs br_netfilter)")]
    BridgeNf {
        dev: String,
        bridge: String,
        sysctl: &'static str,
        family: &'static str,
    },
    #[error("no network device named {0:?}")]
    NoDevice(String),
    #[error("{dev}'s output is already held by castor pid {pid}{whose} (its rules are installed); stop that castor first")]
    Held {
        dev: String,
        pid: u32,
        whose: String,
    },
}

/// Who installed a rule: a castor process, named so that another castor
/// can tell whether it still runs. `ns` is the inode of its PID namespace
/// and `start` its start time (clock ticks after boot, `/proc/PID/stat`
/// field 22): a pid means nothing in another PID namespace, and a dead
/// owner's pid may since belong to another process, even another castor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid: u32,
    ns: u64,
    start: u64,
}

impl Owner {
    /// This process.
    fn me() -> Owner {
        Owner::of(std::process::id())
    }

    /// Process `pid` as this process sees it now (0 for what it cannot read).
    fn of(pid: u32) -> Owner {
        Owner {
            pid,
            ns: pid_namespace(pid).unwrap_or(0),
            start: start_time(pid).unwrap_or(0),
        }
    }

    /// Whether it is still running, as far as this process can tell; None
    /// when it cannot (the owner lives in another PID namespace).
    fn running(&self) -> Option<bool> {
        let mine = pid_namespace(std::process::id())?;
        if self.ns != mine {
            return None;
        }
        Some(start_time(self.pid) == Some(self.start))
    }
}

/// The inode of `pid`'s PID namespace (as seen from this process).
fn pid_namespace(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| m.ino())
}

/// `pid`'s start time, clock ticks after boot (`/proc/PID/stat` field 22).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis (field 3 is the first there).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The owner comment castor puts on the rules it installs.
fn owner_tag(o: Owner, dev: &str) -> String {
    format!(
        "castor:pid={}:ns={}:start={}:dev={dev}",
        o.pid, o.ns, o.start
    )
}

/// The owner and device of a rule or table text carrying [`owner_tag`].
fn owner_of(text: &str) -> Option<(Owner, &str)> {
    let rest = &text[text.find("castor:pid=")? + "castor:pid=".len()..];
    let (ids, rest) = rest.split_once(":dev=")?;
    let mut ids = ids.split(':');
    let pid = ids.next()?.parse().ok()?;
    let ns = ids.next()?.strip_prefix("ns=")?.parse().ok()?;
    let start = ids.next()?.strip_prefix("start=")?.parse().ok()?;
    if ids.next().is_some() {
        return None;
    }
    let dev = rest
        .split(|c: char| c.is_whitespace() || c == '"')
        .next()
        .filter(|d| !d.is_empty())?;
    Some((Owner { pid, ns, start }, dev))
}

/// Whether rules of `owner` must be kept: it is another castor that still
/// runs, or one this process cannot see (another PID namespace; kept, and
/// refused, rather than taking a live copy's output hold away).
fn held_by(owner: Owner, me: Owner) -> bool {
    owner != me && owner.running() != Some(false)
}

/// The arguments that delete the rule an `iptables-save` line `-A ...`
/// adds (quotes removed; castor's own rules have no spaces inside them).
fn delete_args(line: &str) -> Option<Vec<String>> {
    let rule = line.strip_prefix("-A ")?;
    let mut args: Vec<String> = ["-w", "-t", "mangle", "-D"].map(String::from).to_vec();
    args.extend(
        rule.split_whitespace()
            .map(|w| w.trim_matches('"').to_string()),
    );
    Some(args)
}

/// Removes the rules and the ARP table a castor that is no longer running
/// left for `dev`; returns what it removed. A running castor's are kept
/// and refused with [`RuleError::Held`].
fn sweep(dev: &str, arp_table: &str) -> Result<Vec<String>, RuleError> {
    let me = Owner::me();
    let mut removed = Vec::new();
    for (tool, save) in [
        ("iptables", "iptables-save"),
        ("ip6tables", "ip6tables-save"),
    ] {
        for line in run(save, &["-t", "mangle"], None)?.lines() {
            let Some((owner, d)) = owner_of(line).filter(|(_, d)| *d == dev) else {
                continue;
            };
            if held_by(owner, me) {
                return Err(held(d, owner));
            }
            if let Some(args) = delete_args(line) {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                run(tool, &a, None)?;
                removed.push(format!("{tool} rule of castor pid {}", owner.pid));
            }
        }
    }
    if let Ok(table) = run("nft", &["list", "table", "netdev", arp_table], None) {
        match owner_of(&table) {
            Some((owner, _)) if held_by(owner, me) => return Err(held(dev, owner)),
            owner => {
                run("nft", &["delete", "table", "netdev", arp_table], None)?;
                let who = owner.map_or("an older castor".into(), |(o, _)| {
                    format!("castor pid {}", o.pid)
                });
                removed.push(format!("nft table {arp_table} of {who}"));
            }
        }
    }
    Ok(removed)
}

/// The refusal for a device whose rules `owner` holds.
fn held(dev: &str, owner: Owner) -> RuleError {
    RuleError::Held {
        dev: dev.into(),
        pid: owner.pid,
        whose: match owner.running() {
            Some(_) => String::new(),
            None => format!(
                " in another PID namespace (inode {}), which this castor cannot see; if it is \
                 gone, delete the rules tagged castor:pid={} (iptables-save -t mangle, nft list \
                 tables)",
                owner.ns, owner.pid
            ),
        },
    }
}

fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RuleError> {
    use std::io::Write;
    let cmd = format!("{prog} {}", args.join(" "));
    let mut c = Command::new(prog);
    c.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().map_err(|source| RuleError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    if let Some(s) = stdin {
        let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
    }
    drop(child.stdin.take());
    let out = child
        .wait_with_output()
        .map_err(|source| RuleError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(RuleError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether an `iptables-save` rule line queues to `queue`.
fn save_line_queues(line: &str, queue: u16) -> bool {
    if !line.starts_with("-A ") || !line.contains("-j NFQUEUE") {
        return false;
    }
    let w: Vec<&str> = line.split_whitespace().collect();
    let arg = |name: &str| w.iter().position(|x| *x == name).and_then(|i| w.get(i + 1));
    if let Some(n) = arg("--queue-num") {
        return n.parse::<u16>() == Ok(queue);
    }
    if let Some(r) = arg("--queue-balance") {
        if let Some((a, b)) = r.split_once(':') {
            return matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= queue && queue <= b);
        }
        return false;
    }
    queue == 0
}

/// Whether `nft list ruleset` text queues `family` traffic (ip, ip6; inet
/// counts for both) to `queue`.
fn nft_queues(ruleset: &str, family: &str, queue: u16) -> bool {
    let mut fam = "";
    for line in ruleset.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("table ") {
            fam = rest.split_whitespace().next().unwrap_or("");
            continue;
        }
        if fam != family && fam != "inet" {
            continue;
        }
        let w: Vec<&str> = t.split_whitespace().collect();
        if let Some(i) = w.iter().position(|x| *x == "queue") {
            let num = w[i..]
                .iter()
                .position(|x| *x == "num")
                .and_then(|j| w.get(i + j + 1));
            match num {
                None if queue == 0 => return true,
                Some(n) => {
                    if n.parse::<u16>() == Ok(queue) {
                        return true;
                    }
                    if let Some((a, b)) = n.split_once('-') {
                        if matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= queue && queue <= b)
                        {
                            return true;
                        }
                    }
                }
                None => {}
            }
        }
    }
    false
}

/// Checks that IPv4 and IPv6 packets are sent to `queue` by some rule
/// (iptables, ip6tables, or native nftables).
pub fn check(queue: u16) -> Result<(), RuleError> {
    let nft = run("nft", &["list", "ruleset"], None).unwrap_or_default();
    for (family, save, nfam, tool) in [
        ("IPv4", "iptables-save", "ip", "iptables"),
        ("IPv6", "ip6tables-save", "ip6", "ip6tables"),
    ] {
        let saved = run(save, &[], None)?;
        if saved.lines().any(|l| save_line_queues(l, queue)) || nft_queues(&nft, nfam, queue) {
            continue;
        }
        return Err(RuleError::Missing {
            family,
            queue,
            example: format!(
                "{tool} -t mangle -I PREROUTING -i DEV -j NFQUEUE --queue-num {queue}"
            ),
        });
    }
    Ok(())
}

/// Rules castor installed for one device; removed on drop.
pub struct Installed {
    /// (program, args to delete).
    undo: Vec<(String, Vec<String>)>,
    arp_table: Option<String>,
    pub dev: String,
    /// The bridge DEV is a port of (ARP is held only then).
    pub bridge: Option<String>,
}

fn sysctl_is_one(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.trim() == "1")
}

/// Installs the rules holding `dev`'s IPv4, IPv6 and (bridge port) ARP
/// output in `queue`.
pub fn install(queue: u16, dev: &str) -> Result<Installed, RuleError> {
    if !std::path::Path::new(&format!("/sys/class/net/{dev}")).exists() || dev.contains('/') {
        return Err(RuleError::NoDevice(dev.to_string()));
    }
    let bridge = arp::bridge_of(dev);
    if let Some(b) = &bridge {
        for (sysctl, family) in [
            ("bridge-nf-call-iptables", "IPv4"),
            ("bridge-nf-call-ip6tables", "IPv6"),
        ] {
            if !sysctl_is_one(&format!("/proc/sys/net/bridge/{sysctl}")) {
                return Err(RuleError::BridgeNf {
                    dev: dev.into(),
                    bridge: b.clone(),
                    sysctl,
                    family,
                });
            }
        }
    }
    let table = format!(
        "castor_arp_{}",
        dev.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    for what in sweep(dev, &table)? {
        eprintln!("castor: {dev}: removed the stale {what} (killed before it could remove it)");
    }
    let q = queue.to_string();
    let tag = owner_tag(Owner::me(), dev);
    let mut m: Vec<&str> = match bridge {
        Some(_) => vec!["-m", "physdev", "--physdev-in", dev],
        None => vec!["-i", dev],
    };
    m.extend(["-m", "comment", "--comment", &tag]);
    m.extend(["-j", "NFQUEUE", "--queue-num", &q]);
    let mut inst = Installed {
        undo: Vec::new(),
        arp_table: None,
        dev: dev.into(),
        bridge: bridge.clone(),
    };
    for tool in ["iptables", "ip6tables"] {
        let mut args = vec!["-w", "-t", "mangle", "-I", "PREROUTING"];
        args.extend(&m);
        run(tool, &args, None)?;
        let mut del = vec!["-w", "-t", "mangle", "-D", "PREROUTING"];
        del.extend(&m);
        inst.undo
            .push((tool.into(), del.iter().map(|s| s.to_string()).collect()));
    }
    if bridge.is_some() {
        let script = format!(
            "table netdev {table} {{\n  comment \"{tag}\"\n  chain hold {{\n    type filter hook ingress device \"{dev}\" priority -500; policy accept;\n    ether type arp drop\n  }}\n}}\n"
        );
        run("nft", &["-f", "-"], Some(&script))?;
        inst.arp_table = Some(table);
    }
    Ok(inst)
}

impl Installed {
    pub fn describe(&self) -> String {
        match &self.bridge {
            Some(b) => format!(
                "{}: IPv4/IPv6 by physdev rule, ARP by netdev drop + castor copy into bridge {b}",
                self.dev
            ),
            None => format!(
                "{}: IPv4/IPv6 by -i rule; ARP NOT held (not a bridge port)",
                self.dev
            ),
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        for (prog, args) in &self.undo {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            if let Err(e) = run(prog, &a, None) {
                eprintln!("castor: removing an NFQUEUE rule: {e}");
            }
        }
        if let Some(t) = &self.arp_table {
            if let Err(e) = run("nft", &["delete", "table", "netdev", t], None) {
                eprintln!("castor: removing the ARP hold rule: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_iptables_save_lines() {
        let l = "-A PREROUTING -i vh0 -j NFQUEUE --queue-num 5";
        assert!(save_line_queues(l, 5));
        assert!(!save_line_queues(l, 6));
        assert!(save_line_queues("-A FORWARD -j NFQUEUE", 0));
        assert!(!save_line_queues("-A FORWARD -j NFQUEUE", 1));
        assert!(save_line_queues(
            "-A FORWARD -j NFQUEUE --queue-balance 4:7",
            6
        ));
        assert!(!save_line_queues("-A FORWARD -j ACCEPT", 0));
        assert!(!save_line_queues(":PREROUTING ACCEPT [0:0]", 0));
    }

    #[test]
    fn reads_the_owner_of_a_rule_or_table() {
        let o = Owner {
            pid: 4242,
            ns: 4026531836,
            start: 987,
        };
        let tag = owner_tag(o, "vif3.0");
        let line = format!(
            "-A PREROUTING -m physdev --physdev-in vif3.0 -m comment --comment \"{tag}\" -j NFQUEUE --queue-num 0"
        );
        assert_eq!(owner_of(&line), Some((o, "vif3.0")));
        let bare = line.replace('"', "");
        assert_eq!(owner_of(&bare), Some((o, "vif3.0")));
        let table = format!(
            "table netdev castor_arp_hg {{\n\tcomment \"{}\"\n}}",
            owner_tag(Owner { pid: 7, ..o }, "hg")
        );
        assert_eq!(owner_of(&table), Some((Owner { pid: 7, ..o }, "hg")));
        for bad in [
            "castor:pid=x:ns=1:start=2:dev=hg",
            "castor:pid=5:ns=1:start=2:dev=",
            "castor:pid=5:ns=1:dev=hg",
            "castor:pid=5:ns=1:start=2:x=3:dev=hg",
            "castor:pid=5:start=2:ns=1:dev=hg",
            "castor:pid=5",
            "-A X -j ACCEPT",
        ] {
            assert_eq!(owner_of(bad), None, "{bad}");
        }
        assert_eq!(
            delete_args(&line).unwrap()[4..],
            bare.strip_prefix("-A ")
                .unwrap()
                .split(' ')
                .map(String::from)
                .collect::<Vec<_>>()[..]
        );
    }

    /// A rule's owner is alive only if the very process (pid and start
    /// time) runs in this PID namespace; another namespace's is unknown,
    /// so kept.
    #[test]
    fn an_owner_is_this_process_only_with_its_start_time_and_namespace() {
        let me = Owner::me();
        assert!(me.ns != 0 && me.start != 0, "{me:?}");
        assert_eq!(me.running(), Some(true));
        let reused = Owner {
            start: me.start + 1,
            ..me
        };
        assert_eq!(
            reused.running(),
            Some(false),
            "a reused pid is not the owner"
        );
        let elsewhere = Owner {
            ns: me.ns + 1,
            ..me
        };
        assert_eq!(elsewhere.running(), None);
        assert!(!held_by(me, me));
        assert!(!held_by(reused, me));
        assert!(held_by(elsewhere, me));
        let parent = Owner::of(std::os::unix::process::parent_id());
        assert!(held_by(parent, me), "a running process holds its rules");
        assert!(held("vif1.0", elsewhere)
            .to_string()
            .contains("another PID namespace"));
    }

    #[test]
    fn recognises_nft_rules_per_family() {
        let r = "table ip mangle {\n chain PREROUTING {\n  iifname \"vb\" counter packets 0 bytes 0 queue num 5\n }\n}\ntable ip6 t {\n chain c {\n  queue num 2-4\n }\n}\n";
        assert!(nft_queues(r, "ip", 5));
        assert!(!nft_queues(r, "ip6", 5));
        assert!(nft_queues(r, "ip6", 3));
        assert!(!nft_queues(r, "ip", 3));
        assert!(nft_queues("table inet x {\n queue num 9\n}", "ip6", 9));
    }
}
