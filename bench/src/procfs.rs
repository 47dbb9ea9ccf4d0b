//! What `bench` reads from `/proc`: CPU time and memory of a process tree,
//! and the machine's CPU steal.

use std::fs;

/// Clock ticks per second for `/proc/*/stat` times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// (ppid, utime + stime in ticks) of a process, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): ppid = field 4, utime = 14, stime = 15.
    let ppid = f.get(1)?.parse().ok()?;
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, ut + st))
}

/// `root` and all its descendants.
pub fn tree(root: u32) -> Vec<u32> {
    let mut all = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat(pid) {
                    all.push((pid, ppid));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU seconds (user + system) used so far by `root` and its descendants.
pub fn tree_cpu(root: u32) -> f64 {
    let ticks: u64 = tree(root)
        .iter()
        .filter_map(|&p| stat(p))
        .map(|(_, t)| t)
        .sum();
    ticks as f64 / clk_tck()
}

/// Proportional set size (KiB) of the tree: shared pages split between the
/// processes that map them, so multi-process servers are not over-counted.
pub fn tree_pss_kib(root: u32) -> u64 {
    tree(root)
        .iter()
        .filter_map(|&p| {
            let s = fs::read_to_string(format!("/proc/{p}/smaps_rollup")).ok()?;
            s.lines()
                .find(|l| l.starts_with("Pss:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Aggregate CPU counters from `/proc/stat`: (steal, total) in ticks.
pub fn steal_total() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already inside user.
    let total: u64 = v.iter().take(8).sum();
    (v.get(7).copied().unwrap_or(0), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(stat(me).is_some());
        assert!(tree(me).contains(&me));
        assert!(tree_pss_kib(me) > 0);
        let (steal, total) = steal_total();
        assert!(total > 0 && steal <= total);
    }
}
